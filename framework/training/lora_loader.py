"""Applying a kohya-format LoRA file to a diffusers pipeline by baking it into the weights.

``W += multiplier · ΔW`` for every module of the file, with ΔW computed by
:func:`charfw.lora.delta.module_delta` (LoRA, LoCon, LoHa, LoKr): the way A1111 and
ComfyUI apply a LoRA, and an independent check of the trainer's forward pass, which adds
the adapters' outputs instead. diffusers' own ``load_lora_weights`` reads kohya LoRA
files but not LoHa; this loader reads both.

Layers are found by kohya's names (:mod:`charfw.training.networks.targets`), so a file
whose names do not match the model is an error, not a silent no-op.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from charfw.training.families import get_family
from charfw.training.networks.targets import enumerate_targets

from ..errors import CharfwError


def bake_lora(unet: Any, text_encoders: list[Any], path: str | Path, *, multiplier: float = 1.0,
              family: str = "sd1") -> list[str]:
    """Add a LoRA file's ΔW to the weights of ``unet`` and ``text_encoders``; returns the
    names of the modules applied."""
    from ..lora.delta import module_delta
    from ..lora.file import read_lora

    lora = read_lora(path)
    if lora.unknown:
        raise CharfwError(f"the file has tensors charfw cannot apply ({', '.join(lora.unknown_modules()[:3])})",
                          path=path)
    roots = get_family(family).roots_for(unet, text_encoders)
    layers = {t.name: t.layer for t in enumerate_targets(roots, conv3x3=True)}
    missing = sorted(set(lora.modules) - set(layers))
    if missing:
        raise CharfwError(f"{len(missing)} module(s) of the file are not in this model (e.g. {missing[0]})",
                          path=path, hint="is it a LoRA for another model family?")
    with torch.no_grad():
        for name, module in lora.modules.items():
            weight = layers[name].weight
            delta = module_delta(module.tensors, shape=tuple(weight.shape))
            weight += (multiplier * delta).to(weight.device, weight.dtype)
    return sorted(lora.modules)


def bake_into_pipeline(pipe: Any, path: str | Path, *, multiplier: float = 1.0) -> list[str]:
    """:func:`bake_lora` on a diffusers Stable Diffusion pipeline's UNet and text encoder."""
    return bake_lora(pipe.unet, [pipe.text_encoder], path, multiplier=multiplier)
