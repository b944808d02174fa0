"""Safetensors headers of each model family's single-file layout, without tensor data:
what family detection reads (a real SDXL file is 6 GB; its header is enough)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

UNET = "model.diffusion_model."
CLIP_L = "cond_stage_model.transformer.text_model."


def write_header(path: Path, shapes: dict[str, list[int]]) -> Path:
    """A safetensors file holding only its header (tensor names, dtypes, shapes)."""
    header = {k: {"dtype": "F16", "shape": v, "data_offsets": [0, 0]} for k, v in shapes.items()}
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


def sd1_shapes(context: int = 768) -> dict[str, list[int]]:
    return {UNET + "input_blocks.0.0.weight": [320, 4, 3, 3],
            UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, context],
            "first_stage_model.decoder.conv_in.weight": [512, 4, 3, 3],
            CLIP_L + "embeddings.token_embedding.weight": [49408, 768]}


def sd2_shapes() -> dict[str, list[int]]:
    shapes = {k: v for k, v in sd1_shapes(1024).items() if not k.startswith(CLIP_L)}
    shapes["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = [3072, 1024]
    return shapes


def sdxl_shapes() -> dict[str, list[int]]:
    return {UNET + "input_blocks.0.0.weight": [320, 4, 3, 3],
            UNET + "label_emb.0.0.weight": [1280, 2816],
            UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": [640, 2048],
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": [49408, 768],
            "conditioner.embedders.1.model.token_embedding.weight": [49408, 1280]}


def sd35_shapes(depth: int, *, attn2: int = 0, qk_norm: bool = True, encoders: bool = True) -> dict[str, list[int]]:
    width = 64 * depth
    shapes: dict[str, list[int]] = {UNET + "x_embedder.proj.weight": [width, 16, 2, 2]}
    for i in range(depth):
        shapes[f"{UNET}joint_blocks.{i}.x_block.attn.qkv.weight"] = [3 * width, width]
        if qk_norm:
            shapes[f"{UNET}joint_blocks.{i}.x_block.attn.ln_q.weight"] = [64]
        if i < attn2:
            shapes[f"{UNET}joint_blocks.{i}.x_block.attn2.qkv.weight"] = [3 * width, width]
    if encoders:
        for name in ("clip_l", "clip_g", "t5xxl"):
            shapes[f"text_encoders.{name}.transformer.embed.weight"] = [8, 8]
    return shapes
