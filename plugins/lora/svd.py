"""``svd``: the compress stage, kohya ``resize_lora.py``'s rank choice, computed exactly.

Default ``sv_ratio: 16`` (the method's; 32, 64 or 128 keep more detail). Other methods:
``sv_fro`` or ``sv_cumulative`` (a fraction to keep), or ``rank`` alone for a fixed rank;
with a method, ``rank`` caps it (default: each module's own rank). See :mod:`charfw.lora.svd`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator

import charfw
from charfw import Compressor, Options, StageContext, StageOutput
from charfw.build import atomic
from charfw.build.items import safe_file_stem
from charfw.errors import CharfwError
from charfw.lora.outputs import human_size, output_stem, rank_rule_suffix, remove_other_outputs
from charfw.lora.rank_rule import RankRule, check_method_value, check_rank


class SvdOptions(Options):
    #: keep singular values above the largest / sv_ratio (plus kohya's one more)
    sv_ratio: float | None = None
    #: keep this fraction of the Frobenius norm
    sv_fro: float | None = None
    #: keep this fraction of the sum of singular values
    sv_cumulative: float | None = None
    #: a fixed rank (alone) or the largest rank (with a method)
    rank: int | None = None
    #: the rank (or cap) of conv modules (kohya's new_conv_rank); default: rank
    conv_rank: int | None = None
    #: no kohya "+1" direction past the threshold
    tight: bool = False
    precision: Literal["fp16", "bf16", "fp32"] | None = None

    # the values are checked by charfw.lora.rank_rule, as `charfw lora resize` checks them

    @field_validator("sv_ratio", "sv_fro", "sv_cumulative")
    @classmethod
    def _method_value(cls, value: float | None, info) -> float | None:
        return None if value is None else _checked(check_method_value, info.field_name, value)

    @field_validator("rank", "conv_rank")
    @classmethod
    def _rank(cls, value: int | None, info) -> int | None:
        return _checked(check_rank, value, info.field_name)

    @model_validator(mode="after")
    def _one_method(self) -> SvdOptions:
        _checked(self.rule)
        return self

    def rule(self) -> RankRule:
        return RankRule.from_options(sv_ratio=self.sv_ratio, sv_fro=self.sv_fro, sv_cumulative=self.sv_cumulative,
                                     rank=self.rank, conv_rank=self.conv_rank, tight=self.tight)


def _checked(check, *args):
    """A rank-rule check inside pydantic: its one-line error as a validation error."""
    try:
        return check(*args)
    except CharfwError as exc:
        raise ValueError(exc.message) from None


class SvdCompressor(Compressor):
    name = "svd"
    version = "1"
    description = "SVD rank reduction with kohya resize_lora's ranks (sv_ratio 16 by default), computed from the factors"
    Options = SvdOptions

    def run(self, ctx: StageContext, options: SvdOptions) -> StageOutput:
        from charfw.lora.file import read_lora
        from charfw.lora.safetensors_io import parse_precision
        from charfw.lora.svd import resize_lora

        src = ctx.input_file("lora")
        lora = read_lora(src)
        rule = options.rule()
        with ctx.progress(len(lora.modules), "svd", unit="module") as bar:
            new, report = resize_lora(lora, rule, precision=parse_precision(options.precision), progress=bar.advance)
        out = ctx.stage_dir / f"{output_stem(safe_file_stem(src.stem))}{rank_rule_suffix(rule)}.safetensors"
        saved = new.save(out)
        remove_other_outputs(ctx.stage_dir, out)
        dynamic = rule.method != "rank"
        atomic.write_text(ctx.stage_dir / "resize-report.txt",
                          "\n".join([*(m.line(dynamic) for m in report.modules), *report.lines()]) + "\n")
        return StageOutput(
            files={"lora": ctx.record_path(out)},
            data={"ranks": {m.name: m.new_rank for m in report.modules}, "fro_retained": report.fro_mean,
                  "bytes": saved.size},
            summary=[f"{ctx.record_path(out)} ({human_size(saved.size)}, {report.seconds:.1f} s)", *report.lines()],
        )


@charfw.hookimpl
def register_compressors(register):
    register(SvdCompressor())
