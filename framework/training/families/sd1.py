"""Stable Diffusion 1.x: a UNet conditioned on one CLIP ViT-L/14 text encoder.

Loading needs no network for local models: a diffusers folder has everything, and a
single-file checkpoint gets its configs and tokenizer from the copies shipped in
``model_configs/`` (see :mod:`charfw.training.single_file`).

Text conditioning follows kohya: ``clip_skip`` N takes the N-th hidden state from the end
and applies the final layer norm to it (so 1 is the last layer, 2 the penultimate, the
method's choice); ``max_token_length`` 150 or 225 encodes the caption in chunks of 75
tokens, each wrapped in its own start and end tokens, and joins them as
``start + chunk1 + chunk2 (+ chunk3) + end``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from charfw.training.clip_tokenizer import clip_tokenizer_files
from charfw.training.text_states import clip_text_states

from ...errors import CharfwError
from .. import single_file
from ..model_sources import ModelSource, ensure_builtin
from ..networks.targets import (
    TEXT_ENCODER_TARGETS,
    UNET_ATTENTION_TARGETS,
    UNET_CONV_TARGETS,
    NetworkRoot,
    text_model_prefix,
)
from . import LoadedModel, ModelFamily, TextConditioning

CHUNK = 75


def _quiet_loaders() -> None:
    """diffusers and transformers print progress bars and notices on every load."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


