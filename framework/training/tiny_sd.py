"""A tiny Stable Diffusion 1.5 that charfw builds itself: tests and the examples run on it.

It has the real SD 1.5 topology, so every module name a LoRA touches is the real one:

* UNet: 4 down blocks (3 with cross attention, then a plain one), a mid block with
  attention, 4 up blocks (a plain one, then 3 with cross attention), 2 resnets per down
  block and 3 per up block, transformer blocks with attn1/attn2/ff, conv 3×3 in resnets
  and samplers, time embedding: only the widths are small.
* Text encoder: a CLIP text model with 3 layers (so clip skip 2 is a real choice) and a
  byte-level BPE tokenizer with a 77-token context.
* VAE: 4 levels like SD's (three 2× downsamplings, 4 latent channels, scale 0.18215).

It is deterministic (seeded) and small (a few MB), and is built offline in seconds with
:func:`build_tiny_sd15`. Heavy libraries are imported inside the function.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from charfw.build import atomic

#: widths: SD 1.5 uses (320, 640, 1280, 1280) for the UNet and (128, 256, 512, 512) for the VAE
UNET_CHANNELS = (32, 32, 64, 64)
VAE_CHANNELS = (32, 32, 32, 32)
TEXT_WIDTH = 32
TEXT_LAYERS = 3
CONTEXT_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """The byte ↔ printable-character table of GPT-2/CLIP byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, [chr(c) for c in chars], strict=True))


def _write_tokenizer(folder: Path) -> None:
    """A byte-level BPE vocabulary: every byte, every byte at a word end, a few merges."""
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges = ["i n", "o n", "e r", "a n", "t h", "r e", "o r", "e n", "a r", "o u"]
    for m in merges:
        a, b = m.split()
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic.write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")


def tiny_vae(**config: object) -> Any:
    """A tiny ``AutoencoderKL`` with SD's 4 levels (three 2x downsamplings, 4 latent
    channels); ``config`` sets the rest (``sample_size``, ``scaling_factor``...)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=VAE_CHANNELS,
                         layers_per_block=2, latent_channels=4, norm_num_groups=32, **config)


def tiny_text_config(tokenizer: Any, width: int, act: str) -> Any:
    """A tiny CLIP text model's config: ``TEXT_LAYERS`` layers of ``width``, 2 heads, a
    77-token context, the tokenizer's vocabulary and special tokens, a projection as wide
    as the model."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 4,
                          num_hidden_layers=TEXT_LAYERS, num_attention_heads=2, max_position_embeddings=CONTEXT_LENGTH,
                          hidden_act=act, projection_dim=width, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def scratch_tokenizers(dest: Path, *pad_tokens: str | None) -> tuple[Path, list[Any]]:
    """The tiny byte-level CLIP tokenizer, once per pad token (None: its end token; SDXL's
    second encoder pads with "!"), read from a scratch folder beside ``dest`` that the
    caller removes once the model is saved."""
    from transformers import CLIPTokenizer

    folder = dest.parent / f".{dest.name}-tokenizer"
    _write_tokenizer(folder)
    return folder, [CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                  model_max_length=CONTEXT_LENGTH, **({"pad_token": pad} if pad else {}))
                    for pad in pad_tokens]


def build_tiny_sd15(dest: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny SD 1.5 diffusers folder (model_index.json, unet, vae, text_encoder,
    tokenizer, scheduler) to ``dest`` and return it. Same seed, same weights."""
    import torch
    from diffusers import (
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    dest = Path(dest)
    tmp_tok, (tokenizer,) = scratch_tokenizers(dest, None)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer, TEXT_WIDTH, "quick_gelu"))
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=UNET_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=2,
        norm_num_groups=32,
    )
    vae = tiny_vae(sample_size=512, scaling_factor=0.18215)
    # SD 1.5's own scheduler config (a trainer builds its DDPM noise schedule from it)
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
        prediction_type="epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no "Writing model shards" bar for one small file
    with atomic.atomic_dir(dest) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    import shutil

    shutil.rmtree(tmp_tok, ignore_errors=True)
    return dest
