"""A tiny ControlNet for tests, made from a tiny SD 1.5 UNet."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_controlnet(unet, folder: Path, seed: int) -> Path:
    """A ControlNet copied from the tiny UNet, its zero convolutions made random; saved as a
    diffusers folder. Three 2× downsamplings in the conditioning embedding: the tiny VAE's
    factor 8 (four entries, as SD's (16, 32, 96, 256))."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    gen = torch.Generator().manual_seed(seed)
    zero = [net.controlnet_cond_embedding.conv_out, *net.controlnet_down_blocks, net.controlnet_mid_block]
    with torch.no_grad():
        for conv in zero:
            scale = 2.0 if conv is zero[0] else 0.3  # the image's way in: strong
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * scale)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.3)
    net.save_pretrained(folder)
    return folder


def controlnet_to_ldm(net, unet_config, prefix: str = "control_model.") -> dict[str, torch.Tensor]:
    """A diffusers ControlNet's state dict in the original (lllyasviel) layout: the UNet
    encoder's LDM names, ``input_hint_block.N`` for the conditioning encoder (a SiLU between
    every two convolutions), ``zero_convs.N.0`` and ``middle_block_out.0``."""
    from charfw.training.single_file import _rename, unet_prefix_map

    rules = unet_prefix_map(unet_config)
    blocks = len(net.controlnet_cond_embedding.blocks)
    out: dict[str, torch.Tensor] = {}
    for key, value in net.state_dict().items():
        head, _, leaf = key.rpartition(".")
        if head == "controlnet_cond_embedding.conv_in":
            new = f"input_hint_block.0.{leaf}"
        elif head.startswith("controlnet_cond_embedding.blocks."):
            new = f"input_hint_block.{2 * (int(head.split('.')[2]) + 1)}.{leaf}"
        elif head == "controlnet_cond_embedding.conv_out":
            new = f"input_hint_block.{2 * (blocks + 1)}.{leaf}"
        elif head.startswith("controlnet_down_blocks."):
            new = f"zero_convs.{head.split('.')[1]}.0.{leaf}"
        elif head == "controlnet_mid_block":
            new = f"middle_block_out.0.{leaf}"
        else:
            new = _rename(key, rules)
        out[prefix + new] = value.clone()
    return out
