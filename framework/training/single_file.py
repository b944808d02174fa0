"""Single-file SD 1.x checkpoints (the ``.safetensors`` / ``.ckpt`` layout A1111 and ComfyUI use).

Users hold base models as one file in the original latent-diffusion ("LDM") layout:
``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and
``cond_stage_model.transformer.text_model.*`` (CLIP text encoder). charfw reads them
without the network:

* the layout is recognised from a few tensor shapes, and the matching model configs
  shipped in ``model_configs/`` are used (no download of ``v1-inference.yaml`` or the
  CLIP config);
* the UNet and the VAE go through diffusers' own converters
  (``from_single_file(config=<shipped folder>)``), the text encoder is a prefix strip.

Writing goes the other way (:func:`save_checkpoint`), so that the tiny test model can be
exported as the kind of file users have and loaded back through the same path as theirs.
The key mapping is a table of module prefixes (:func:`unet_prefix_map`,
:func:`vae_prefix_map`) plus the few leaf renames where LDM names differ.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charfw.build.atomic import atomic_path

from ..errors import CharfwError

if TYPE_CHECKING:
    import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_MARKER = "conditioner.embedders."

#: UNet resnet leaves: diffusers name -> LDM name
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
#: VAE resnet leaves differ only in the shortcut
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
#: VAE mid-block attention: diffusers Linear layers are 1x1 convs in LDM
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


@dataclass(frozen=True)
class PrefixRule:
    """Module ``diffusers`` is stored as ``ldm``; leaves named in ``leaves`` are renamed."""

    diffusers: str
    ldm: str
    leaves: Mapping[str, str] | None = None


def unet_prefix_map(config: Mapping[str, Any]) -> list[PrefixRule]:
    """Where each UNet module of a diffusers SD 1.x UNet lives in the LDM layout.

    LDM numbers its blocks flat: ``input_blocks.0`` is ``conv_in``, then each down block
    contributes ``layers_per_block`` (resnet [+ attention]) entries and one downsampler
    entry; ``output_blocks`` hold ``layers_per_block + 1`` entries per up block, the last
    one carrying the upsampler after the resnet (and attention, if any).
    """
    per = int(config["layers_per_block"])
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    rules = [
        PrefixRule("time_embedding.linear_1", "time_embed.0"),
        PrefixRule("time_embedding.linear_2", "time_embed.2"),
        PrefixRule("conv_in", "input_blocks.0.0"),
        PrefixRule("conv_norm_out", "out.0"),
        PrefixRule("conv_out", "out.2"),
        PrefixRule("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
        PrefixRule("mid_block.attentions.0", "middle_block.1"),
        PrefixRule("mid_block.resnets.1", "middle_block.2", _UNET_RESNET),
    ]
    if config.get("addition_embed_type") == "text_time":  # SDXL's pooled-text and size embedding
        rules += [PrefixRule("add_embedding.linear_1", "label_emb.0.0"),
                  PrefixRule("add_embedding.linear_2", "label_emb.0.2")]
    for i, kind in enumerate(down_types):
        for j in range(per):
            flat = i * (per + 1) + j + 1
            rules.append(PrefixRule(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{flat}.0", _UNET_RESNET))
            if kind.startswith("CrossAttn"):
                rules.append(PrefixRule(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{flat}.1"))
        if i < len(down_types) - 1:
            rules.append(PrefixRule(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (per + 1)}.0.op"))
    for i, kind in enumerate(up_types):
        attention = kind.startswith("CrossAttn")
        for j in range(per + 1):
            flat = i * (per + 1) + j
            rules.append(PrefixRule(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{flat}.0", _UNET_RESNET))
            if attention:
                rules.append(PrefixRule(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{flat}.1"))
        if i < len(up_types) - 1:
            last = i * (per + 1) + per
            rules.append(PrefixRule(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{last}.{2 if attention else 1}.conv"))
    return rules


def vae_prefix_map(config: Mapping[str, Any]) -> list[PrefixRule]:
    """Where each VAE module lives in the LDM layout (the decoder's levels count backwards)."""
    levels = len(config["down_block_types"])
    per = int(config["layers_per_block"])
    rules = [PrefixRule("quant_conv", "quant_conv"), PrefixRule("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        rules += [
            PrefixRule(f"{part}.conv_in", f"{part}.conv_in"),
            PrefixRule(f"{part}.conv_out", f"{part}.conv_out"),
            PrefixRule(f"{part}.conv_norm_out", f"{part}.norm_out"),
            PrefixRule(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
            PrefixRule(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET),
            PrefixRule(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION),
        ]
    for i in range(levels):
        for j in range(per):
            rules.append(PrefixRule(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET))
        if i < levels - 1:
            rules.append(PrefixRule(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
        # decoder up block i is LDM's up level (levels - 1 - i), with one more resnet
        for j in range(per + 1):
            rules.append(PrefixRule(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{levels - 1 - i}.block.{j}", _VAE_RESNET))
        if i < levels - 1:
            rules.append(PrefixRule(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{levels - 1 - i}.upsample.conv"))
    return rules


def _rename(key: str, rules: Iterable[PrefixRule]) -> str:
    best: PrefixRule | None = None
    for rule in rules:
        if key.startswith(rule.diffusers + ".") and (best is None or len(rule.diffusers) > len(best.diffusers)):
            best = rule
    if best is None:
        raise KeyError(key)
    rest = key[len(best.diffusers) + 1 :]
    for old, new in (best.leaves or {}).items():
        if rest.startswith(old + "."):
            rest = new + rest[len(old) :]
            break
    return f"{best.ldm}.{rest}"


def vae_to_ldm(vae: Mapping[str, torch.Tensor], vae_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict → LDM keys under ``first_stage_model.``
    (SD 1.x, SDXL and SD3 checkpoints store their VAE alike)."""
    out: dict[str, torch.Tensor] = {}
    vae_rules = vae_prefix_map(vae_config)
    for key, value in vae.items():
        new = _rename(key, vae_rules)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out[VAE_PREFIX + new] = value
    return out


def to_ldm(
    unet: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae: Mapping[str, torch.Tensor],
    vae_config: Mapping[str, Any],
    text_encoder: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """diffusers/transformers state dicts → one LDM-layout state dict."""
    import torch

    out: dict[str, torch.Tensor] = {}
    unet_rules = unet_prefix_map(unet_config)
    for key, value in unet.items():
        out[UNET_PREFIX + _rename(key, unet_rules)] = value
    out.update(vae_to_ldm(vae, vae_config))
    for key, value in text_encoder.items():
        # transformers >= 5 dropped the `text_model.` level of CLIPTextModel; LDM keeps it
        out[TEXT_PREFIX + key.removeprefix("text_model.")] = value
    positions = out[TEXT_PREFIX + "embeddings.position_embedding.weight"].shape[0]
    out[TEXT_PREFIX + "embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    return out


def save_checkpoint(dest: str | Path, unet: Any, vae: Any, text_encoder: Any, *, dtype: torch.dtype | None = None) -> Path:
    """Write diffusers/transformers models as one LDM-layout ``.safetensors`` file."""
    state = to_ldm(unet.state_dict(), unet.config, vae.state_dict(), vae.config, text_encoder.state_dict())
    return write_checkpoint(dest, state, dtype=dtype)


def write_checkpoint(dest: str | Path, state: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None) -> Path:
    """A checkpoint's state dict as one ``.safetensors`` file, atomically (floating-point
    tensors cast to ``dtype`` when given)."""
    from safetensors.torch import save_file

    out = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
           for k, v in state.items()}
    dest = Path(dest)
    with atomic_path(dest, fsync=True) as tmp:
        save_file(out, str(tmp), metadata={"format": "pt"})
    return dest


# --- reading -----------------------------------------------------------------------------


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor names and shapes of a ``.safetensors`` file, from its header alone."""
    import struct

    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CharfwError("not a safetensors file (too short)", path=path)
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * 1024 * 1024:
            raise CharfwError("not a safetensors file (header size is implausible)", path=path)
        try:
            header = json.loads(fh.read(size))
        except ValueError:
            raise CharfwError("not a safetensors file (the header is not JSON)", path=path) from None
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


@dataclass(frozen=True)
class Layout:
    """What a single-file checkpoint holds: which shipped config fits it."""

    config: str
    family: str


def detect_layout(shapes: Mapping[str, list[int]], *, path: Path) -> Layout:
    """Recognise an SD 1.x single file from its tensor shapes; clear errors for the rest."""
    if any(k.startswith(SDXL_MARKER) for k in shapes):
        raise CharfwError("this is an SDXL checkpoint; charfw trains SD 1.x models so far", path=path,
                          hint="use an SD 1.5-based model (SDXL support is planned behind the same model interface)")
    if any(k.startswith(SD2_TEXT_PREFIX) for k in shapes):
        raise CharfwError("this is an SD 2.x checkpoint (OpenCLIP text encoder); charfw trains SD 1.x models so far",
                          path=path)
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise CharfwError("not a Stable Diffusion checkpoint (no model.diffusion_model.* UNet weights)", path=path,
                          hint="give a full model file, a diffusers folder or a Hugging Face id")
    width = conv_in[0]
    for name, config_dir in shipped_configs().items():
        unet_config = json.loads((config_dir / "unet" / "config.json").read_text("utf-8"))
        if unet_config["block_out_channels"][0] == width and unet_config["in_channels"] == conv_in[1]:
            return Layout(name, "sd1")
    raise CharfwError(f"unknown SD 1.x layout (the UNet's first layer has {width} channels)", path=path)


def shipped_configs(pipeline: str = "StableDiffusionPipeline") -> dict[str, Path]:
    """Config folders shipped with charfw for one diffusers pipeline class, by name
    (``sd15``, ``tiny-sd15``; ``StableDiffusionXLPipeline``: ``sdxl``, ``tiny-sdxl``)."""
    root = Path(__file__).parent / "model_configs"
    found = {}
    for p in sorted(root.iterdir()):
        index = p / "model_index.json"
        if (p / "unet" / "config.json").is_file() and index.is_file() and \
                json.loads(index.read_text("utf-8")).get("_class_name") == pipeline:
            found[p.name] = p
    return found


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` or pickle ``.ckpt``/``.pt`` file (weights only)."""
    import torch

    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CharfwError(f"cannot read this checkpoint safely ({type(exc).__name__}: {str(exc)[:200]})", path=path,
                          hint="convert it to .safetensors (pickle files can run code, so charfw only reads plain tensors)") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise CharfwError("this checkpoint holds no state dict", path=path)
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def load_text_encoder(state: Mapping[str, torch.Tensor], config_dir: Path, *, path: Path) -> Any:
    """The CLIP text encoder of an LDM state dict, for the installed transformers."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_pretrained(str(config_dir / "text_encoder"))
    model = CLIPTextModel(config)
    expected = model.state_dict()
    flattened = "embeddings.token_embedding.weight" in expected
    converted = {}
    for key, value in state.items():
        if key.startswith(TEXT_PREFIX) and not key.endswith("position_ids"):
            rest = key[len(TEXT_PREFIX) :]
            converted[rest if flattened else "text_model." + rest] = value
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise CharfwError(f"the text encoder is incomplete ({len(missing)} tensors missing, e.g. {missing[0]})", path=path)
    model.load_state_dict(converted, strict=True)
    return model


def load_vae(path: Path, config_dir: Path, *, state: Mapping[str, torch.Tensor] | None = None) -> Any:
    """An ``AutoencoderKL`` from a single file (a full checkpoint or a VAE-only file such as
    ``kl-f8-anime2.ckpt``), converted by diffusers with the shipped config."""
    from diffusers import AutoencoderKL

    if state is None:
        state = read_state_dict(path)
    if not any(k.startswith(VAE_PREFIX) for k in state):
        # VAE-only files store the autoencoder's keys without the prefix
        state = {VAE_PREFIX + k: v for k, v in state.items() if k.startswith(("encoder.", "decoder.", "quant_conv", "post_quant_conv"))}
    if not state:
        raise CharfwError("no VAE weights in this file", path=path)
    try:
        return AutoencoderKL.from_single_file(dict(state), config=str(config_dir), subfolder="vae", local_files_only=True)
    except CharfwError:
        raise
    except Exception as exc:
        raise CharfwError(f"cannot load the VAE ({type(exc).__name__}: {str(exc)[:200]})", path=path) from None


def load_unet(state: Mapping[str, torch.Tensor], config_dir: Path, *, path: Path) -> Any:
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel.from_single_file(dict(state), config=str(config_dir), subfolder="unet",
                                                     local_files_only=True)
    except Exception as exc:
        raise CharfwError(f"cannot load the UNet ({type(exc).__name__}: {str(exc)[:200]})", path=path) from None
