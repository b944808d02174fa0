"""``block-weights``: the merge stage, one exact per-block ratio per module.

The method's vectors are the defaults: ``FACE`` for a face part, ``BODY`` for a body or a
group part. They are the seed's SD 1.x vectors: for an SDXL or SD 3.5 part that has no
vector of its own (a preset with an ``sdxl:``/``sd35:`` vector, or ``weights:`` of that
family's length) the stage keeps every block (``ALL``) and says so before the build runs
and in its summary. A vector of another family's length is an error naming the manifest line. A manifest may name another preset or give its own vector (26/17 values for
SD 1.x/2.x, 20/12 for SDXL, any real numbers)::
    stages:
      merge: {plugin: block-weights, weights: BODY}          # every part of this character
    bodies:
      krnksf:
        stages:
          merge: {weights: "0,1,1,1,0,1,0,0,0,1,0,0,0,0,0,0,1,1,1,0.5,0.5,1,1,0,0,1"}

Presets come from ``templates/block-weights/presets.yaml`` (a workspace file of the same
path adds to them). See :mod:`charfw.lora.block_weights` for the rules.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import field_validator

import charfw
from charfw import BlockMerger, CharfwError, Options, StageContext, StageOutput
from charfw.build.items import safe_file_stem
from charfw.lora.block_weights import (
    FAMILY_NAMES,
    LAYOUTS,
    BlockWeights,
    Preset,
    apply_block_weights,
    family_of_length,
    is_preset_name,
    layout_family,
    load_presets,
    parse_vector,
    resolve_weights,
)
from charfw.lora.outputs import block_weights_suffix, output_stem, remove_other_outputs

PART_DEFAULTS = {"face": "FACE", "body": "BODY", "group": "BODY"}
#: what a part of a family without a FACE/BODY vector gets: every block kept (named ALL)
FALLBACK = "ALL"


class BlockWeightOptions(Options):
    #: a preset name or a vector; default FACE for a face part, BODY for a body or group
    weights: str | list[float] | None = None
    #: multiplies every ratio (LBW's LoRA strength)
    strength: float = 1.0
    #: the ratio of UNet modules in no block (time embedding, conv_out): a number, or BASE
    other: float | Literal["BASE"] = 1.0
    #: output precision; default: the trained file's
    precision: Literal["fp16", "bf16", "fp32"] | None = None

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and is_preset_name(value)):
            return value  # a preset name: checked against the preset files before the build
        values = parse_vector(value, what="weights")
        if family_of_length(len(values)) is None:
            raise ValueError(f"{len(values)} values is not a block layout; use 26 or 17 (SD 1.x/2.x) or 20 or 12 (SDXL)")
        return value


def weights_spec(options: BlockWeightOptions, part_kind: str) -> str | list[float]:
    return options.weights if options.weights is not None else PART_DEFAULTS.get(part_kind, "BODY")


def _preset(presets: dict[str, Preset], name: str) -> Preset | None:
    return presets.get(name) or next((p for n, p in presets.items() if n.upper() == name.upper()), None)


def part_weights(options: BlockWeightOptions, part_kind: str, family: str,
                 presets: dict[str, Preset]) -> tuple[BlockWeights, str | None]:
    """The vector the stage applies to a LoRA of ``family``, and a note when the part's
    default (FACE or BODY) has no vector for that family and every block is kept instead.
    What the manifest gives is used as given: a preset without this family's vector or a
    vector of another family's length is an error."""
    spec = weights_spec(options, part_kind)
    fam = layout_family(family)
    preset = _preset(presets, spec) if options.weights is None and isinstance(spec, str) else None
    if preset is None or fam in preset.vectors:
        return resolve_weights(spec, family, presets), None
    # every block of the family's full layout at 1 (the ALL preset's short SDXL vector would
    # give the blocks it does not name 0, dropping a LoRA3x3's conv-only blocks)
    ones = [1.0] * len(max(LAYOUTS[fam].values(), key=len))
    weights = dataclasses.replace(resolve_weights(ones, family, presets), name=FALLBACK)
    sizes = " or ".join(str(n) for n in LAYOUTS[fam])
    note = (f"{preset.name} is the seed's SD 1.x vector and has no {FAMILY_NAMES[fam]} one: every block is kept "
            f"({FALLBACK}); give weights: with {sizes} values (or a preset with an {fam}: vector) to weight them")
    return weights, note


class BlockWeightMerger(BlockMerger):
    name = "block-weights"
    version = "1"
    description = "exact per-block weights (LBW layouts; FACE for faces, BODY for bodies and groups)"
    Options = BlockWeightOptions

    def cache_key(self, ctx: StageContext, options: BlockWeightOptions) -> Any:
        """The preset's vectors, so that editing a presets file re-runs the stage."""

        spec = weights_spec(options, ctx.part.kind)
        if isinstance(spec, list):
            return None
        presets = load_presets(ctx.templates)
        preset = presets.get(spec.strip()) or next((p for n, p in presets.items() if n.upper() == spec.strip().upper()), None)
        return {fam: list(v) for fam, v in preset.vectors.items()} if preset else spec

    def check(self, ctx: StageContext, options: BlockWeightOptions) -> None:
        # the preset (the closest name when unknown) or the vector, for the part's model family
        try:
            _weights, note = part_weights(options, ctx.part.kind, ctx.part.model.family, load_presets(ctx.templates))
        except CharfwError as exc:
            exc.option = "weights"  # the build names the manifest line
            raise
        if note:
            ctx.log(note)

    def run(self, ctx: StageContext, options: BlockWeightOptions) -> StageOutput:
        from charfw.lora.file import read_lora

        src = ctx.input_file("lora")
        lora = read_lora(src)
        spec = weights_spec(options, ctx.part.kind)
        try:
            weights, note = part_weights(options, ctx.part.kind, lora.family, load_presets(ctx.templates))
        except CharfwError as exc:
            raise CharfwError(exc.message, path=src, hint=exc.hint) from None
        if note:
            ctx.log(note)
            spec = weights.name
        merged, report = apply_block_weights(lora, weights, other=options.other, strength=options.strength)
        out = ctx.stage_dir / f"{output_stem(safe_file_stem(src.stem))}{block_weights_suffix(spec, options.strength)}.safetensors"
        merged.save(out, precision=options.precision)
        remove_other_outputs(ctx.stage_dir, out)
        for line in report.lines():
            ctx.log(line)
        return StageOutput(
            files={"lora": ctx.record_path(out)},
            data={"weights": list(weights.values), "preset": weights.name, "family": weights.family},
            summary=[f"{weights.describe()} → {ctx.record_path(out)}", *([note] if note else []),
                     *report.lines()[1:]],
        )


@charfw.hookimpl
def register_block_mergers(register):
    register(BlockWeightMerger())
