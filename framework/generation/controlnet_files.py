"""Single-file ControlNets without the network.

ControlNets are shared as one file: lllyasviel's ``control_v11p_sd15_openpose.pth`` and
its ``.safetensors`` conversions in the original ("LDM") layout (``input_blocks.*``,
``zero_convs.*``, ``input_hint_block.*``, ``middle_block_out.*``, sometimes under
``control_model.``), or a diffusers state dict saved as one file. diffusers converts
either with ``ControlNetModel.from_single_file``, but asks the Hugging Face hub for the
model's config first, which fails offline (and picks SD 1.5's config for every file).

A ControlNet is a copy of its base model's UNet encoder plus a small conditioning
encoder, so its config follows from the base model the generator has loaded: the UNet's
config, with the conditioning encoder's channels read from the file's tensor shapes.
:func:`load_single_file` writes that config to a temporary folder and hands it to
``from_single_file``; a file made for another base model (another width or text
encoder) is a one-line error.
"""

from __future__ import annotations

import inspect
import json
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CharfwError

LDM_PREFIX = "control_model."
_LDM_HINT = re.compile(r"^input_hint_block\.(\d+)\.weight$")
_DIFFUSERS_BLOCK = re.compile(r"^controlnet_cond_embedding\.blocks\.(\d+)\.weight$")


def _unprefixed(shapes: Mapping[str, list[int]]) -> dict[str, list[int]]:
    if any(k.startswith(LDM_PREFIX) for k in shapes):
        return {k[len(LDM_PREFIX):]: v for k, v in shapes.items() if k.startswith(LDM_PREFIX)}
    return dict(shapes)


def conditioning_layout(shapes: Mapping[str, list[int]], *, path: Path) -> dict[str, Any]:
    """The conditioning encoder's config entries and the first and cross-attention
    widths, from a ControlNet's tensor names and shapes (either layout)."""
    s = _unprefixed(shapes)
    if "controlnet_cond_embedding.conv_in.weight" in s:
        first = s["controlnet_cond_embedding.conv_in.weight"]
        blocks = sorted((int(m[1]), v) for k, v in s.items() if (m := _DIFFUSERS_BLOCK.match(k)))
        # blocks come in pairs: a same-width conv, then a strided one to the next width
        outs = [first[0], *(v[0] for i, v in blocks if i % 2 == 1)]
        conv_in = s.get("conv_in.weight")
    else:
        hint = sorted((int(m[1]), v) for k, v in s.items() if (m := _LDM_HINT.match(k)))
        if not hint:
            raise CharfwError("not a ControlNet (no conditioning encoder: neither input_hint_block.* nor "
                              "controlnet_cond_embedding.* tensors)", path=path,
                              hint="give a ControlNet model file, not a base model or a LoRA")
        convs = [v for _, v in hint][:-1]  # the last one is the zero convolution into the UNet
        first = convs[0]
        outs = [v[0] for v in convs[0::2]]
        conv_in = s.get("input_blocks.0.0.weight")
    # the cross-attention's key projection: the text width (same leaf name in both layouts)
    to_k = next((v for k, v in s.items() if k.endswith("attn2.to_k.weight")), None)
    return {"conditioning_channels": first[1], "conditioning_embedding_out_channels": outs,
            "conv_in": conv_in, "to_k": to_k}


def controlnet_config(unet_config: Mapping[str, Any], layout: Mapping[str, Any], *, path: Path) -> dict[str, Any]:
    """A ``ControlNetModel`` config for a file (``layout``) on the base UNet ``unet_config``;
    a one-line error when the file's widths are not the base model's."""
    from diffusers import ControlNetModel

    width, in_channels = unet_config["block_out_channels"][0], unet_config["in_channels"]
    conv_in = layout.get("conv_in")
    if conv_in is not None and (conv_in[0], conv_in[1]) != (width, in_channels):
        raise CharfwError(f"this ControlNet is made for another base model (its first layer takes {conv_in[1]} "
                          f"channels to {conv_in[0]}; the base model's takes {in_channels} to {width})", path=path,
                          hint="use a ControlNet made for the base model's family (SD 1.5, SDXL, …)")
    to_k = layout.get("to_k")
    cross = unet_config.get("cross_attention_dim")
    if to_k is not None and isinstance(cross, int) and to_k[1] != cross:
        raise CharfwError(f"this ControlNet is made for another base model (text width {to_k[1]}, the base "
                          f"model's {cross}: SD 1.x is 768, SD 2.x 1024, SDXL 2048)", path=path,
                          hint="use a ControlNet made for the base model's family")
    accepted = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}
    config = {k: v for k, v in unet_config.items() if k in accepted}
    config["down_block_types"] = list(unet_config["down_block_types"])
    config["conditioning_channels"] = int(layout["conditioning_channels"])
    config["conditioning_embedding_out_channels"] = [int(c) for c in layout["conditioning_embedding_out_channels"]]
    config["_class_name"] = "ControlNetModel"
    return config


def load_single_file(path: Path, unet_config: Mapping[str, Any]) -> Any:
    """A ``diffusers.ControlNetModel`` from a single file, configured for the base UNet."""
    from diffusers import ControlNetModel

    from ..training.single_file import read_state_dict

    state = read_state_dict(path)
    layout = conditioning_layout({k: list(v.shape) for k, v in state.items()}, path=path)
    config = controlnet_config(unet_config, layout, path=path)
    with tempfile.TemporaryDirectory(prefix="charfw-controlnet-") as folder:
        Path(folder, "config.json").write_text(json.dumps(config), "utf-8")
        return ControlNetModel.from_single_file(state, config=folder, local_files_only=True)
