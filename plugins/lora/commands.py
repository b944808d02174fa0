"""``charfw lora info|blocks|resize|merge|presets``: the finishing tools on any LoRA file.

Heavy libraries (torch) are imported inside the commands, so ``charfw --help`` stays fast.
Every output is written atomically next to its input unless ``-o`` says otherwise, keeping
the input's name and adding what was done (``-FACE``, ``-sv16``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import click

import charfw
from charfw import CharfwError, console
from charfw.cli import templates_from
from charfw.errors import display_path
from charfw.lora.block_weights import (
    BLOCKS26,
    LAYOUTS,
    apply_block_weights,
    block_of,
    full_layout,
    load_presets,
    resolve_weights,
)
from charfw.lora.outputs import block_weights_suffix, human_size, output_stem, rank_rule_suffix

PRECISION = click.Choice(["fp16", "bf16", "fp32"])


def _output_path(src: Path, suffix: str, output: Path | None) -> Path:
    dest = output if output is not None else src.with_name(f"{output_stem(src.stem)}{suffix}.safetensors")
    if dest.suffix.lower() != ".safetensors":
        raise CharfwError(f"output '{dest}' must end in .safetensors")
    if dest.exists() and dest.resolve() == src.resolve():
        raise CharfwError("the output would replace the input", path=dest, hint="give another -o file")
    return dest


def _rule(sv_ratio: float | None, sv_fro: float | None, sv_cumulative: float | None, rank: int | None,
          conv_rank: int | None, tight: bool, *, default_ratio: bool) -> Any:
    from charfw.lora.rank_rule import RankRule

    if sum(v is not None for v in (sv_ratio, sv_fro, sv_cumulative)) > 1:
        raise click.UsageError("give only one of --sv-ratio, --sv-fro, --sv-cumulative")
    try:  # the same checks as a manifest's compress options
        rule = RankRule.from_options(sv_ratio=sv_ratio, sv_fro=sv_fro, sv_cumulative=sv_cumulative, rank=rank,
                                     conv_rank=conv_rank, tight=tight, default=default_ratio)
    except CharfwError as exc:
        given = next((f"--{n.replace('_', '-')}" for n, v in (("sv_ratio", sv_ratio), ("sv_fro", sv_fro),
                                                              ("sv_cumulative", sv_cumulative)) if v is not None), None)
        raise click.BadParameter(exc.message, param_hint=given) from None
    if rule is None:
        raise click.UsageError("give --rank N (and/or --sv-ratio, --sv-fro, --sv-cumulative)")
    return rule


def _presets(ctx: click.Context, extra: tuple[Path, ...]) -> Any:
    return load_presets(templates_from(ctx), extra)


def _weights_for(weights: str, lora: Any, presets: Any, path: Path) -> Any:
    """``resolve_weights`` for one file; its errors (an SD 1.x vector on an SDXL file) name it."""
    try:
        return resolve_weights(weights, lora.family, presets)
    except CharfwError as exc:
        raise CharfwError(exc.message, path=path, hint=exc.hint) from None


_SOURCE = re.compile(r"^(?P<path>.+?)(?::(?P<ratio>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))?(?::(?P<weights>[^:]+))?$")


def parse_source(text: str) -> tuple[Path, float, str | None]:
    """``FILE[:RATIO[:WEIGHTS]]`` (WEIGHTS: a preset or comma-separated numbers). A path
    that exists as given wins, so Windows drive letters and odd names still work."""
    if Path(text).is_file():
        return Path(text), 1.0, None
    m = _SOURCE.match(text)
    if m is None or not Path(m["path"]).is_file():
        raise CharfwError(f"'{text}': no such file (write FILE, FILE:RATIO or FILE:RATIO:WEIGHTS)")
    ratio = float(m["ratio"]) if m["ratio"] else 1.0
    return Path(m["path"]), ratio, m["weights"]


def _counts(counter: Any, fmt: Any = str) -> str:
    return ", ".join(f"{fmt(k)} ×{v}" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"


def info_data(path: Path, allow_pickle: bool) -> dict[str, Any]:
    """Everything ``charfw lora info`` shows, as JSON-able data."""
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    from charfw.lora.delta import delta_norm, numpy_threads
    from charfw.lora.file import read_lora
    from charfw.lora.safetensors_io import data_sha256, dtype_name, file_sha256, precision_name

    lora = read_lora(path, allow_pickle=allow_pickle)
    stored = lora.metadata.get("sshs_model_hash")
    # the file's hashes on two threads (hashlib lets go of the GIL) while this one computes
    # ‖ΔW‖: numpy for LoRA/LoCon (torch only for the other types), one BLAS thread (its idle
    # threads spin, and more gained nothing here)
    with ThreadPoolExecutor(2) as pool, numpy_threads(1):
        whole = pool.submit(file_sha256, path)
        data = pool.submit(data_sha256, path) if stored else None
        norms = {name: delta_norm(m) for name, m in lora.modules.items()}
        sha256, data_sha = whole.result(), data.result() if data else None
    blocks: dict[str, dict[str, Any]] = {}
    for m in lora.modules.values():
        block = block_of(m.name) or "(none)"
        row = blocks.setdefault(block, {"modules": 0, "norm_sq": 0.0, "ranks": Counter(), "types": Counter()})
        row["modules"] += 1
        row["norm_sq"] += norms[m.name] ** 2
        if m.rank is not None:
            row["ranks"][m.rank] += 1
        row["types"][m.label] += 1
    order = [*(full_layout(lora.family) if lora.family in LAYOUTS else BLOCKS26), "(none)"]
    total = sum(r["norm_sq"] for r in blocks.values()) or 1.0
    table = [{"block": b, "modules": blocks[b]["modules"], "types": dict(blocks[b]["types"]),
              "ranks": {str(k): v for k, v in blocks[b]["ranks"].items()},
              "delta_norm": math.sqrt(blocks[b]["norm_sq"]), "share": blocks[b]["norm_sq"] / total}
             for b in order if b in blocks]
    dtypes = Counter(precision_name(dtype_name(t)) for _, t in lora.items())
    hash_state = None
    if stored:
        hash_state = "matches the data" if stored == data_sha else "STALE (does not match the data)"
    elif lora.metadata or path.suffix.lower() == ".safetensors":
        hash_state = "missing"
    unet = sum(1 for n in lora.modules if n.startswith(("lora_unet_", "lora_transformer_")))
    return {
        "file": str(path), "bytes": path.stat().st_size, "sha256": sha256,
        "type": lora.network_type, "family": lora.family, "tucker": lora.tucker, "dora_modules": lora.dora,
        "modules": len(lora.modules), "unet_modules": unet, "text_encoder_modules": len(lora.modules) - unet,
        "conv3x3_modules": sum(1 for m in lora.modules.values() if m.is_conv and any(k > 1 for k in m.kernel)),
        "ranks": {str(k): v for k, v in lora.ranks().items()},
        "alphas": {f"{k:g}": v for k, v in lora.alphas().items()},
        "dtypes": dict(dtypes), "blocks": table,
        "unknown_keys": sorted(lora.unknown), "sshs_model_hash": hash_state, "metadata": lora.metadata,
    }


def _print_info(data: dict[str, Any]) -> None:
    out = console.out
    fam = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd35": "SD 3.5"}.get(data["family"], "unknown base model")
    extras = [x for x in ("Tucker" if data["tucker"] else "", f"{data['dora_modules']} DoRA" if data["dora_modules"] else "") if x]
    lines = [
        f"file     {data['file']} ({human_size(data['bytes'])}, {', '.join(data['dtypes'])})",
        f"type     {data['type']}{' (' + ', '.join(extras) + ')' if extras else ''} for {fam}",
        f"modules  {data['modules']} ({data['text_encoder_modules']} text encoder, {data['unet_modules']} {'transformer' if data['family'] == 'sd35' else 'UNet'}, "
        f"{data['conv3x3_modules']} conv 3x3)",
        f"ranks    {_counts({int(k): v for k, v in data['ranks'].items()})}",
        f"alphas   {_counts({float(k): v for k, v in data['alphas'].items()}, lambda a: f'{a:g}')}",
    ]
    if data["sshs_model_hash"]:
        lines.append(f"hash     sshs_model_hash {data['sshs_model_hash']}")
    if data["unknown_keys"]:
        shown = ", ".join(data["unknown_keys"][:4]) + (" …" if len(data["unknown_keys"]) > 4 else "")
        lines.append(f"unknown  {len(data['unknown_keys'])} keys kept as they are: {shown}")
    for line in lines:
        out.print(line, markup=False, highlight=False)
    out.print("\nblock   modules  ranks            ‖ΔW‖   share", markup=False, highlight=False)
    for row in data["blocks"]:
        ranks = _counts({int(k): v for k, v in row["ranks"].items()})
        ranks = ranks if len(ranks) <= 16 else ranks[:15] + "…"
        out.print(f"{row['block']:<7} {row['modules']:>7}  {ranks:<16} {row['delta_norm']:>6.3g}  {row['share']:>5.1%}",
                  markup=False, highlight=False)
    if data["metadata"]:
        out.print("\nmetadata", markup=False)
        for key in sorted(data["metadata"]):
            value = data["metadata"][key].replace("\n", " ")
            if len(value) > 90:
                value = f"{value[:87]}… ({len(value)} chars)"
            out.print(f"  {key} = {value}", markup=False, highlight=False)


@charfw.hookimpl
def register_commands(cli):
    @cli.group("lora")
    def lora_group() -> None:
        """Inspect, block-merge, resize and merge LoRA files (kohya format: LoRA, LoCon, LoHa, LoKr).

        \b
        Examples:
          charfw lora info krnk.safetensors
          charfw lora blocks krnk.safetensors --weights FACE          # → krnk-FACE.safetensors
          charfw lora resize krnk-FACE.safetensors --sv-ratio 16      # → krnk-FACE-sv16.safetensors
          charfw lora merge a.safetensors:0.7 b.safetensors:0.4:BODY --rank 64 -o ab.safetensors
        """

    allow_pickle_option = click.option(
        "--allow-pickle", is_flag=True,
        help="Also read .ckpt/.pt files (torch.load with weights_only=True); only for files you trust.")

    @lora_group.command("info")
    @click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @allow_pickle_option
    def info(file: Path, as_json: bool, allow_pickle: bool) -> None:
        """Type, base model, modules, ranks and alphas, ‖ΔW‖ per block, metadata."""
        data = info_data(file, allow_pickle)
        if as_json:
            click.echo(json.dumps(data, indent=1, ensure_ascii=False))
        else:
            _print_info(data)

    @lora_group.command("blocks")
    @click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("-w", "--weights", required=True, metavar="PRESET|VALUES",
                  help="A preset (FACE, BODY, ALL, OUTD…; see `charfw lora presets`) or 26/17 (SD 1.x) or 20/12 (SDXL) numbers.")
    @click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
                  help="Output file (default: next to FILE, named FILE-<PRESET>.safetensors).")
    @click.option("--strength", type=float, default=1.0, show_default=True, help="Multiplies every ratio.")
    @click.option("--other", default="1", show_default=True, metavar="RATIO|BASE",
                  help="Ratio of UNet modules in no block (time embedding, conv_out…); BASE: the text encoder's.")
    @click.option("--presets", "preset_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="Extra presets: YAML like templates/block-weights/presets.yaml, or LBW's lbwpresets.txt.")
    @click.option("--precision", type=PRECISION, help="Output precision (default: the input's).")
    @allow_pickle_option
    @click.pass_context
    def blocks(ctx: click.Context, file: Path, weights: str, output: Path | None, strength: float, other: str,
               preset_files: tuple[Path, ...], precision: str | None, allow_pickle: bool) -> None:
        """Apply per-block weights exactly: each module's ΔW × its block's ratio.

        Works the same for LoRA, LoCon, LoHa and LoKr with any real ratio (one factor of
        each module is scaled; a module at 0 is left out). BASE is the text encoder;
        modules in no block get --other."""
        from charfw.lora.file import read_lora

        other_value = _other_ratio(other)
        lora = read_lora(file, allow_pickle=allow_pickle)
        resolved = _weights_for(weights, lora, _presets(ctx, preset_files), file)
        dest = _output_path(file, block_weights_suffix(weights if resolved.name == "custom" else resolved.name, strength), output)
        merged, report = apply_block_weights(lora, resolved, other=other_value, strength=strength)
        saved = merged.save(dest, precision=precision)
        for line in report.table():
            console.out.print(f"  {line}", markup=False, highlight=False)
        for line in report.lines():
            console.out.print(line, markup=False, highlight=False)
        console.out.print(f"wrote {display_path(saved.path)} ({human_size(saved.size)})", markup=False)

    method_options = [
        click.option("--sv-ratio", type=float, help="Keep singular values above the largest / X (kohya sv_ratio)."),
        click.option("--sv-fro", type=float, help="Keep this fraction of the Frobenius norm (kohya sv_fro)."),
        click.option("--sv-cumulative", type=float, help="Keep this fraction of the sum of singular values (kohya sv_cumulative)."),
        click.option("--rank", type=click.IntRange(1), help="Fixed rank; with a method, the largest rank (kohya --new_rank)."),
        click.option("--conv-rank", type=click.IntRange(1), help="Rank (or cap) of conv modules, 1x1 included (kohya --new_conv_rank)."),
        click.option("--tight", is_flag=True, help="No kohya '+1' direction past the threshold, no padding past a module's rank."),
        click.option("--precision", type=PRECISION, help="Output precision (default: the input's)."),
        click.option("--threads", type=click.IntRange(1, 64), help="Worker threads (default: one per core)."),
    ]

    def with_methods(fn: Any) -> Any:
        for option in reversed(method_options):
            fn = option(fn)
        return fn

    @lora_group.command("resize")
    @click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
                  help="Output file (default: next to FILE, named FILE-sv16.safetensors etc.).")
    @with_methods
    @click.option("-v", "--verbose", is_flag=True, help="One line per module, as kohya's --verbose.")
    @allow_pickle_option
    def resize(file: Path, output: Path | None, sv_ratio: float | None, sv_fro: float | None,
               sv_cumulative: float | None, rank: int | None, conv_rank: int | None, tight: bool,
               precision: str | None, threads: int | None, verbose: bool, allow_pickle: bool) -> None:
        """SVD-compress a LoRA with kohya resize_lora.py's ranks (default --sv-ratio 16).

        The same ranks and alphas kohya chooses (its '+1' and conv rules included),
        computed from the factors instead of the dense weight: seconds instead of
        minutes. LoHa and LoKr become plain LoRA; DoRA scales are kept."""
        from charfw.lora.file import read_lora
        from charfw.lora.safetensors_io import parse_precision
        from charfw.lora.svd import resize_lora

        rule = _rule(sv_ratio, sv_fro, sv_cumulative, rank, conv_rank, tight, default_ratio=True)
        dest = _output_path(file, rank_rule_suffix(rule), output)
        lora = read_lora(file, allow_pickle=allow_pickle)
        with console.progress(len(lora.modules), "resize", unit="module") as bar:
            new, report = resize_lora(lora, rule, precision=parse_precision(precision), threads=threads,
                                      progress=bar.advance)
        saved = new.save(dest)
        _print_svd_report(report, rule, verbose)
        console.out.print(f"wrote {display_path(saved.path)} ({human_size(saved.size)}, was {human_size(file.stat().st_size)}) "
                          f"in {report.seconds:.1f} s", markup=False)

    @lora_group.command("merge")
    @click.argument("sources", nargs=-1, required=True, metavar="FILE[:RATIO[:WEIGHTS]]...")
    @click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output file.")
    @with_methods
    @click.option("--clamp-quantile", type=click.FloatRange(0, 1, min_open=True),
                  help="Clamp the new factors at this quantile, as kohya's svd_merge_lora (0.99 there); lossy.")
    @click.option("--other", default="1", show_default=True, metavar="RATIO|BASE",
                  help="With WEIGHTS: the ratio of UNet modules in no block.")
    @click.option("--presets", "preset_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="Extra block-weight presets (YAML or LBW lbwpresets.txt).")
    @click.option("-v", "--verbose", is_flag=True, help="One line per module.")
    @allow_pickle_option
    @click.pass_context
    def merge(ctx: click.Context, sources: tuple[str, ...], output: Path, sv_ratio: float | None, sv_fro: float | None,
              sv_cumulative: float | None, rank: int | None, conv_rank: int | None, tight: bool, precision: str | None,
              threads: int | None, clamp_quantile: float | None, other: str, preset_files: tuple[Path, ...],
              verbose: bool, allow_pickle: bool) -> None:
        """Merge LoRAs into one of a chosen rank: exactly Σ ratio × ΔW, then SVD.

        Each source is FILE, FILE:RATIO or FILE:RATIO:WEIGHTS (a preset or 26/17/20/12
        numbers applied to that file). Unlike kohya's merge_lora.py (which sums factors:
        cross terms, ratio×|ratio|) and svd_merge_lora.py (which clamps at the 0.99
        quantile), nothing is approximated but the final rank. One alpha for the file (the most
        common rank), each module's scale in its lora_up, so every loader reads the same ΔW."""
        from charfw.lora.file import read_lora
        from charfw.lora.merge import MergeSource, merge_loras
        from charfw.lora.safetensors_io import parse_precision

        rule = _rule(sv_ratio, sv_fro, sv_cumulative, rank, conv_rank, tight, default_ratio=False)
        other_value = _other_ratio(other)
        parsed = [parse_source(s) for s in sources]
        presets = _presets(ctx, preset_files) if any(w for _, _, w in parsed) else {}
        inputs = []
        for path, ratio, weights in parsed:
            if output.exists() and output.resolve() == path.resolve():
                raise CharfwError("the output would replace an input", path=output, hint="give another -o file")
            lora = read_lora(path, allow_pickle=allow_pickle)
            resolved = _weights_for(weights, lora, presets, path) if weights else None
            inputs.append(MergeSource(lora, ratio, resolved, label=path.name))
        if output.suffix.lower() != ".safetensors":
            raise CharfwError(f"output '{output}' must end in .safetensors")
        total = len({n for s in inputs for n in s.lora.modules})
        with console.progress(total, "merge", unit="module") as bar:
            merged, report = merge_loras(inputs, rule, precision=parse_precision(precision), clamp_quantile=clamp_quantile,
                                         other=other_value, threads=threads, progress=bar.advance)
        saved = merged.save(output)
        _print_svd_report(report, rule, verbose)
        console.out.print(f"wrote {display_path(saved.path)} ({human_size(saved.size)})", markup=False)

    @lora_group.command("presets")
    @click.option("--presets", "preset_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="Extra presets files to include.")
    @click.pass_context
    def presets_command(ctx: click.Context, preset_files: tuple[Path, ...]) -> None:
        """List the block-weight presets (charfw's, the workspace's, --presets files)."""

        for name, preset in _presets(ctx, preset_files).items():
            for fam, values in preset.vectors.items():
                label = {"sd1": "SD1", "sdxl": "SDXL"}[fam]
                console.out.print(f"{name:<10} {label:<4} {len(values):>2}: {','.join(f'{v:g}' for v in values)}",
                                  markup=False, highlight=False)


def _print_svd_report(report: Any, rule: Any, verbose: bool) -> None:
    """The per-module lines (with ``--verbose``) and the summary of a resize or merge."""

    if verbose:
        for m in report.modules:
            console.out.print(m.line(rule.method != "rank"), markup=False, highlight=False)
    for line in report.lines():
        console.out.print(line, markup=False, highlight=False)


def _other_ratio(text: str) -> float | str:
    """``--other``: a number, or BASE (any case)."""
    if text.upper() == "BASE":
        return "BASE"
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a number or BASE", param_hint="--other") from None
