"""``svd``: the compress stage, kohya ``resize_lora.py``'s rank choice, computed exactly.

Default ``sv_ratio: 16`` (the method's; 32, 64 or 128 keep more detail). Other methods:
``sv_fro`` or ``sv_cumulative`` (a fraction to keep), or ``rank`` alone for a fixed rank;
with a method, ``rank`` caps it (default: each module's own rank). See :mod:`charfw.lora.svd`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

import charfw
from charfw.components import Compressor, Options
from charfw.default_plugins.lora.block_weights import ascii_stem, remove_other_outputs
from charfw.stage_context import StageContext, StageOutput


class SvdOptions(Options):
    #: keep singular values above the largest / sv_ratio (plus kohya's one more)
    sv_ratio: float | None = Field(None, gt=1)
    #: keep this fraction of the Frobenius norm
    sv_fro: float | None = Field(None, gt=0, le=1)
    #: keep this fraction of the sum of singular values
    sv_cumulative: float | None = Field(None, gt=0, le=1)
    #: a fixed rank (alone) or the largest rank (with a method)
    rank: int | None = Field(None, ge=1)
    #: the rank (or cap) of conv modules (kohya's new_conv_rank); default: rank
    conv_rank: int | None = Field(None, ge=1)
    #: no kohya "+1" direction past the threshold
    tight: bool = False
    precision: Literal["fp16", "bf16", "fp32"] | None = None

    @model_validator(mode="after")
    def _one_method(self) -> SvdOptions:
        given = [n for n in ("sv_ratio", "sv_fro", "sv_cumulative") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of sv_ratio, sv_fro, sv_cumulative, not {' and '.join(given)}")
        return self

    def rule(self):  # -> RankRule (torch is imported only when the stage runs)
        from charfw.lora.svd import RankRule

        for method in ("sv_ratio", "sv_fro", "sv_cumulative"):
            value = getattr(self, method)
            if value is not None:
                return RankRule(method, value, self.rank, self.conv_rank, self.tight)
        if self.rank is not None:
            return RankRule("rank", None, self.rank, self.conv_rank, self.tight)
        return RankRule("sv_ratio", 16.0, None, self.conv_rank, self.tight)


def rule_suffix(rule) -> str:
    """``-sv16``, ``-fro0.95``, ``-cum0.9``, ``-r32`` (``c16`` for another conv rank)."""
    if rule.method == "rank":
        suffix = f"-r{rule.rank}"
        if rule.conv_rank and rule.conv_rank != rule.rank:
            suffix += f"c{rule.conv_rank}"
        return suffix
    short = {"sv_ratio": "sv", "sv_fro": "fro", "sv_cumulative": "cum"}[rule.method]
    return f"-{short}{rule.param:g}" + (f"-max{rule.rank}" if rule.rank else "")


class SvdCompressor(Compressor):
    name = "svd"
    version = "1"
    description = "SVD rank reduction with kohya resize_lora's ranks (sv_ratio 16 by default), computed from the factors"
    Options = SvdOptions

    def run(self, ctx: StageContext, options: SvdOptions) -> StageOutput:
        from charfw.build import atomic
        from charfw.build.items import safe_file_stem
        from charfw.lora.file import read_lora
        from charfw.lora.svd import resize_lora

        src = ctx.input_file("lora")
        lora = read_lora(src)
        rule = options.rule()
        with ctx.progress(len(lora.modules), "svd", unit="module") as bar:
            new, report = resize_lora(lora, rule, precision=_precision(options.precision), progress=bar.advance)
        out = ctx.stage_dir / f"{ascii_stem(safe_file_stem(src.stem))}{rule_suffix(rule)}.safetensors"
        saved = new.save(out)
        remove_other_outputs(ctx, out)
        dynamic = rule.method != "rank"
        atomic.write_text(ctx.stage_dir / "resize-report.txt",
                          "\n".join([*(m.line(dynamic) for m in report.modules), *report.lines()]) + "\n")
        return StageOutput(
            files={"lora": ctx.record_path(out)},
            data={"ranks": {m.name: m.new_rank for m in report.modules}, "fro_retained": report.fro_mean,
                  "bytes": saved.size},
            summary=[f"{ctx.record_path(out)} ({_size(saved.size)}, {report.seconds:.1f} s)", *report.lines()],
        )


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _precision(name: str | None):
    from charfw.lora.safetensors_io import parse_precision

    return parse_precision(name)


@charfw.hookimpl(trylast=True)
def register_compressors(register):
    register(SvdCompressor())
