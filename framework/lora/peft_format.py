"""diffusers' peft-format LoRA files (SD 3.5), read and written through kohya-style names.

diffusers' SD3 LoRA trainer writes ``<part>.<module path>.lora_A.weight`` [r, in] and
``…lora_B.weight`` [out, r] with ``<part>`` ``transformer``, ``text_encoder`` (CLIP-L) or
``text_encoder_2`` (CLIP-G), and no alpha (scale 1)::

    transformer.transformer_blocks.0.attn.to_q.lora_A.weight
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight

Every LoRA tool in :mod:`charfw.lora` (and the trainer's network) works on kohya-style
module names, so such a file is read under the names OneTrainer gives the same layers
(which ComfyUI also reads): the part's prefix (``lora_transformer``, ``lora_te1``,
``lora_te2``) and the module path with dots as underscores, ``lora_A``/``lora_B`` as
``lora_down``/``lora_up``. The dotted paths are kept beside the names
(``paths``: name → module path), so the file is written back in diffusers' own format.

Writing folds a module's ``alpha / rank`` into ``lora_B`` (computed in float32), because the
format has no alpha: ΔW = B·A exactly, as diffusers, peft and ComfyUI read it.

This module imports no torch at import time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import CharfwError

if TYPE_CHECKING:
    import torch

#: the file's part → the kohya-style prefix charfw's tools use for it
PEFT_PARTS = {"transformer": "lora_transformer", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
#: peft's factor names → kohya's
PEFT_SUFFIXES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
KOHYA_TO_PEFT = {v: k for k, v in PEFT_SUFFIXES.items()}


def is_peft(keys: object) -> bool:
    """Whether a file's keys are diffusers/peft LoRA keys (``….lora_A.weight``)."""
    return any(str(k).endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)  # type: ignore[attr-defined]


def internal_name(module_path: str) -> str | None:
    """``transformer.transformer_blocks.0.attn.to_q`` → ``lora_transformer_transformer_blocks_0_attn_to_q``
    (None for a part charfw does not know)."""
    part, _, rest = module_path.partition(".")
    prefix = PEFT_PARTS.get(part)
    if prefix is None or not rest:
        return None
    return f"{prefix}_{rest.replace('.', '_')}"


def from_peft(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A peft-format state dict → (tensors under kohya-style keys, name → module path).

    Keys of parts charfw does not know, and tensors other than the factors and an
    ``alpha``, keep their keys (the file reader then keeps them as unknown keys)."""
    out: dict[str, torch.Tensor] = {}
    paths: dict[str, str] = {}
    for key, value in tensors.items():
        module, suffix = _split(key)
        name = internal_name(module) if suffix is not None else None
        if name is None or suffix is None:
            out[key] = value
            continue
        out[f"{name}.{PEFT_SUFFIXES.get(suffix, suffix)}"] = value
        paths[name] = module
    return out, paths


def _times(t: Any, ratio: float) -> Any:
    """``t × ratio`` computed in float32, stored in ``t``'s dtype."""
    if hasattr(t, "float"):  # a torch tensor
        return (t.float() * ratio).to(t.dtype)
    from .safetensors_io import scaled

    return scaled(t, ratio)


def _split(key: str) -> tuple[str, str | None]:
    for suffix in (*PEFT_SUFFIXES, "alpha"):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return key, None


def to_peft(tensors: Mapping[str, Any], paths: Mapping[str, str]) -> dict[str, Any]:
    """Kohya-style LoRA tensors (torch tensors or numpy arrays) → diffusers' peft keys, each
    module's scale folded into ``lora_B``. A module with no known path, or of another type
    than LoRA, is an error: the format holds plain LoRA factors only."""
    by_module: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        by_module.setdefault(name, {})[suffix] = value
    out: dict[str, Any] = {}
    for name, parts in by_module.items():
        path = paths.get(name)
        if path is None:
            raise CharfwError(f"module {name} has no diffusers name, so it cannot be written in diffusers' format")
        extra = sorted(set(parts) - {"lora_down.weight", "lora_up.weight", "alpha"})
        if extra or "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise CharfwError(f"module {name} holds {', '.join(sorted(parts))}; diffusers' LoRA format holds "
                              "lora_A/lora_B factors only (a plain LoRA)")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if len(down.shape) != 2 or len(up.shape) != 2:
            raise CharfwError(f"module {name} is not a Linear LoRA (shapes {list(up.shape)} / {list(down.shape)})")
        alpha = parts.get("alpha")
        alpha_value = None if alpha is None else float(alpha.reshape(-1)[0])
        scale = 1.0 if not alpha_value else alpha_value / down.shape[0]
        if scale != 1.0:
            up = _times(up, scale)
        out[f"{path}.lora_A.weight"] = down
        out[f"{path}.lora_B.weight"] = up
    return out
