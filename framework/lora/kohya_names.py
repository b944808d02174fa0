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

The trainer uses this to name what it trains; the tests and the benchmark use it to make
files with the real inventory (SD 1.5 with conv: 72 + 192 + 22 + 14 + 50 = 350 modules).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


@dataclass(frozen=True)
class Target:
    """One layer a LoRA module changes."""

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


def _walk(root: Any, classes: tuple[str, ...], prefix: str, model: str, *, conv3: bool,
          rename: Any = None) -> list[Target]:
    out: list[Target] = []
    seen: set[str] = set()
    for name, module in root.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            kind = type(child).__name__
            if kind not in ("Linear", "Conv2d"):
                continue
            shape = tuple(int(s) for s in child.weight.shape)
            if kind == "Conv2d" and shape[2:] != (1, 1) and not conv3:
                continue
            path = f"{name}.{child_name}" if child_name else name
            kohya_path = rename(path) if rename else path
            key = f"{prefix}_{kohya_path.replace('.', '_')}"
            if key in seen:
                continue
            seen.add(key)
            out.append(Target(key, path, model, shape))
    return out


def unet_targets(unet: Any, *, conv: bool = True) -> list[Target]:
    """kohya's targets in a diffusers SD 1.x/2.x UNet; ``conv`` adds the resnets and samplers."""
    targets = _walk(unet, UNET_TARGETS, "lora_unet", "unet", conv3=False)
    if conv:
        targets += _walk(unet, UNET_CONV_TARGETS, "lora_unet", "unet", conv3=True)
    return targets


def text_encoder_targets(text_encoder: Any, *, prefix: str = "lora_te") -> list[Target]:
    """kohya's targets in a transformers CLIP text model (``text_model.`` level restored)."""

    def rename(path: str) -> str:
        return path if path.startswith("text_model.") else f"text_model.{path}"

    return _walk(text_encoder, TE_TARGETS, prefix, "text_encoder", conv3=False, rename=rename)


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
