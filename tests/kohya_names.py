"""Which layers of an SD 1.x/2.x pipeline a kohya LoRA targets, and their kohya names.

kohya (``networks/lora.py``) walks the model, and inside every module whose *class name* is
a target it wraps each child whose class name is ``Linear`` or ``Conv2d``:

* text encoder: ``CLIPAttention`` (``CLIPSdpaAttention``), ``CLIPMLP`` → q/k/v/out_proj, fc1, fc2
* UNet: ``Transformer2DModel`` → proj_in/out, attn1/attn2 to_q/k/v/out.0, ff.net.0.proj, ff.net.2
* with ``conv_dim`` (kohya's C3Lier, the method's ``Lora3x3``): ``ResnetBlock2D``,
  ``Downsample2D``, ``Upsample2D`` → conv1, conv2, time_emb_proj, conv_shortcut, samplers' conv
  (Linear and 1×1 convs then also get a module at ``network_dim``)

The name is ``lora_unet_`` / ``lora_te_`` + the module path with dots turned into underscores.
SD 1.x's UNet keeps diffusers' module tree, so a diffusers path gives kohya's name directly.
The text encoder keeps the ``text_model.`` level of transformers 4 even where transformers 5
dropped it from ``CLIPTextModel`` (``encoder.layers.0…``): A1111 and ComfyUI only recognise
``lora_te_text_model_encoder_layers_N_…``.

The walk itself is the trainer's (:mod:`charfw.training.networks.targets`); this module
describes its targets by path and weight shape, for the tests and the benchmark that make
files with the real inventory (SD 1.5 with conv: 72 + 192 + 22 + 14 + 50 = 350 modules).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from charfw.training.networks.targets import (
    TEXT_ENCODER_TARGETS,
    UNET_ATTENTION_TARGETS,
    find_targets,
    text_model_prefix,
)

#: the classes that join the targets with conv_dim
CONV_ONLY_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


@dataclass(frozen=True)
class Target:
    """One layer a LoRA module changes, described without the layer itself."""

    #: kohya's module name (the key prefix), e.g. ``lora_unet_mid_block_attentions_0_proj_in``
    name: str
    #: the layer's path inside its model (``mid_block.attentions.0.proj_in``), for get_submodule
    path: str
    #: "unet" or "text_encoder"
    model: str
    #: the layer's weight shape: (out, in) or (out, in, kh, kw)
    shape: tuple[int, ...]

    @property
    def is_conv(self) -> bool:
        return len(self.shape) == 4

    @property
    def is_3x3(self) -> bool:
        return self.is_conv and self.shape[2:] != (1, 1)


def _described(model: Any, root: str, **walk: Any) -> list[Target]:
    """The trainer's own target walk (:func:`~charfw.training.networks.targets.find_targets`),
    with each layer's path and weight shape instead of the layer."""
    paths = {id(m): p for p, m in model.named_modules()}
    return [Target(t.name, paths[id(t.layer)], root, tuple(int(n) for n in t.layer.weight.shape))
            for t in find_targets(model, root=root, **walk)]


def unet_targets(unet: Any, *, conv: bool = True) -> list[Target]:
    """kohya's targets in a diffusers SD 1.x/2.x UNet; ``conv`` adds the resnets and samplers
    (listed after the attention layers)."""
    targets = _described(unet, "unet", prefix="lora_unet", classes=UNET_ATTENTION_TARGETS, conv3x3=False)
    if conv:
        targets += _described(unet, "unet", prefix="lora_unet", classes=CONV_ONLY_TARGETS, conv3x3=True)
    return targets


def text_encoder_targets(text_encoder: Any, *, prefix: str = "lora_te") -> list[Target]:
    """kohya's targets in a transformers CLIP text model (``text_model.`` level restored)."""
    return _described(text_encoder, "text_encoder", prefix=prefix, classes=TEXT_ENCODER_TARGETS,
                      path_prefix=text_model_prefix(text_encoder), conv3x3=False)


