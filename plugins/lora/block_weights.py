"""``block-weights``: the merge stage, one exact per-block ratio per module.

The method's vectors are the defaults: ``FACE`` for a face part, ``BODY`` for a body or a
group part. A manifest may name another preset or give its own vector (26/17 values for
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

from typing import Any, Literal

from pydantic import field_validator

import charfw
from charfw import BlockMerger, CharfwError, Options, StageContext, StageOutput
from charfw.build.items import safe_file_stem
from charfw.lora.block_weights import (
    apply_block_weights,
    family_of_length,
    is_preset_name,
    load_presets,
    parse_vector,
    resolve_weights,
)
from charfw.lora.outputs import block_weights_suffix, output_stem, remove_other_outputs

PART_DEFAULTS = {"face": "FACE", "body": "BODY", "group": "BODY"}


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
        spec = weights_spec(options, ctx.part.kind)
        if isinstance(spec, str) and is_preset_name(spec):
            # the preset (the closest name when unknown) and its vector for the part's model
            try:
                resolve_weights(spec, ctx.part.model.family, load_presets(ctx.templates))
            except CharfwError as exc:
                exc.option = "weights"  # the build names the manifest line
                raise

    def run(self, ctx: StageContext, options: BlockWeightOptions) -> StageOutput:
        from charfw.lora.file import read_lora

        src = ctx.input_file("lora")
        lora = read_lora(src)
        spec = weights_spec(options, ctx.part.kind)
        weights = resolve_weights(spec, lora.family, load_presets(ctx.templates))
        merged, report = apply_block_weights(lora, weights, other=options.other, strength=options.strength)
        out = ctx.stage_dir / f"{output_stem(safe_file_stem(src.stem))}{block_weights_suffix(spec, options.strength)}.safetensors"
        merged.save(out, precision=options.precision)
        remove_other_outputs(ctx.stage_dir, out)
        for line in report.lines():
            ctx.log(line)
        return StageOutput(
            files={"lora": ctx.record_path(out)},
            data={"weights": list(weights.values), "preset": weights.name, "family": weights.family},
            summary=[f"{weights.describe()} → {ctx.record_path(out)}", *report.lines()[1:]],
        )


@charfw.hookimpl
def register_block_mergers(register):
    register(BlockWeightMerger())
