"""A tiny SDXL that charfw builds itself: the SDXL tests and examples run on it.

It has SDXL's real topology, so every module name a LoRA touches is the real one:

* UNet: 3 levels (a plain down block, then two with cross attention; mirrored up blocks),
  transformer depth 1, 2 and 10 per level as SDXL's ``transformer_layers_per_block``
  (so ``input_blocks_7_1_transformer_blocks_9`` and ``middle_block_1_transformer_blocks_9``
  exist), linear ``proj_in``/``proj_out``, the ``text_time`` added embedding (pooled text +
  six sinusoidal size/crop ids), 2 resnets per down block and 3 per up block: only the
  widths are small.
* Text encoders: a CLIP text model (``text_encoder``, SDXL's CLIP-L) and a CLIP text model
  with projection (``text_encoder_2``, SDXL's OpenCLIP-G, GELU, projection as wide as the
  model as in bigG), 3 layers each; the UNet's context is both widths joined. Their
  tokenizers share one byte-level BPE vocabulary; the second pads with ``!`` (id 0) as
  SDXL's ``tokenizer_2`` and open_clip do.
* VAE: 4 levels like SDXL's (scale 0.13025).

Deterministic (seeded), a few MB, built offline in seconds with :func:`build_tiny_sdxl`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from charfw.build import atomic
from charfw.training.tiny_sd import scratch_tokenizers, tiny_text_config, tiny_vae

#: SDXL uses (320, 640, 1280)
UNET_CHANNELS = (32, 64, 64)
#: SDXL's transformer depth per level
TRANSFORMER_DEPTH = (1, 2, 10)
TEXT_WIDTHS = (32, 32)
#: SDXL uses 256 per size/crop number
TIME_EMBED_DIM = 8


def build_tiny_sdxl(dest: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny SDXL diffusers folder (model_index.json, unet, vae, text_encoder,
    text_encoder_2, tokenizer, tokenizer_2, scheduler) to ``dest`` and return it."""
    import torch
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )

    dest = Path(dest)
    tmp_tok, (tokenizer, tokenizer_2) = scratch_tokenizers(dest, None, "!")
    torch.manual_seed(seed)

    text_encoder = CLIPTextModel(tiny_text_config(tokenizer, TEXT_WIDTHS[0], "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer, TEXT_WIDTHS[1], "gelu"))
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=UNET_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=TRANSFORMER_DEPTH,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=sum(TEXT_WIDTHS),
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TEXT_WIDTHS[1] + 6 * TIME_EMBED_DIM,
        norm_num_groups=32,
    )
    vae = tiny_vae(sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    # SDXL base's own scheduler config (the trainer builds its DDPM noise schedule from it)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon", interpolation_type="linear",
        use_karras_sigmas=False,
    )
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    with atomic.atomic_dir(dest) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(tmp_tok, ignore_errors=True)
    return dest
