"""SDXL: a UNet conditioned on two text encoders and on each image's size and crop.

Loading needs no network for local models: a diffusers folder has everything, and a
single-file checkpoint (SGM layout) gets its configs from ``model_configs/sdxl`` (see
:mod:`charfw.training.single_file_sdxl`); both tokenizers are CLIP's BPE, the second
padding with ``!`` (id 0) as open_clip and SDXL's ``tokenizer_2`` do.

**Text conditioning** (kohya's ``sdxl_train_network.py``, diffusers' SDXL trainer): the
penultimate hidden states of CLIP-L (768 wide) and of OpenCLIP-G (1280), without the
final layer norm, joined along the feature axis (2048), and the pooled vector of the
second encoder (its ``text_projection`` of the last layer's state at the end token).
Long captions (``max_token_length`` 150/225) are encoded in 75-token chunks joined as for
SD 1.x; the pooled vector comes from the first chunk. SDXL has no clip skip: the setting
is ignored (the trainer says so once).

**Size conditioning**: per image, ``original_size`` (its size before resizing), the crop's
top-left corner and ``target_size`` (its bucket), six numbers in (height, width) order,
computed as sd-scripts does (:attr:`charfw.training.dataset.Sample.crop_left_top`).

**Files**: kohya's SDXL LoRA: UNet modules under SGM names
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), ``lora_te1_`` (CLIP-L)
and ``lora_te2_`` (OpenCLIP-G) with the ``text_model`` level, ``ss_base_model_version``
``sdxl_base_v1-0``.

**The VAE in half precision**: the trainer always encodes in float32 (kohya's
``--no_half_vae``); generation in fp16 upcasts SDXL's VAE to decode (diffusers'
``force_upcast``, set in SDXL's VAE config) unless the VAE says it is safe in fp16 (an
fp16-fix VAE folder given as ``model.vae``, whose config has ``force_upcast`` false).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from charfw.training.text_states import clip_text_states, penultimate_and_pooled

from ...errors import CharfwError
from .. import single_file, single_file_sdxl
from ..model_sources import ModelSource
from ..networks.targets import (
    TEXT_ENCODER_TARGETS,
    UNET_ATTENTION_TARGETS,
    UNET_CONV_TARGETS,
    NetworkRoot,
    text_model_prefix,
)
from . import LoadedModel, ModelFamily, TextConditioning
from .sd1 import _quiet_loaders, clip_token_ids, join_chunks, load_vae, where_to_load

if TYPE_CHECKING:
    from ..dataset import Batch

#: the hidden state both encoders condition with (the penultimate), in charfw's clip-skip count
PENULTIMATE = 2


def sgm_renamer(unet_config: Mapping[str, Any]) -> Callable[[str], str]:
    """A diffusers UNet layer path → its SGM path (``down_blocks.1.attentions.0.proj_in`` →
    ``input_blocks.4.1.proj_in``; resnet ``conv1`` → ``in_layers.2``)."""
    rules = single_file.unet_prefix_map(unet_config)

    def rename(path: str) -> str:
        return single_file._rename(path + ".weight", rules).removesuffix(".weight")

    return rename


def _tokenizer_from_configs(config_dir: Path, subfolder: str, cache_dir: Path) -> Any:
    from transformers import CLIPTokenizer

    from charfw.training.clip_tokenizer import clip_tokenizer_files

    folder = config_dir / subfolder
    if (folder / "tokenizer.json").is_file():
        return CLIPTokenizer.from_pretrained(str(folder))
    settings = json.loads((folder / "tokenizer_config.json").read_text("utf-8"))
    files = clip_tokenizer_files(cache_dir)
    return CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=77,
                         pad_token=settings.get("pad_token", "<|endoftext|>"))


class SDXLFamily(ModelFamily):
    name = "sdxl"
    base_model_version = "sdxl_base_v1-0"
    lora_architecture = "stable-diffusion-xl-v1-base/lora"
    default_resolution = 1024
    uses_clip_skip = False

    # --- loading -------------------------------------------------------------------------

    def load(self, source: ModelSource, vae: ModelSource | None, *, cache_dir: Path) -> LoadedModel:
        _quiet_loaders()
        if source.kind == "single_file":
            assert source.path is not None
            config_dir, parts = single_file_sdxl.load_checkpoint(source.path)
            parts["tokenizers"] = [_tokenizer_from_configs(config_dir, t, cache_dir) for t in ("tokenizer", "tokenizer_2")]
            parts["scheduler_config"] = json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text("utf-8"))
        else:
            parts = self._load_diffusers(where_to_load(source), source)
        if vae is not None:
            parts["vae"] = load_vae(vae, single_file_sdxl.PIPELINE)
        if parts["unet"].config.get("addition_embed_type") != "text_time":
            raise CharfwError(f"'{source.ref}' is not an SDXL model (its UNet has no text_time embedding)",
                              hint="give an SDXL checkpoint, or train this model as family sd1")
        return LoadedModel(self, parts["unet"], parts["text_encoders"], parts["tokenizers"], parts["vae"],
                           parts["scheduler_config"], source, vae)

    def _load_diffusers(self, where: str, source: ModelSource) -> dict[str, Any]:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        try:
            return {
                "unet": UNet2DConditionModel.from_pretrained(where, subfolder="unet"),
                "vae": AutoencoderKL.from_pretrained(where, subfolder="vae"),
                "text_encoders": [CLIPTextModel.from_pretrained(where, subfolder="text_encoder"),
                                  CLIPTextModelWithProjection.from_pretrained(where, subfolder="text_encoder_2")],
                "tokenizers": [CLIPTokenizer.from_pretrained(where, subfolder="tokenizer"),
                               CLIPTokenizer.from_pretrained(where, subfolder="tokenizer_2")],
                "scheduler_config": dict(DDPMScheduler.load_config(where, subfolder="scheduler")),
            }
        except (OSError, ValueError) as exc:
            hint = ("check the id and your network, or download it first"
                    if source.kind == "hub" else "is it a complete SDXL diffusers folder (text_encoder_2, tokenizer_2)?")
            raise CharfwError(f"cannot load the base model '{source.ref}' ({str(exc).splitlines()[0][:200]})",
                              hint=hint) from None

    # --- networks ------------------------------------------------------------------------

    def network_roots(self, model: LoadedModel) -> list[NetworkRoot]:
        return self.roots_for(model.unet, model.text_encoders)

    def roots_for(self, unet: Any, text_encoders: list[Any]) -> list[NetworkRoot]:
        roots = [NetworkRoot("lora_unet", unet, "unet", UNET_ATTENTION_TARGETS, UNET_CONV_TARGETS,
                             rename=sgm_renamer(unet.config))]
        for n, encoder in enumerate(text_encoders, 1):
            roots.append(NetworkRoot(f"lora_te{n}", encoder, "text_encoder", TEXT_ENCODER_TARGETS,
                                     TEXT_ENCODER_TARGETS, path_prefix=text_model_prefix(encoder)))
        return roots

    # --- conditioning --------------------------------------------------------------------

    def tokenize(self, model: LoadedModel, captions: list[str],
                 max_token_length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each encoder's ids: (B, 77), or (B, chunks, 77) for a long ``max_token_length``."""
        first, second = model.tokenizers
        return clip_token_ids(first, captions, max_token_length), clip_token_ids(second, captions, max_token_length)

    def encode_text(self, model: LoadedModel, input_ids: Any, *, clip_skip: int,
                    text_encoders: list[Any] | None = None) -> TextConditioning:
        ids1, ids2 = input_ids
        te1, te2 = model.text_encoders
        run1, run2 = text_encoders or model.text_encoders
        batch = ids1.shape[0]
        chunks = ids1.shape[1] if ids1.ndim == 3 else 1
        states1 = clip_text_states(te1, ids1.reshape(-1, ids1.shape[-1]).to(te1.device), PENULTIMATE, forward=run1,
                                   final_norm=False)
        states2, pooled = penultimate_and_pooled(te2, ids2.reshape(-1, ids2.shape[-1]).to(te2.device),
                                                 model.tokenizers[1].eos_token_id, forward=run2)
        if ids1.ndim == 3:
            states1 = join_chunks(states1.reshape(batch, chunks, ids1.shape[-1], -1))
            states2 = join_chunks(states2.reshape(batch, chunks, ids2.shape[-1], -1))
        return TextConditioning({"encoder_hidden_states": torch.cat([states1, states2], dim=-1),
                                 "text_embeds": pooled[::chunks]})

    def sample_inputs(self, batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
        """``time_ids``: (original height, width, crop top, left, target height, width) per image."""
        rows = []
        for s in batch.samples:
            (width, height), (left, top), (bucket_w, bucket_h) = s.original_size, s.crop_left_top, s.entry.bucket
            rows.append([height, width, top, left, bucket_h, bucket_w])
        return {"time_ids": torch.tensor(rows, dtype=torch.float32, device=device)}

    def text_layers_unused(self, clip_skip: int) -> bool:
        return True  # the first encoder's last layer conditions nothing

    def predict(self, unet: Any, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: TextConditioning, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": inputs["time_ids"]}
        return unet(noisy_latents, timesteps, conditioning["encoder_hidden_states"], added_cond_kwargs=added,
                    return_dict=False)[0]

    # --- files and sampling --------------------------------------------------------------

    def metadata(self, model: LoadedModel) -> dict[str, str]:
        return {
            "ss_v2": "False",
            "ss_base_model_version": self.base_model_version,
            "ss_clip_skip": "None",
            "modelspec.architecture": self.lora_architecture,
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.prediction_type": model.prediction_type,
        }

    def save_single_file(self, model: LoadedModel, dest: Path, *, dtype: torch.dtype | None = None) -> Path:
        return single_file_sdxl.save_checkpoint(dest, model.unet, model.vae, model.text_encoders, dtype=dtype)

    def pipeline(self, model: LoadedModel, scheduler: Any, *, img2img: bool = False,
                 controlnet: Any = None) -> Any:
        import diffusers

        te1, te2 = model.text_encoders
        tok1, tok2 = model.tokenizers
        parts = {"vae": model.vae, "text_encoder": te1, "text_encoder_2": te2, "tokenizer": tok1,
                 "tokenizer_2": tok2, "unet": model.unet, "scheduler": scheduler, "add_watermarker": False}
        if controlnet is not None:
            cls = (diffusers.StableDiffusionXLControlNetImg2ImgPipeline if img2img
                   else diffusers.StableDiffusionXLControlNetPipeline)
            pipe = cls(controlnet=controlnet, **parts)
        else:
            cls = diffusers.StableDiffusionXLImg2ImgPipeline if img2img else diffusers.StableDiffusionXLPipeline
            if img2img:
                parts["requires_aesthetics_score"] = False
            pipe = cls(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode_prompts(self, model: LoadedModel, prompt: str, negative: str, *, clip_skip: int,
                       device: Any) -> dict[str, torch.Tensor]:
        """A1111's SDXL conditioning: each encoder reads the prompt with A1111's weighting and
        chunks (:mod:`charfw.generation.prompts`: its penultimate states, no final norm),
        the two joined along the features; the pooled vectors come from the second encoder's
        first chunk, unweighted (as A1111 takes them). Clip skip does not apply to SDXL."""
        from charfw.generation.prompts import encode_pair, encode_pair_pooled

        (tok1, tok2), (te1, te2) = model.tokenizers, model.text_encoders
        cond1, uncond1 = encode_pair(tok1, te1, prompt, negative, clip_skip=PENULTIMATE, device=device,
                                     final_norm=False)
        cond2, pooled, uncond2, negative_pooled = encode_pair_pooled(tok2, te2, prompt, negative, layer=-2,
                                                                     device=device)
        return {"prompt_embeds": torch.cat([cond1, cond2], dim=-1),
                "negative_prompt_embeds": torch.cat([uncond1, uncond2], dim=-1),
                "pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
