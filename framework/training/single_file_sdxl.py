"""Single-file SDXL checkpoints: Stability AI's SGM layout, read and written without the network.

The files people hold SDXL models in (SDXL base, Illustrious, NoobAI, Pony, Animagine)
are one ``.safetensors`` in the layout of Stability AI's ``generative-models`` (SGM):

* ``model.diffusion_model.*``: the UNet with LDM block names (``input_blocks.4.1...``),
  its pooled-text and size embedding as ``label_emb.0.0`` / ``label_emb.0.2``;
* ``first_stage_model.*``: the VAE (LDM names, as SD 1.x);
* ``conditioner.embedders.0.transformer.text_model.*``: CLIP ViT-L, in transformers' names;
* ``conditioner.embedders.1.model.*``: OpenCLIP ViT-bigG in open_clip's own layout
  (``transformer.resblocks.N.attn.in_proj_weight`` holding q, k and v stacked,
  ``ln_1``/``ln_2``, ``mlp.c_fc``/``mlp.c_proj``, ``positional_embedding``, ``ln_final``,
  ``text_projection`` as a matrix the pooled vector is multiplied by, ``logit_scale``).

Reading: the UNet and the VAE go through diffusers' converters with the configs shipped in
``model_configs/sdxl`` (or ``tiny-sdxl``), picked by the UNet's first width; CLIP-L through
diffusers' LDM-CLIP prefix strip, OpenCLIP-G through diffusers' ``convert_open_clip_checkpoint``;
every text-encoder tensor must be there (a strict load). Writing goes the other way
(:func:`to_sgm`), so ``charfw export-model charfw:tiny-sdxl x.safetensors`` makes the kind
of file users have, and loading it back runs the code a real checkpoint runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CharfwError
from . import single_file

if TYPE_CHECKING:
    import torch

TE1_PREFIX = "conditioner.embedders.0.transformer.text_model."
TE2_PREFIX = "conditioner.embedders.1.model."
PIPELINE = "StableDiffusionXLPipeline"
#: a trained CLIP's logit scale, clamped at ln(100) by open_clip; no loader reads it
LOGIT_SCALE = math.log(100.0)

#: per layer: transformers' CLIP names -> open_clip's (besides the stacked q/k/v)
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def open_clip_state(text_encoder: Any) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModelWithProjection``'s weights in open_clip's layout (no prefix)."""
    import torch

    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for key, name in _OPEN_CLIP_TOP.items():
        out[name] = state[key]
    out["text_projection"] = state["text_projection.weight"].T.contiguous()
    out["logit_scale"] = torch.tensor(LOGIT_SCALE)
    for n in range(text_encoder.config.num_hidden_layers):
        src, dst = f"encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for part in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{part}"] = torch.cat(
                [state[f"{src}self_attn.{p}_proj.{part}"] for p in ("q", "k", "v")])
        for old, new in _OPEN_CLIP_LAYER.items():
            for part in ("weight", "bias"):
                out[f"{dst}{new}.{part}"] = state[f"{src}{old}.{part}"]
    return out


def to_sgm(unet: Any, vae: Any, text_encoder: Any, text_encoder_2: Any) -> dict[str, torch.Tensor]:
    """diffusers/transformers SDXL parts → one SGM-layout state dict."""
    import torch

    out: dict[str, torch.Tensor] = {}
    rules = single_file.unet_prefix_map(unet.config)
    for key, value in unet.state_dict().items():
        out[single_file.UNET_PREFIX + single_file._rename(key, rules)] = value
    out.update(single_file.vae_to_ldm(vae.state_dict(), vae.config))
    for key, value in text_encoder.state_dict().items():
        out[TE1_PREFIX + key.removeprefix("text_model.")] = value
    positions = out[TE1_PREFIX + "embeddings.position_embedding.weight"].shape[0]
    out[TE1_PREFIX + "embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    for key, value in open_clip_state(text_encoder_2).items():
        out[TE2_PREFIX + key] = value
    return out


def save_checkpoint(dest: str | Path, unet: Any, vae: Any, text_encoders: list[Any], *,
                    dtype: torch.dtype | None = None) -> Path:
    """Write SDXL parts as one SGM-layout ``.safetensors`` file."""
    return single_file.write_checkpoint(dest, to_sgm(unet, vae, *text_encoders), dtype=dtype)


# --- reading -----------------------------------------------------------------------------


def detect_config(shapes: Mapping[str, list[int]], *, path: Path) -> Path:
    """The shipped SDXL config folder whose UNet fits the file; one-line errors otherwise."""
    conv_in = shapes.get(single_file.UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise CharfwError("not an SDXL checkpoint (no model.diffusion_model.* UNet weights)", path=path,
                          hint="give a full model file, a diffusers folder or a Hugging Face id")
    if not any(k.startswith(TE2_PREFIX) for k in shapes):
        raise CharfwError("this SDXL checkpoint has no OpenCLIP-G text encoder (conditioner.embedders.1.model.*); "
                          "refiner and UNet-only files cannot be trained", path=path)
    for config_dir in single_file.shipped_configs(PIPELINE).values():
        config = json.loads((config_dir / "unet" / "config.json").read_text("utf-8"))
        if config["block_out_channels"][0] == conv_in[0] and config["in_channels"] == conv_in[1]:
            return config_dir
    raise CharfwError(f"unknown SDXL layout (the UNet's first layer has {conv_in[0]} channels)", path=path)


def _strict_load(model: Any, state: dict[str, torch.Tensor], what: str, path: Path) -> Any:
    if not hasattr(model, "text_model"):  # transformers >= 5 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise CharfwError(f"the {what} is incomplete ({len(missing)} tensors missing, e.g. {missing[0]})", path=path)
    extra = sorted(set(state) - expected)
    if extra:
        raise CharfwError(f"the {what} has tensors of another layout (e.g. {extra[0]})", path=path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CharfwError(f"the {what} does not fit its config ({str(exc).splitlines()[0][:200]})", path=path) from None
    return model


def load_text_encoders(state: Mapping[str, torch.Tensor], config_dir: Path, *, path: Path) -> list[Any]:
    """CLIP-L and OpenCLIP-G (as ``CLIPTextModelWithProjection``) from an SGM state dict."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    first = CLIPTextModel(CLIPTextConfig.from_pretrained(str(config_dir / "text_encoder")))
    te1 = {k: v for k, v in state.items() if k.startswith(TE1_PREFIX)}
    _strict_load(first, convert_ldm_clip_checkpoint(te1), "CLIP-L text encoder", path)
    second = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(config_dir / "text_encoder_2")))
    te2 = {k: v for k, v in state.items() if k.startswith(TE2_PREFIX) and not k.endswith("logit_scale")}
    _strict_load(second, convert_open_clip_checkpoint(second, te2, prefix=TE2_PREFIX), "OpenCLIP-G text encoder", path)
    return [first.eval(), second.eval()]


def load_checkpoint(path: Path) -> tuple[Path, dict[str, Any]]:
    """Every part of an SGM single file: (the shipped config folder used, parts by name)."""
    shapes = single_file.tensor_shapes(path) if path.suffix.lower() == ".safetensors" else None
    state = single_file.read_state_dict(path)
    config_dir = detect_config(shapes or {k: list(v.shape) for k, v in state.items()}, path=path)
    text_encoders = load_text_encoders(state, config_dir, path=path)  # the quick part first: a broken file fails fast
    parts = {
        "unet": single_file.load_unet(state, config_dir, path=path),
        "vae": single_file.load_vae(path, config_dir, state=state),
        "text_encoders": text_encoders,
    }
    return config_dir, parts
