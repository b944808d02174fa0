"""Single-file SD3 / SD 3.5 checkpoints (the layout Stability ships and ComfyUI loads).

One ``.safetensors`` holds everything under these prefixes:

=====================================  ==============================================
``model.diffusion_model.``             the MMDiT in its native names (``joint_blocks.N.x_block.attn.qkv``,
                                       ``…context_block.mlp.fc1``, ``x_embedder``, ``t_embedder``,
                                       ``y_embedder``, ``final_layer``…)
``first_stage_model.``                 the VAE (LDM names, as SD 1.x)
``text_encoders.clip_l.transformer.``  CLIP-L (``text_model.*``; no projection: the identity)
``text_encoders.clip_g.transformer.``  CLIP-G (``text_model.*``, ``text_projection.weight``)
``text_encoders.t5xxl.transformer.``   T5-XXL (``shared.weight``, ``encoder.*``), optional
=====================================  ==============================================

Stability ships SD 3.5's file without the text encoders (``text_encoders/clip_l.safetensors``,
``clip_g.safetensors``, ``t5xxl_fp16.safetensors`` beside it, in transformers' key names);
such files are found beside the checkpoint, in its ``text_encoders/`` folder or in
ComfyUI's ``models/clip`` / ``models/text_encoders``.

Reading: the transformer and the VAE go through diffusers' own converters
(``from_single_file`` with the configs charfw ships in ``model_configs/``: no download);
the text encoders are prefix strips. The config is chosen from the tensors
(:func:`detect_config`): joint-block count, context width, which blocks have ``attn2``,
the position table's size. Writing (:func:`save_checkpoint`) is the exact inverse of
diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` (q/k/v fused back into
``qkv``, the last block's and the final layer's adaLN halves swapped back to SD3's
shift-scale order), so the tiny model exported with ``charfw export-model`` loads back
through the path a user's checkpoint takes, to identical outputs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CharfwError
from .single_file import VAE_PREFIX, read_state_dict, tensor_shapes, vae_to_ldm, write_checkpoint

if TYPE_CHECKING:
    import torch

MMDIT_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."

#: one joint block: diffusers module → native module (q/k/v are handled apart: fused qkv)
_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
#: fused projections: native module → its three diffusers parts, in row order
_QKV = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}
#: outside the blocks
_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous is (scale, shift), SD3's (shift, scale): the same
    swap both ways."""
    import torch

    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def transformer_to_native(state: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """A diffusers ``SD3Transformer2DModel`` state dict → SD3's native names (no prefix)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state[key]

    out["pos_embed"] = take("pos_embed.pos_embed")
    for diffusers, native in _TOP.items():
        for leaf in ("weight", "bias"):
            key = f"{diffusers}.{leaf}"
            if key in state:
                value = take(key)
                out[f"{native}.{leaf}"] = _swap_halves(value) if diffusers == "norm_out.linear" else value
    for i in range(num_layers):
        block = f"transformer_blocks.{i}."
        last = i == num_layers - 1
        for native, parts in _QKV.items():
            for leaf in ("weight", "bias"):
                keys = [f"{block}{p}.{leaf}" for p in parts]
                if all(k in state for k in keys):
                    out[f"joint_blocks.{i}.{native}.{leaf}"] = torch.cat([take(k) for k in keys], dim=0)
        for diffusers, native in _BLOCK.items():
            for leaf in ("weight", "bias"):
                key = f"{block}{diffusers}.{leaf}"
                if key in state:
                    value = take(key)
                    if last and diffusers == "norm1_context.linear":
                        value = _swap_halves(value)
                    out[f"joint_blocks.{i}.{native}.{leaf}"] = value
    missing = sorted(set(state) - used)
    if missing:
        raise CharfwError(f"cannot write an SD3 checkpoint: no native name for {missing[0]} ({len(missing)} tensors)")
    return out


def to_checkpoint(transformer: Any, vae: Any, text_encoders: list[Any]) -> dict[str, torch.Tensor]:
    """The parts of a loaded SD3 model as one native state dict (T5 when given as the third
    text encoder)."""
    import torch

    out = {MMDIT_PREFIX + k: v for k, v in
           transformer_to_native(transformer.state_dict(), int(transformer.config.num_layers)).items()}
    out.update(vae_to_ldm(vae.state_dict(), vae.config))
    clip_l, clip_g = text_encoders[0], text_encoders[1]
    for key, value in clip_l.state_dict().items():
        if key == "text_projection.weight":
            if not torch.equal(value, torch.eye(value.shape[0], dtype=value.dtype, device=value.device)):
                raise CharfwError("CLIP-L's projection is not the identity, which SD3 checkpoints cannot hold")
            continue  # SD3 files hold none (diffusers reads the identity)
        out[CLIP_L_PREFIX + key] = value
    for key, value in clip_g.state_dict().items():
        out[CLIP_G_PREFIX + key] = value
    if len(text_encoders) > 2 and text_encoders[2] is not None:
        for key, value in text_encoders[2].state_dict().items():
            if key != "encoder.embed_tokens.weight":  # tied to shared.weight
                out[T5_PREFIX + key] = value
    return out


def save_checkpoint(dest: str | Path, transformer: Any, vae: Any, text_encoders: list[Any], *,
                    dtype: torch.dtype | None = None) -> Path:
    """Write a loaded SD3 model as one native-layout ``.safetensors`` file."""
    return write_checkpoint(dest, to_checkpoint(transformer, vae, text_encoders), dtype=dtype)


# --- reading -----------------------------------------------------------------------------


def shipped_configs() -> dict[str, Path]:
    """SD3-family config folders shipped with charfw, by name (``sd35-medium``, ``sd35-large``,
    ``tiny-sd35``)."""
    root = Path(__file__).parent / "model_configs"
    return {p.name: p for p in sorted(root.iterdir()) if (p / "transformer" / "config.json").is_file()}


def _signature(num_layers: int, caption_dim: int, dual: tuple[int, ...], positions: int) -> tuple[Any, ...]:
    return (num_layers, caption_dim, dual, positions)


def detect_config(shapes: Mapping[str, list[int]], *, path: Path) -> Path:
    """The shipped config folder that fits an SD3 checkpoint's tensors; a one-line error
    naming what was found when none does."""
    import re

    joint = re.compile(r"^model\.diffusion_model\.joint_blocks\.(\d+)\.")
    blocks = {int(m[1]) for k in shapes if (m := joint.match(k))}
    if not blocks:
        raise CharfwError("not an SD3 checkpoint (no model.diffusion_model.joint_blocks.* weights)", path=path)
    depth = max(blocks) + 1
    dual = tuple(sorted({int(m[1]) for k in shapes if (m := joint.match(k)) and ".attn2." in k}))
    caption = shapes.get(MMDIT_PREFIX + "context_embedder.weight", [0])[0]
    positions = shapes.get(MMDIT_PREFIX + "pos_embed", [0, 0])[1]
    found = _signature(depth, caption, dual, positions)
    for config_dir in shipped_configs().values():
        c = json.loads((config_dir / "transformer" / "config.json").read_text("utf-8"))
        heads, head_dim = c["num_attention_heads"], c["attention_head_dim"]
        if _signature(c["num_layers"], c.get("caption_projection_dim") or heads * head_dim,
                      tuple(c.get("dual_attention_layers") or ()), c["pos_embed_max_size"] ** 2) == found:
            return config_dir
    raise CharfwError(f"unknown SD3 layout ({depth} joint blocks, width {caption}, attn2 in {len(dual)} blocks, "
                      f"{positions} positions); charfw knows SD 3.5 Medium and Large", path=path)


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k.endswith("position_ids")}


def load_clip(state: Mapping[str, torch.Tensor], prefix: str, config_dir: Path, subfolder: str, *, path: Path) -> Any:
    """A ``CLIPTextModelWithProjection`` from its prefix. SD3 conditions on CLIP-L's pooled
    output unprojected (its reference code and ComfyUI; diffusers reads SD3 files with an
    identity projection), so CLIP-L (``text_encoder``) gets the identity even from a
    stand-alone ``clip_l.safetensors`` that carries OpenAI's projection."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(config_dir / subfolder)))
    weights = _strip(state, prefix)
    if subfolder == "text_encoder" or "text_projection.weight" not in weights:
        weights["text_projection.weight"] = torch.eye(model.config.hidden_size)
    missing = sorted(set(model.state_dict()) - set(weights))
    if missing:
        raise CharfwError(f"the {subfolder} text encoder is incomplete ({len(missing)} tensors missing, "
                          f"e.g. {prefix}{missing[0]})", path=path)
    model.load_state_dict(weights, strict=False)
    return model


def load_t5(state: Mapping[str, torch.Tensor], config_dir: Path, *, prefix: str = T5_PREFIX, path: Path) -> Any:
    from transformers import T5Config, T5EncoderModel

    weights = _strip(state, prefix)
    if "shared.weight" not in weights:
        raise CharfwError("this checkpoint holds no T5 text encoder (text_encoders.t5xxl.*)", path=path,
                          hint="train without t5, or use a checkpoint or diffusers folder that has it")
    model = T5EncoderModel(T5Config.from_pretrained(str(config_dir / "text_encoder_3")))
    weights.setdefault("encoder.embed_tokens.weight", weights["shared.weight"])
    missing = sorted(set(model.state_dict()) - set(weights))
    if missing:
        raise CharfwError(f"the T5 text encoder is incomplete ({len(missing)} tensors missing)", path=path)
    model.load_state_dict(weights, strict=False)
    return model


def _read_parts(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file whose names start with one of ``prefixes``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys() if k.startswith(prefixes)}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # a damaged file: safetensors raises its own error types
        raise CharfwError(f"cannot read this checkpoint ({type(exc).__name__}: {str(exc)[:200]})", path=path) from None


def load_checkpoint(path: Path, *, t5: bool) -> tuple[Path, dict[str, Any]]:
    """The parts of an SD3 single file: (the shipped config folder used, parts by diffusers
    component name: transformer, vae, text_encoder, text_encoder_2[, text_encoder_3])."""
    import torch
    from diffusers import SD3Transformer2DModel

    from .single_file import load_vae

    shapes = tensor_shapes(path) if path.suffix.lower() == ".safetensors" else None
    # T5-XXL is most of a full checkpoint (about 9.5 GB in fp16): a safetensors file's tensors
    # are read only for the parts that are loaded
    wanted = (MMDIT_PREFIX, VAE_PREFIX, CLIP_L_PREFIX, CLIP_G_PREFIX, *((T5_PREFIX,) if t5 else ()))
    state = _read_parts(path, wanted) if shapes is not None else read_state_dict(path)
    if shapes is None:
        shapes = {k: list(v.shape) for k, v in state.items()}
    config_dir = detect_config(shapes, path=path)
    mmdit = {k: v for k, v in state.items() if k.startswith(MMDIT_PREFIX)}
    try:
        transformer = SD3Transformer2DModel.from_single_file(mmdit, config=str(config_dir), subfolder="transformer",
                                                             local_files_only=True)
    except Exception as exc:
        raise CharfwError(f"cannot load the SD3 transformer ({type(exc).__name__}: {str(exc)[:200]})",
                          path=path) from None
    del mmdit
    with torch.no_grad():  # the converter's q/k/v are views into the fused qkv: give each its own,
        for param in transformer.parameters():  # aligned memory, so the kernels (and results) are the folder's
            param.data = param.data.clone()
    parts: dict[str, Any] = {"transformer": transformer}
    if any(k.startswith(VAE_PREFIX) for k in state):  # else the manifest's model.vae must give one
        parts["vae"] = load_vae(path, config_dir, state={k: v for k, v in state.items() if k.startswith(VAE_PREFIX)})
    encoders = [("text_encoder", "CLIP-L", CLIP_L_PREFIX, "clip_l"), ("text_encoder_2", "CLIP-G", CLIP_G_PREFIX, "clip_g")]
    if t5:
        encoders.append(("text_encoder_3", "T5-XXL", T5_PREFIX, "t5xxl"))
    for part, label, prefix, stem in encoders:
        weights, found_prefix, where = _encoder_weights(state, prefix, stem, label, path)
        if part == "text_encoder_3":
            parts[part] = load_t5(weights, config_dir, prefix=found_prefix, path=where)
        else:
            parts[part] = load_clip(weights, found_prefix, config_dir, part, path=where)
    return config_dir, parts


def _encoder_weights(state: Mapping[str, torch.Tensor], prefix: str, stem: str, label: str,
                     path: Path) -> tuple[Mapping[str, torch.Tensor], str, Path]:
    """A text encoder's weights: in the checkpoint under ``prefix``, or, as Stability ships
    SD 3.5 (the checkpoint without them), a ``<stem>*.safetensors`` file beside it, in a
    ``text_encoders/`` folder beside it, or in ComfyUI's ``models/clip`` or
    ``models/text_encoders`` next to its ``models/checkpoints``: (weights, their prefix, file)."""
    if any(k.startswith(prefix) for k in state):
        return state, prefix, path
    folders = [path.parent, path.parent / "text_encoders", path.parent.parent / "clip",
               path.parent.parent / "text_encoders"]
    for folder in folders:
        for candidate in sorted(folder.glob(f"{stem}*.safetensors")) if folder.is_dir() else []:
            weights = _read_parts(candidate, ("",))
            for found_prefix in (prefix, "transformer.", ""):
                if found_prefix and any(k.startswith(found_prefix) for k in weights):
                    return weights, found_prefix, candidate
            return weights, "", candidate
    looked = ", ".join(str(f) for f in folders[:2]) + ", ../clip, ../text_encoders"
    raise CharfwError(f"this checkpoint has no {label} text encoder ({prefix}*), and no {stem}*.safetensors "
                      f"was found beside it ({looked})", path=path,
                      hint=f"put Stability's text_encoders/{stem}*.safetensors beside the checkpoint, "
                           "or use the model's diffusers folder")


# --- LoRAs in SD3's native names ------------------------------------------------------------


def native_lora_names(num_layers: int) -> dict[str, list[tuple[str, int, int]]]:
    """kohya's / ComfyUI's SD3 LoRA module names (``lora_unet_joint_blocks_N_x_block_attn_qkv``)
    → the diffusers layers they change, as charfw names them
    (``lora_transformer_transformer_blocks_N_attn_to_q``), each with its part of the native
    layer's rows as (part, of parts): a fused ``qkv`` is three layers' rows."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    for i in range(num_layers):
        native_prefix, ours = f"lora_unet_joint_blocks_{i}_", f"lora_transformer_transformer_blocks_{i}_"
        for diffusers, native in _BLOCK.items():
            out[native_prefix + native.replace(".", "_")] = [(ours + diffusers.replace(".", "_"), 0, 1)]
        for native, parts in _QKV.items():
            out[native_prefix + native.replace(".", "_")] = [
                (ours + p.replace(".", "_"), n, 3) for n, p in enumerate(parts)]
    return out


def native_lora_to_diffusers(lora: Any, num_layers: int) -> Any:
    """A :class:`~charfw.lora.file.LoraFile` whose transformer modules use SD3's native names
    as one on the diffusers layers, exactly: a fused ``qkv`` module becomes three (a LoRA's
    ``lora_up`` rows split, its ``lora_down`` and alpha shared: ``ΔW_q = up[:D]·down``; other
    types as their dense ΔW rows), and the last block's context adaLN gets its two halves
    swapped (SD3's shift-scale order, diffusers' scale-shift). Text-encoder modules
    (``lora_te1_``/``lora_te2_``) already have charfw's names; other native modules (the
    embedders, the final layer) keep theirs, so applying them is an error that names them."""
    import torch

    from ..lora.file import LoraModule

    names = native_lora_names(num_layers)
    last_context = f"lora_unet_joint_blocks_{num_layers - 1}_context_block_adaLN_modulation_1"
    modules = []
    for module in lora.modules.values():
        targets = names.get(module.name)
        if targets is None:
            modules.append(module)
            continue
        rows = module.shape[0] // targets[0][2]
        for name, part, _ in targets:
            rows_of = slice(part * rows, (part + 1) * rows)
            if module.kind == "lora" and "lora_mid.weight" not in module.tensors and len(module.shape) == 2:
                up = module.tensors["lora_up.weight"][rows_of]
                if module.name == last_context:
                    up = torch.cat(up.chunk(2, dim=0)[::-1], dim=0)
                arrays = {**module.tensors, "lora_up.weight": up}
                modules.append(LoraModule(name, "lora", arrays, (rows, *module.shape[1:])))
                continue
            delta = module.delta().reshape(module.shape[0], -1)[rows_of]
            if module.name == last_context:
                delta = torch.cat(delta.chunk(2, dim=0)[::-1], dim=0)
            modules.append(LoraModule(name, "full", {"diff": delta.reshape(rows, *module.shape[1:])},
                                      (rows, *module.shape[1:])))
    return lora.with_modules(modules)