def sd15_targets(*, conv: bool = True) -> list[Target]:
    """The real SD 1.5 inventory (UNet built on the meta device, CLIP ViT-L/14 text encoder
    shapes), without any weights: 350 modules with ``conv``, 264 without."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )
    te = []
    for layer in range(12):
        base = f"text_model.encoder.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            te.append(Target(f"lora_te_{base.replace('.', '_')}_self_attn_{proj}", f"{base}.self_attn.{proj}",
                             "text_encoder", (768, 768)))
        te.append(Target(f"lora_te_{base.replace('.', '_')}_mlp_fc1", f"{base}.mlp.fc1", "text_encoder", (3072, 768)))
        te.append(Target(f"lora_te_{base.replace('.', '_')}_mlp_fc2", f"{base}.mlp.fc2", "text_encoder", (768, 3072)))
    return te + unet_targets(unet, conv=conv)


# --- SDXL: sd-scripts' SGM names, written out independently of the trainer -------------------

#: sd-scripts' SDXL resnet (``sdxl_original_unet.ResnetBlock2D``) leaf names for diffusers'
_SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}


def sdxl_sgm_path(path: str, *, up_with_attention: tuple[bool, ...] = (True, True, False)) -> str:
    """A diffusers SDXL UNet layer path → the module path in sd-scripts' SDXL UNet (SGM):
    2 resnets per down level and 3 per up level, so down (i, j) is ``input_blocks.3i+j+1``,
    the downsampler of level i ``input_blocks.3i+3.0.op``, up (i, j) ``output_blocks.3i+j``,
    the upsampler of up level i the last module of ``output_blocks.3i+2``."""
    import re

    def resnet(rest: str) -> str:
        leaf, _, tail = rest.partition(".")
        return f"{_SGM_RESNET[leaf]}.{tail}" if tail else _SGM_RESNET[leaf]

    rules: list[tuple[str, Any]] = [
        (r"^down_blocks\.(\d)\.resnets\.(\d)\.(.+)$", lambda m: f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.0.{resnet(m[3])}"),
        (r"^down_blocks\.(\d)\.attentions\.(\d)\.(.+)$", lambda m: f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"),
        (r"^down_blocks\.(\d)\.downsamplers\.0\.conv$", lambda m: f"input_blocks.{3 * int(m[1]) + 3}.0.op"),
        (r"^mid_block\.resnets\.(\d)\.(.+)$", lambda m: f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"),
        (r"^mid_block\.attentions\.0\.(.+)$", lambda m: f"middle_block.1.{m[1]}"),
        (r"^up_blocks\.(\d)\.resnets\.(\d)\.(.+)$", lambda m: f"output_blocks.{3 * int(m[1]) + int(m[2])}.0.{resnet(m[3])}"),
        (r"^up_blocks\.(\d)\.attentions\.(\d)\.(.+)$", lambda m: f"output_blocks.{3 * int(m[1]) + int(m[2])}.1.{m[3]}"),
        (r"^up_blocks\.(\d)\.upsamplers\.0\.conv$",
         lambda m: f"output_blocks.{3 * int(m[1]) + 2}.{2 if up_with_attention[int(m[1])] else 1}.conv"),
    ]
    for pattern, replace in rules:
        match = re.match(pattern, path)
        if match:
            return replace(match)
    raise KeyError(path)


def sdxl_names(unet: Any, text_encoders: list[Any], *, conv: bool) -> dict[str, tuple[str, str]]:
    """sd-scripts' SDXL LoRA module names → (model, diffusers layer path), from a walk of the
    real module tree: Linear/Conv2d children of the target classes (kohya's rule), UNet
    names through :func:`sdxl_sgm_path`, text encoders ``lora_te1_``/``lora_te2_`` with the
    ``text_model`` level."""
    classes = UNET_ATTENTION_TARGETS + (CONV_ONLY_TARGETS if conv else ())
    out: dict[str, tuple[str, str]] = {}
    for path, module in unet.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_path, child in module.named_modules():
            kind = type(child).__name__
            if not child_path or kind not in ("Linear", "Conv2d"):
                continue
            if kind == "Conv2d" and tuple(child.kernel_size) != (1, 1) and not conv:
                continue
            layer = f"{path}.{child_path}"
            out["lora_unet_" + sdxl_sgm_path(layer).replace(".", "_")] = ("unet", layer)
    for n, encoder in enumerate(text_encoders, 1):
        for path, module in encoder.named_modules():
            if type(module).__name__ not in TEXT_ENCODER_TARGETS:
                continue
            for child_path, child in module.named_modules():
                if child_path and type(child).__name__ == "Linear":
                    layer = f"{path}.{child_path}"
                    full = layer if layer.startswith("text_model.") else "text_model." + layer
                    out[f"lora_te{n}_" + full.replace(".", "_")] = (f"text_encoder{n}", layer)
    return out