class SD1Family(ModelFamily):
    name = "sd1"
    base_model_version = "sd_v1"
    lora_architecture = "stable-diffusion-v1/lora"
    default_resolution = 512

    # --- loading -------------------------------------------------------------------------

    def load(self, source: ModelSource, vae: ModelSource | None, *, cache_dir: Path) -> LoadedModel:
        parts = self._load_parts(source, vae, cache_dir=cache_dir)
        self._check_sd1(parts["unet"], source)
        return LoadedModel(self, parts["unet"], [parts["text_encoder"]], [parts["tokenizer"]], parts["vae"],
                           parts["scheduler_config"], source, vae)

    def _load_diffusers(self, where: str, source: ModelSource) -> dict[str, Any]:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        try:
            unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet")
            vae = AutoencoderKL.from_pretrained(where, subfolder="vae")
            text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder")
            tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer")
            from diffusers import DDPMScheduler

            scheduler_config = dict(DDPMScheduler.load_config(where, subfolder="scheduler"))
        except (OSError, ValueError) as exc:
            hint = ("check the id and your network, or download it first"
                    if source.kind == "hub" else "is it a complete diffusers model folder?")
            raise CharfwError(f"cannot load the base model '{source.ref}' ({str(exc).splitlines()[0][:200]})",
                              hint=hint) from None
        return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
                "scheduler_config": scheduler_config}

    def _load_single_file(self, path: Path, cache_dir: Path) -> dict[str, Any]:
        from transformers import CLIPTokenizer

        layout = single_file.detect_layout(single_file.tensor_shapes(path), path=path) if path.suffix.lower() == \
            ".safetensors" else None
        state = single_file.read_state_dict(path)
        if layout is None:  # pickle files have no readable header: look at the tensors
            layout = single_file.detect_layout({k: list(v.shape) for k, v in state.items()}, path=path)
        config_dir = single_file.shipped_configs()[layout.config]
        unet = single_file.load_unet(state, config_dir, path=path)
        vae = single_file.load_vae(path, config_dir, state=state)
        text_encoder = single_file.load_text_encoder(state, config_dir, path=path)
        del state
        if (config_dir / "tokenizer" / "tokenizer.json").is_file():
            tokenizer = CLIPTokenizer.from_pretrained(str(config_dir / "tokenizer"))
        else:
            files = clip_tokenizer_files(cache_dir)
            tokenizer = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=77)
        scheduler_config = json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text("utf-8"))
        return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
                "scheduler_config": scheduler_config}

    def _load_vae(self, source: ModelSource) -> Any:
        return load_vae(source, "StableDiffusionPipeline")

    def _check_sd1(self, unet: Any, source: ModelSource) -> None:
        config = unet.config
        if config.get("addition_embed_type") is not None:
            raise CharfwError(f"'{source.ref}' is an SDXL-style model; charfw trains SD 1.x models so far")
        if config.get("cross_attention_dim") == 1024:
            raise CharfwError(f"'{source.ref}' is an SD 2.x model; charfw trains SD 1.x models so far")

    # --- networks ------------------------------------------------------------------------

    def network_roots(self, model: LoadedModel) -> list[NetworkRoot]:
        return self.roots_for(model.unet, model.text_encoders)

    def roots_for(self, unet: Any, text_encoders: list[Any]) -> list[NetworkRoot]:
        text_encoder = text_encoders[0]
        return [
            NetworkRoot("lora_unet", unet, "unet", UNET_ATTENTION_TARGETS, UNET_CONV_TARGETS),
            NetworkRoot("lora_te", text_encoder, "text_encoder", TEXT_ENCODER_TARGETS, TEXT_ENCODER_TARGETS,
                        path_prefix=text_model_prefix(text_encoder)),
        ]

    # --- conditioning --------------------------------------------------------------------

    def tokenize(self, model: LoadedModel, captions: list[str], max_token_length: int | None) -> torch.Tensor:
        """(B, 77) ids, or (B, chunks, 77) for a long ``max_token_length``."""
        return clip_token_ids(model.tokenizers[0], captions, max_token_length)

    def encode_text(self, model: LoadedModel, input_ids: torch.Tensor, *, clip_skip: int,
                    text_encoders: list[Any] | None = None) -> TextConditioning:
        text_encoder = model.text_encoders[0]
        # the forward may go through a wrapper (DistributedDataParallel); attributes are read
        # from the model itself
        run = (text_encoders or model.text_encoders)[0]
        batch = input_ids.shape[0]
        chunked = input_ids.ndim == 3
        flat = input_ids.reshape(-1, input_ids.shape[-1]).to(text_encoder.device)
        states = clip_text_states(text_encoder, flat, clip_skip, forward=run)
        if chunked:
            states = join_chunks(states.reshape(batch, input_ids.shape[1], input_ids.shape[2], -1))
        return TextConditioning({"encoder_hidden_states": states})

    def predict(self, unet: Any, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: TextConditioning, inputs: Any) -> torch.Tensor:
        return unet(noisy_latents, timesteps, conditioning["encoder_hidden_states"], return_dict=False)[0]

    # --- files and sampling --------------------------------------------------------------

    def metadata(self, model: LoadedModel) -> dict[str, str]:
        return {
            "ss_v2": "False",
            "ss_base_model_version": self.base_model_version,
            "modelspec.architecture": self.lora_architecture,
            "modelspec.implementation": "diffusers",
            "modelspec.prediction_type": model.prediction_type,
        }

    def save_single_file(self, model: LoadedModel, dest: Path, *, dtype: torch.dtype | None = None) -> Path:
        return single_file.save_checkpoint(dest, model.unet, model.vae, model.text_encoders[0], dtype=dtype)

    def pipeline(self, model: LoadedModel, scheduler: Any, *, img2img: bool = False,
                 controlnet: Any = None) -> Any:
        import diffusers

        parts = {"vae": model.vae, "text_encoder": model.text_encoders[0], "tokenizer": model.tokenizers[0],
                 "unet": model.unet, "scheduler": scheduler, "safety_checker": None, "feature_extractor": None,
                 "requires_safety_checker": False}
        if controlnet is not None:
            cls = (diffusers.StableDiffusionControlNetImg2ImgPipeline if img2img
                   else diffusers.StableDiffusionControlNetPipeline)
            pipe = cls(controlnet=controlnet, **parts)
        else:
            cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
            pipe = cls(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode_prompts(self, model: LoadedModel, prompt: str, negative: str, *, clip_skip: int,
                       device: Any) -> dict[str, torch.Tensor]:
        from charfw.generation.prompts import encode_pair

        cond, uncond = encode_pair(model.tokenizers[0], model.text_encoders[0], prompt, negative,
                                   clip_skip=clip_skip, device=device)
        return {"prompt_embeds": cond, "negative_prompt_embeds": uncond}


def where_to_load(source: ModelSource) -> str:
    """What diffusers' ``from_pretrained`` gets for a source: the built-in model's folder
    (built on first use), a local folder, or the Hugging Face id."""
    if source.kind == "builtin":
        return str(ensure_builtin(source))
    return str(source.path) if source.path is not None else source.ref


def load_vae(source: ModelSource, pipeline: str) -> Any:
    """A VAE given apart from the base model (``model.vae``): a single file (a full
    checkpoint's ``first_stage_model.*`` or a VAE-only file such as ``kl-f8-anime2.ckpt``),
    converted with the config of ``pipeline``'s shipped folder whose VAE has its width; a
    diffusers VAE folder (``config.json``) or a model folder / id (its ``vae/``)."""
    from diffusers import AutoencoderKL

    if source.kind == "single_file":
        assert source.path is not None
        state = single_file.read_state_dict(source.path)
        width = next((v.shape[0] for k, v in state.items() if k.endswith("encoder.conv_in.weight")), None)
        for config_dir in single_file.shipped_configs(pipeline).values():
            vae_config = json.loads((config_dir / "vae" / "config.json").read_text("utf-8"))
            if vae_config["block_out_channels"][0] == width:
                return single_file.load_vae(source.path, config_dir, state=state)
        raise CharfwError("not an SD VAE file (no encoder.conv_in weights of a known width)", path=source.path)
    where = where_to_load(source)
    try:
        if source.path is not None and (source.path / "config.json").is_file():
            return AutoencoderKL.from_pretrained(where)
        return AutoencoderKL.from_pretrained(where, subfolder="vae")
    except (OSError, ValueError) as exc:
        raise CharfwError(f"cannot load the VAE '{source.ref}' ({str(exc).splitlines()[0][:200]})") from None


def clip_token_ids(tokenizer: Any, captions: list[str], max_token_length: int | None) -> torch.Tensor:
    """kohya's token ids: (B, 77), or (B, chunks, 77) for ``max_token_length`` 150 or 225 (the
    caption tokenized to that length, cut into chunks of 75 each wrapped in the first and
    last token). A tokenizer that pads with its own token (SDXL's second) gets kohya's two
    fixes per chunk: a chunk cut in the middle of text ends with the end token, a chunk
    that starts with padding starts with the end token."""
    length = max_token_length or CHUNK
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=length + 2,
                    return_tensors="pt").input_ids
    if length == CHUNK:
        return ids
    chunks = [torch.cat([ids[:, :1], ids[:, 1 + CHUNK * i : 1 + CHUNK * (i + 1)], ids[:, -1:]], dim=1)
              for i in range(length // CHUNK)]
    out = torch.stack(chunks, dim=1)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is not None and pad != eos:
        cut = (out[..., -2] != eos) & (out[..., -2] != pad)
        out[..., -1] = torch.where(cut, eos, out[..., -1])
        out[..., 1] = torch.where(out[..., 1] == pad, eos, out[..., 1])
    return out


def join_chunks(states: torch.Tensor) -> torch.Tensor:
    """kohya's long captions: (B, chunks, 77, dim) states of chunks encoded one by one →
    ``start + chunk1 + chunk2 (+ chunk3) + end`` along the token axis."""
    middle = [states[:, i, 1:-1] for i in range(states.shape[1])]
    return torch.cat([states[:, 0, :1], *middle, states[:, -1, -1:]], dim=1)
