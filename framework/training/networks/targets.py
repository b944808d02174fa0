"""Which layers a kohya-style network wraps, and the names kohya gives them.

kohya sd-scripts (``networks/lora.py``) walks ``named_modules()`` of each model; where a
module's *class name* is one of the target names it walks that module's own
``named_modules()`` and wraps every child whose class name is exactly ``Linear`` or
``Conv2d``. The module's name in the file is ``<prefix>.<path to target>.<path to child>``
with every ``.`` replaced by ``_``::

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q
    lora_te_text_model_encoder_layers_0_self_attn_q_proj

UIs find the layers by these names, so they are the file format. Two details matter:

* The text encoder's names keep the ``text_model`` level. transformers 5 flattened
  ``CLIPTextModel`` (``encoder.layers.0...``), so the level is added here; deriving the
  names from the installed model would give ``lora_te_encoder_layers_...``, which
  ComfyUI and A1111 silently ignore.
* Convolutions with a kernel other than 1x1 are wrapped only when the network asks for
  them (kohya's ``conv_dim``, "LoRA-C3Lier"); then the resnet blocks and the samplers
  become targets too, and with them their Linear ``time_emb_proj`` and 1x1
  ``conv_shortcut`` (which train at the linear dim).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import CharfwError

if TYPE_CHECKING:
    from torch import nn

#: kohya's UNet targets without conv_dim ("LoRA-LierLa")
UNET_ATTENTION_TARGETS = ("Transformer2DModel",)
#: with conv_dim ("LoRA-C3Lier"): also the resnets and the down/up samplers
UNET_CONV_TARGETS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
#: the CLIP text encoder's attention and MLP blocks (every transformers spelling)
TEXT_ENCODER_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
WRAPPED_CLASSES = ("Linear", "Conv2d")


@dataclass(frozen=True)
class Target:
    """One layer to wrap."""

    #: kohya's module name (``lora_unet_..._to_q``)
    name: str
    #: the layer itself (a ``Linear`` or ``Conv2d``)
    layer: nn.Module
    #: "unet" or "text_encoder": which learning rate and which part of the file
    root: str
    #: a convolution with a kernel larger than 1x1: trains at conv_dim / conv_alpha
    is_conv3x3: bool
    #: the layer's dotted name in a diffusers/peft-format file (``transformer.transformer_blocks.0.attn.to_q``),
    #: for families whose files use that format (SD 3.5); None for kohya files
    file_key: str | None = None


def is_conv3x3(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv2d" and tuple(layer.kernel_size) != (1, 1)  # type: ignore[arg-type]


def find_targets(
    model: nn.Module,
    *,
    prefix: str,
    root: str,
    classes: tuple[str, ...],
    path_prefix: str = "",
    conv3x3: bool,
    file_root: str | None = None,
    rename: Callable[[str], str] | None = None,
) -> list[Target]:
    """The layers of ``model`` kohya would wrap, in kohya's order, with kohya's names.

    ``path_prefix`` is prepended to module paths (``"text_model."`` for a flattened
    ``CLIPTextModel``); ``conv3x3`` adds convolutions larger than 1x1; ``file_root`` (a
    diffusers part, ``transformer``) gives each target its peft-format file key; ``rename``
    maps a layer's module path to the one kohya's file names it by (SDXL: diffusers' UNet
    paths to SGM's, ``down_blocks.1.attentions.0`` → ``input_blocks.4.1``).
    """
    found: list[Target] = []
    seen: set[int] = set()
    for path, module in model.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_path, child in module.named_modules():
            if not child_path or type(child).__name__ not in WRAPPED_CLASSES or id(child) in seen:
                continue
            conv = is_conv3x3(child)
            if conv and not conv3x3:
                continue
            seen.add(id(child))
            dotted = f"{path_prefix}{path}.{child_path}"
            named = f"{path_prefix}{rename(f'{path}.{child_path}')}" if rename else dotted
            full = f"{prefix}.{named}".replace(".", "_")
            found.append(Target(full, child, root, conv, f"{file_root}.{dotted}" if file_root else None))
    return found


def text_model_prefix(text_encoder: nn.Module) -> str:
    """``"text_model."`` when the installed transformers flattened ``CLIPTextModel``
    (5.x), so that names keep the level kohya's (and every UI's) key maps expect."""
    return "" if hasattr(text_encoder, "text_model") else "text_model."


@dataclass(frozen=True)
class NetworkRoot:
    """One model a network attaches to, as a model family describes it."""

    #: the file prefix: ``lora_unet``, ``lora_te`` (``lora_te1``/``lora_te2`` for SDXL)
    prefix: str
    model: nn.Module
    #: "unet" or "text_encoder"
    root: str
    #: target class names without and with 3x3 convolutions
    classes: tuple[str, ...]
    conv_classes: tuple[str, ...]
    path_prefix: str = ""
    #: the diffusers part name files of this family use as the key's first part
    #: (``transformer``, ``text_encoder``, ``text_encoder_2``); None: kohya names
    file_root: str | None = None
    #: a layer's module path → the path kohya's file names it by (None: the same)
    rename: Callable[[str], str] | None = None


def enumerate_targets(roots: list[NetworkRoot], *, conv3x3: bool) -> list[Target]:
    """Every layer a network wraps, text encoders first (kohya's order)."""
    out: list[Target] = []
    for r in sorted(roots, key=lambda r: r.root != "text_encoder"):
        classes = r.conv_classes if conv3x3 else r.classes
        out += find_targets(r.model, prefix=r.prefix, root=r.root, classes=classes,
                            path_prefix=r.path_prefix, conv3x3=conv3x3, file_root=r.file_root,
                            rename=r.rename)
    return out


def select_text_encoders(roots: list[NetworkRoot], chosen: list[int] | None) -> list[NetworkRoot]:
    """The network roots with only the ``chosen`` text encoders (counted from 1 in the
    model's order; None: all of them, an empty list: none)."""
    if chosen is None:
        return roots
    text = [r for r in roots if r.root == "text_encoder"]
    unknown = sorted(set(chosen) - set(range(1, len(text) + 1)))
    if unknown:
        raise CharfwError(f"text_encoders: this model has {len(text)} text encoder(s), there is no number {unknown[0]}",
                          hint=f"use numbers from 1 to {len(text)}")
    keep = {id(text[i - 1]) for i in chosen}
    return [r for r in roots if r.root != "text_encoder" or id(r) in keep]
