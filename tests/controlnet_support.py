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
