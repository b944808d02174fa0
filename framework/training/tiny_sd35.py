"""A tiny Stable Diffusion 3.5 that charfw builds itself, with SD 3.5 Medium's real topology.

Every module a LoRA, a block vector or a single-file checkpoint names is the real one
(diffusers' names); only the widths are small:

* Transformer: ``SD3Transformer2DModel`` with 24 joint blocks (SD 3.5 Medium's depth, so its
  25-value block layout applies), dual attention (``attn2``) in blocks 0-12 and RMS
  ``qk_norm`` as 3.5 Medium has, patch size 2, 16 latent channels, the last block
  ``context_pre_only`` (no ``to_add_out``/``ff_context``), as every SD3 model.
* Text encoders: CLIP-L and CLIP-G as ``CLIPTextModelWithProjection`` (3 layers each, so
  the penultimate hidden state SD3 uses is a real choice; CLIP-L's projection is the
  identity, as in real SD3 checkpoints, which store none) and a 2-layer gated-GELU
  ``T5EncoderModel`` (T5 v1.1's kind). CLIP-L + CLIP-G widths sum to the pooled width
  (96), and the T5 width (128) is wider than their concatenation, so the zero padding of
  the CLIP states to the T5 width is real.
* VAE: SD3's (16 latent channels, no quant convs, ``scaling_factor`` 1.5305,
  ``shift_factor`` 0.0609), 4 levels.
* Scheduler: ``FlowMatchEulerDiscreteScheduler`` with shift 3.0.
* Tokenizers: the byte-level CLIP BPE of :mod:`.tiny_sd` for both CLIP encoders, and a
  small SentencePiece-style unigram tokenizer (``T5TokenizerFast``) built with the
  ``tokenizers`` library: every ASCII letter and digit as a piece, ``▁`` word starts, T5's
  ``<pad>``/``</s>``/``<unk>``.

Deterministic (seeded), a few MB, built offline in seconds by :func:`build_tiny_sd35`.
"""

from __future__ import annotations

import string
from pathlib import Path

from charfw.build import atomic
from charfw.training.tiny_sd import CONTEXT_LENGTH, VAE_CHANNELS, scratch_tokenizers

#: SD 3.5 Medium: 24 joint blocks, attn2 in 0-12, rms qk_norm
NUM_LAYERS = 24
DUAL_ATTENTION_LAYERS = tuple(range(13))
HEADS, HEAD_DIM = 2, 16
CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 32, 64, 128
TEXT_LAYERS = 3
#: SD3's VAE factors (``scripts/convert_sd3_to_diffusers.py``)
VAE_SCALING, VAE_SHIFT = 1.5305, 0.0609
SHIFT = 3.0


def transformer_config() -> dict[str, object]:
    return {
        "sample_size": 32, "patch_size": 2, "in_channels": 16, "out_channels": 16,
        "num_layers": NUM_LAYERS, "attention_head_dim": HEAD_DIM, "num_attention_heads": HEADS,
        "joint_attention_dim": T5_WIDTH, "caption_projection_dim": HEADS * HEAD_DIM,
        "pooled_projection_dim": CLIP_L_WIDTH + CLIP_G_WIDTH, "pos_embed_max_size": 64,
        "dual_attention_layers": DUAL_ATTENTION_LAYERS, "qk_norm": "rms_norm",
    }


def t5_tokenizer(folder: Path | None = None) -> object:
    """The tiny model's T5 tokenizer (a unigram model over single characters), saved to
    ``folder`` when given."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for i, ch in enumerate(string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation):
        pieces.append(("▁" + ch, -3.0 - i / 100))
        pieces.append((ch, -4.0 - i / 100))
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)
    if folder is not None:
        fast.save_pretrained(str(folder))
    return fast


def build_tiny_sd35(dest: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny SD 3.5 diffusers folder (model_index.json, transformer, vae, three text
    encoders and tokenizers, scheduler) to ``dest`` and return it. Same seed, same weights."""
    import shutil

    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from .families.sd1 import _quiet_loaders

    _quiet_loaders()  # no "Writing model shards" bars while the model is built
    dest = Path(dest)
    tmp_tok, (tokenizer,) = scratch_tokenizers(dest, None)
    tokenizer_3 = t5_tokenizer()
    torch.manual_seed(seed)

    def clip(width: int, act: str) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 4,
            num_hidden_layers=TEXT_LAYERS, num_attention_heads=2, max_position_embeddings=CONTEXT_LENGTH,
            hidden_act=act, projection_dim=width, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))

    text_encoder = clip(CLIP_L_WIDTH, "quick_gelu")
    with torch.no_grad():  # SD3's CLIP-L has no projection of its own (diffusers: the identity)
        text_encoder.text_projection.weight.copy_(torch.eye(CLIP_L_WIDTH))
    text_encoder_2 = clip(CLIP_G_WIDTH, "gelu")
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=T5_WIDTH, d_kv=32, d_ff=T5_WIDTH * 2, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        tie_word_embeddings=False))
    transformer = SD3Transformer2DModel(**transformer_config())
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=VAE_CHANNELS, layers_per_block=2,
        latent_channels=16, norm_num_groups=32, sample_size=256, scaling_factor=VAE_SCALING,
        shift_factor=VAE_SHIFT, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3)
    with atomic.atomic_dir(dest) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(tmp_tok, ignore_errors=True)
    return dest
