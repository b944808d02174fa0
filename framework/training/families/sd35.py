"""Stable Diffusion 3.5 (Medium, Large; SD3 Medium loads too): an MMDiT transformer with
three text encoders, trained by flow matching, as diffusers' ``train_dream_booth_lora_sd3.py``.

**Loading** (offline for local models): a diffusers folder or Hugging Face id
(``transformer/``, ``text_encoder[_2,_3]/``, ``tokenizer[_2,_3]/``, ``vae/``, ``scheduler/``),
or a single file in SD3's own layout (:mod:`charfw.training.single_file_sd3`, configs from
``model_configs/``). T5-XXL is loaded only with ``t5: true`` (it is most of the model's
memory); without it its part of the conditioning is zeros, as diffusers' pipeline and
kohya do when T5 is absent. A single file has no tokenizers: the CLIP ones are built from
the BPE merges charfw ships (CLIP-G pads with ``!``, token 0, as SD3's reference code); the
T5 one comes from the Hugging Face cache (``google/t5-v1_1-xxl``), else a one-line error.

**Text conditioning** (``encode_prompt`` of the diffusers script): each CLIP encoder's
penultimate hidden state (77 tokens) and its projected pooled output; the states are
joined along the features (768 + 1280 = 2048), zero-padded to T5's width (4096) and
followed by T5's ``t5_max_length`` token states (or zeros): ``prompt_embeds`` (B, 77 +
t5_max_length, 4096); the pooled outputs joined: ``pooled_projections`` (B, 2048). Clip
skip does not apply (SD3 is conditioned on the penultimate layer by design) and
``max_token_length`` neither (77 CLIP tokens, as diffusers).

**Objective** (:class:`FlowMatchingObjective`): ``x_t = (1 - σ) x₀ + σ ε`` on the
scheduler's shifted sigma table (shift 3.0 for SD 3.5), the timestep index drawn by
``weighting_scheme`` (``logit_normal`` with ``logit_mean``/``logit_std``, ``mode`` with
``mode_scale``, or uniform for ``sigma_sqrt``, ``cosmap``, ``none``), the loss weighted as
diffusers' ``compute_loss_weighting_for_sd3``; with ``precondition_outputs`` (diffusers'
default) the prediction is turned into ``x₀`` (``pred·(-σ) + x_t``) and compared with the
latents, else the target is the flow ``ε - x₀``.

**Network**: LoRA on the transformer's attention (``attn``, 3.5 Medium's ``attn2``) and
feed-forward (``ff``, ``ff_context``) Linear layers, optionally CLIP-L and CLIP-G's
attention (``q/k/v/out_proj``, diffusers' ``--train_text_encoder`` targets); the file is in
diffusers' peft format (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``,
``text_encoder.…``, ``text_encoder_2.…``), what ``StableDiffusion3Pipeline.load_lora_weights``
and ComfyUI read. Convolution networks (``lora3x3``, LoHa) have nothing to attach to.
Generation applies those files, OneTrainer's (the same names charfw uses inside) and
kohya's / ComfyUI's native-named ones (:meth:`SD35Family.adapt_lora`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ...errors import CharfwError
from ..model_sources import ModelSource
from ..networks.targets import NetworkRoot
from . import LoadedModel, ModelFamily, NoisedBatch, Objective, TextConditioning
from .sd1 import load_vae

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ..settings import TrainSettings

CLIP_LENGTH = 77
#: the transformer's layers a network trains: attention and feed-forward Linear layers
TRANSFORMER_TARGETS = ("Attention", "FeedForward")
#: every Linear of the joint blocks, for applying files that train more (adaLN linears)
TRANSFORMER_ALL = ("JointTransformerBlock",)
#: diffusers' SD3 text-encoder targets (q/k/v/out_proj): the CLIP attention blocks
CLIP_ATTENTION = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2")
CLIP_ALL = (*CLIP_ATTENTION, "CLIPMLP")
T5_TOKENIZER = "google/t5-v1_1-xxl"


class SD35Family(ModelFamily):
    name = "sd35"
    base_model_version = "sd3"
    lora_architecture = "stable-diffusion-3-5-medium/lora"
    default_resolution = 1024
    #: the CLIP encoders' penultimate states, always (as diffusers' SD3 pipeline and trainer)
    uses_clip_skip = False
    #: diffusers' ControlNet class for this family's pipelines
    controlnet_class = "SD3ControlNetModel"

    def __init__(self) -> None:
        #: load T5-XXL and condition on it (off: zeros in its place)
        self.t5 = False
        #: T5 tokens per caption (diffusers' training default 77; up to 512)
        self.t5_max_length = 77
        self.settings: TrainSettings | None = None

    def enable_t5(self, max_length: int) -> None:
        """Load T5 and condition on ``max_length`` of its tokens (generation: diffusers'
        pipelines use 256)."""
        self.t5, self.t5_max_length = True, max_length

    def configure(self, settings: TrainSettings) -> None:
        """Take the run's SD 3.5 settings (T5 on or off, its length, the weighting scheme)."""
        from ..networks import network_type

        kind = network_type(settings.network).name
        if kind != "lora":
            what = "LoRA3x3's 3x3 convolutions" if kind == "lora3x3" else "LoHa"
            raise CharfwError(f"network {settings.network} cannot train SD 3.5: its MMDiT has no convolutions for "
                              f"{what}, and its LoRA format (diffusers') holds plain LoRA factors only",
                              hint="set network: lora (charfw train --network lora)")
        self.settings = settings
        self.t5 = settings.t5
        self.t5_max_length = settings.t5_max_length

    # --- loading -------------------------------------------------------------------------

    def load(self, source: ModelSource, vae: ModelSource | None, *, cache_dir: Path) -> LoadedModel:
        parts = self._load_parts(source, vae, cache_dir=cache_dir)
        if "vae" not in parts:
            raise CharfwError("this checkpoint holds no VAE (first_stage_model.*)", path=source.path,
                              hint="give the SD 3.5 VAE as model.vae (charfw train --vae)")
        encoders = [parts["text_encoder"], parts["text_encoder_2"]]
        tokenizers = [parts["tokenizer"], parts["tokenizer_2"]]
        if self.t5:
            encoders.append(parts["text_encoder_3"])
            tokenizers.append(parts["tokenizer_3"])
        model = LoadedModel(self, parts["transformer"], encoders, tokenizers, parts["vae"], parts["scheduler_config"],
                            source, vae)
        model.extra["t5_width"] = int(parts["transformer"].config.joint_attention_dim)
        return model

    def _load_diffusers(self, where: str, source: ModelSource) -> dict[str, Any]:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        try:
            parts: dict[str, Any] = {
                "transformer": SD3Transformer2DModel.from_pretrained(where, subfolder="transformer"),
                "vae": AutoencoderKL.from_pretrained(where, subfolder="vae"),
                "text_encoder": CLIPTextModelWithProjection.from_pretrained(where, subfolder="text_encoder"),
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(where, subfolder="text_encoder_2"),
                "tokenizer": CLIPTokenizer.from_pretrained(where, subfolder="tokenizer"),
                "tokenizer_2": CLIPTokenizer.from_pretrained(where, subfolder="tokenizer_2"),
                "scheduler_config": dict(FlowMatchEulerDiscreteScheduler.load_config(where, subfolder="scheduler")),
            }
            if self.t5:
                from transformers import T5EncoderModel, T5TokenizerFast

                parts["text_encoder_3"] = T5EncoderModel.from_pretrained(where, subfolder="text_encoder_3")
                parts["tokenizer_3"] = T5TokenizerFast.from_pretrained(where, subfolder="tokenizer_3")
        except (OSError, ValueError) as exc:
            hint = ("check the id and your network, or download it first"
                    if source.kind == "hub" else "is it a complete SD 3.5 diffusers folder?")
            raise CharfwError(f"cannot load the base model '{source.ref}' ({str(exc).splitlines()[0][:200]})",
                              hint=hint) from None
        return parts

    def _load_single_file(self, path: Path, cache_dir: Path) -> dict[str, Any]:
        import json

        from transformers import CLIPTokenizer

        from .. import single_file_sd3
        from ..clip_tokenizer import clip_tokenizer_files

        config_dir, parts = single_file_sd3.load_checkpoint(path, t5=self.t5)
        if (config_dir / "tokenizer" / "tokenizer.json").is_file():
            parts["tokenizer"] = CLIPTokenizer.from_pretrained(str(config_dir / "tokenizer"))
            parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(str(config_dir / "tokenizer_2"))
        else:
            files = clip_tokenizer_files(cache_dir)
            vocab, merges = str(files / "vocab.json"), str(files / "merges.txt")
            parts["tokenizer"] = CLIPTokenizer(vocab, merges, model_max_length=CLIP_LENGTH)
            parts["tokenizer_2"] = CLIPTokenizer(vocab, merges, model_max_length=CLIP_LENGTH, pad_token="!")
        if self.t5:
            parts["tokenizer_3"] = self._t5_tokenizer(config_dir, path)
        parts["scheduler_config"] = json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text("utf-8"))
        return parts

    def _t5_tokenizer(self, config_dir: Path, path: Path) -> Any:
        from transformers import T5TokenizerFast

        if (config_dir / "tokenizer_3" / "tokenizer.json").is_file():
            return T5TokenizerFast.from_pretrained(str(config_dir / "tokenizer_3"))
        # transformers 5 makes an empty tokenizer (special tokens only) when the files are
        # missing, so their presence in the cache is checked first
        from huggingface_hub import try_to_load_from_cache

        cached = [try_to_load_from_cache(T5_TOKENIZER, name) for name in ("tokenizer.json", "spiece.model")]
        if not any(isinstance(found, str) for found in cached):
            raise CharfwError(f"t5 is on, but the T5 tokenizer ({T5_TOKENIZER}) is not in the Hugging Face cache",
                              path=path, hint=f"download it once (hf download {T5_TOKENIZER}), or train without t5")
        return T5TokenizerFast.from_pretrained(T5_TOKENIZER, local_files_only=True)

    def _load_vae(self, source: ModelSource) -> Any:
        """A VAE given apart (``model.vae``): a file (a checkpoint's ``first_stage_model.*`` or
        a VAE-only file) is read with the shipped SD3 VAE config of its width."""
        import json

        from .. import single_file, single_file_sd3

        if source.kind != "single_file":
            return load_vae(source, "StableDiffusion3Pipeline")
        assert source.path is not None
        state = single_file.read_state_dict(source.path)
        width = next((list(v.shape) for k, v in state.items() if k.endswith("encoder.conv_in.weight")), None)
        for folder in single_file_sd3.shipped_configs().values():
            config = json.loads((folder / "vae" / "config.json").read_text("utf-8"))
            if width == [config["block_out_channels"][0], config["in_channels"], 3, 3]:
                return single_file.load_vae(source.path, folder, state=state)
        raise CharfwError("not an SD3 VAE file (no encoder.conv_in weights of a known width)", path=source.path)

    # --- networks ------------------------------------------------------------------------

    def network_roots(self, model: LoadedModel) -> list[NetworkRoot]:
        return self._roots(model.unet, model.text_encoders, TRANSFORMER_TARGETS, CLIP_ATTENTION)

    def roots_for(self, unet: Any, text_encoders: list[Any]) -> list[NetworkRoot]:
        """For applying files: every Linear of the joint blocks and of the CLIP layers."""
        return self._roots(unet, text_encoders, TRANSFORMER_ALL, CLIP_ALL)

    @staticmethod
    def _roots(transformer: Any, text_encoders: list[Any], blocks: tuple[str, ...],
               clip: tuple[str, ...]) -> list[NetworkRoot]:
        roots = [NetworkRoot("lora_transformer", transformer, "unet", TRANSFORMER_TARGETS, blocks,
                             file_root="transformer")]
        for i, (prefix, part) in enumerate((("lora_te1", "text_encoder"), ("lora_te2", "text_encoder_2"))):
            roots.append(NetworkRoot(prefix, text_encoders[i], "text_encoder", CLIP_ATTENTION, clip, file_root=part))
        return roots

    def adapt_lora(self, lora: Any, unet: Any) -> Any:
        """kohya's and ComfyUI's SD3 LoRAs (``lora_unet_joint_blocks_…``, fused ``qkv``) on
        diffusers' layers, exactly (:func:`~charfw.training.single_file_sd3.native_lora_to_diffusers`)."""
        if not any(name.startswith("lora_unet_joint_blocks_") for name in lora.modules):
            return lora
        from ..single_file_sd3 import native_lora_to_diffusers

        return native_lora_to_diffusers(lora, int(unet.config.num_layers))

    # --- conditioning --------------------------------------------------------------------

    def tokenize(self, model: LoadedModel, captions: list[str], max_token_length: int | None) -> dict[str, torch.Tensor]:
        ids = {f"clip_{i}": tok(captions, padding="max_length", truncation=True, max_length=CLIP_LENGTH,
                               return_tensors="pt").input_ids for i, tok in enumerate(model.tokenizers[:2])}
        if len(model.tokenizers) > 2:
            ids["t5"] = model.tokenizers[2](captions, padding="max_length", truncation=True,
                                            max_length=self.t5_max_length, add_special_tokens=True,
                                            return_tensors="pt").input_ids
        return ids

    def encode_text(self, model: LoadedModel, input_ids: Mapping[str, torch.Tensor], *, clip_skip: int,
                    text_encoders: list[Any] | None = None) -> TextConditioning:
        run = text_encoders or model.text_encoders
        states, pooled = [], []
        for i in range(2):
            out = run[i](input_ids[f"clip_{i}"].to(model.text_encoders[i].device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        t5 = None
        if "t5" in input_ids:
            t5 = run[2](input_ids["t5"].to(_fp16_safe_t5(model.text_encoders[2]).device))[0]
        return join_conditioning(states, pooled, t5, model.extra["t5_width"], self.t5_max_length)

    def text_layers_unused(self, clip_skip: int) -> bool:
        return False  # the penultimate states and the pooled output (the last layer's) both condition

    def objective(self, model: LoadedModel, settings: TrainSettings, device: torch.device) -> Objective:
        return FlowMatchingObjective(model.scheduler_config, settings, device)

    def predict(self, unet: Any, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: TextConditioning, inputs: Any) -> torch.Tensor:
        return unet(hidden_states=noisy_latents, timestep=timesteps,
                    encoder_hidden_states=conditioning["encoder_hidden_states"],
                    pooled_projections=conditioning["pooled_projections"], return_dict=False)[0]

    # --- files and generation ------------------------------------------------------------

    def metadata(self, model: LoadedModel) -> dict[str, str]:
        config = model.unet.config
        variant = "large" if int(config.num_layers) >= 38 else "medium"
        meta = {
            "ss_base_model_version": f"sd3_5_{variant}",
            "modelspec.architecture": f"stable-diffusion-3-5-{variant}/lora",
            "modelspec.implementation": "diffusers",
            "modelspec.prediction_type": "flow",
            "ss_use_t5xxl": str(self.t5),
            "ss_t5xxl_max_token_length": str(self.t5_max_length),
            "ss_flow_shift": str(model.scheduler_config.get("shift", 1.0)),
        }
        s = self.settings
        if s is not None:
            meta.update({"ss_weighting_scheme": s.weighting_scheme, "ss_logit_mean": str(s.logit_mean),
                         "ss_logit_std": str(s.logit_std), "ss_mode_scale": str(s.mode_scale),
                         "ss_precondition_outputs": str(s.precondition_outputs)})
        return meta

    def save_single_file(self, model: LoadedModel, dest: Path, *, dtype: torch.dtype | None = None) -> Path:
        """SD3's own layout (:mod:`charfw.training.single_file_sd3`), T5 included when loaded."""
        from .. import single_file_sd3

        return single_file_sd3.save_checkpoint(dest, model.unet, model.vae, model.text_encoders, dtype=dtype)

    def pipeline(self, model: LoadedModel, scheduler: Any, *, img2img: bool = False, controlnet: Any = None) -> Any:
        import diffusers

        parts = {"transformer": model.unet, "scheduler": scheduler, "vae": model.vae,
                 "text_encoder": model.text_encoders[0], "tokenizer": model.tokenizers[0],
                 "text_encoder_2": model.text_encoders[1], "tokenizer_2": model.tokenizers[1],
                 "text_encoder_3": model.text_encoders[2] if len(model.text_encoders) > 2 else None,
                 "tokenizer_3": model.tokenizers[2] if len(model.tokenizers) > 2 else None}
        if controlnet is not None:
            if img2img:
                raise CharfwError("SD 3.5 has no ControlNet image-to-image pipeline in diffusers, so the hires fix "
                                  "cannot run with a ControlNet", hint="leave out the hires fix or the ControlNet")
            if isinstance(controlnet, list):
                controlnet = diffusers.SD3MultiControlNetModel(controlnet)
            pipe = diffusers.StableDiffusion3ControlNetPipeline(controlnet=controlnet, **parts)
        else:
            cls = diffusers.StableDiffusion3Img2ImgPipeline if img2img else diffusers.StableDiffusion3Pipeline
            pipe = cls(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode_prompts(self, model: LoadedModel, prompt: str, negative: str, *, clip_skip: int,
                       device: Any) -> dict[str, torch.Tensor]:
        """A1111 weighting and 75-token chunks on both CLIP encoders (each chunk's penultimate
        states; the pooled output of the first chunk, A1111's rule for SDXL); T5, when loaded,
        gets the text without emphasis syntax (zeros without it). Clip skip does not apply."""
        from charfw.generation.prompts import encode_pair_pooled, plain_text

        states: list[list[torch.Tensor]] = [[], []]
        pooled: list[list[torch.Tensor]] = [[], []]
        for tokenizer, encoder in zip(model.tokenizers[:2], model.text_encoders[:2], strict=True):
            c, cp, u, up = encode_pair_pooled(tokenizer, encoder, prompt, negative, device=device)
            states[0].append(c)
            pooled[0].append(cp)
            states[1].append(u)
            pooled[1].append(up)
        t5: list[torch.Tensor | None] = [None, None]
        if len(model.text_encoders) > 2:
            with torch.no_grad():
                ids = self.tokenize(model, [plain_text(prompt), plain_text(negative)], None)["t5"].to(device)
                t5 = list(_fp16_safe_t5(model.text_encoders[2])(ids)[0].split(1))
        cond, uncond = (join_conditioning(states[i], pooled[i], t5[i], model.extra["t5_width"], self.t5_max_length)
                        for i in range(2))
        return {"prompt_embeds": cond["encoder_hidden_states"], "pooled_prompt_embeds": cond["pooled_projections"],
                "negative_prompt_embeds": uncond["encoder_hidden_states"],
                "negative_pooled_prompt_embeds": uncond["pooled_projections"]}


def _fp16_safe_t5(t5: Any) -> Any:
    """T5 v1.1 overflows in float16 (its feed-forward output projections ``wo`` go past
    65504): as transformers' ``_keep_in_fp32_modules``, those layers are kept in float32
    when the rest was cast to float16 (T5's forward casts their input to match). Once per
    model; bfloat16 and float32 models are left alone."""
    for name, module in t5.named_modules():
        if name.endswith("DenseReluDense.wo") and module.weight.dtype == torch.float16:
            module.float()
    return t5


def join_conditioning(states: list[torch.Tensor], pooled: list[torch.Tensor], t5: torch.Tensor | None,
                      t5_width: int, t5_length: int) -> TextConditioning:
    """SD3's conditioning from the CLIP states and pooled outputs and T5's states (zeros of
    ``t5_length`` tokens when None): diffusers' ``encode_prompt``."""
    clip = torch.cat(states, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5_width - clip.shape[-1]))
    if t5 is None:
        t5 = clip.new_zeros(clip.shape[0], t5_length, t5_width)
    return TextConditioning({"encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                             "pooled_projections": torch.cat(pooled, dim=-1)})


# --- the objective -----------------------------------------------------------------------------


class FlowMatchingObjective(Objective):
    """Rectified flow on the scheduler's shifted sigmas, diffusers' SD3 LoRA step (its own
    ``compute_density_for_timestep_sampling`` and ``compute_loss_weighting_for_sd3``).

    Random numbers, in order from the run's generator: the noise, then the timestep density."""

    def __init__(self, scheduler_config: Mapping[str, Any], settings: TrainSettings, device: torch.device) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.settings = settings
        self.device = device
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        #: the shifted, descending table (timesteps = sigmas * 1000)
        self.timesteps = scheduler.timesteps.to(device, torch.float32)
        self.sigmas = scheduler.sigmas[: len(self.timesteps)].to(device, torch.float32)

    def noise(self, latents: torch.Tensor, generator: torch.Generator) -> NoisedBatch:
        from diffusers.training_utils import (
            compute_density_for_timestep_sampling,
            compute_loss_weighting_for_sd3,
        )

        s = self.settings
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        u = compute_density_for_timestep_sampling(s.weighting_scheme, latents.shape[0], logit_mean=s.logit_mean,
                                                  logit_std=s.logit_std, mode_scale=s.mode_scale,
                                                  device=self.device, generator=generator)
        index = (u * self.num_train_timesteps).long().clamp(0, len(self.timesteps) - 1)
        sigmas = self.sigmas[index].reshape(-1, *[1] * (latents.ndim - 1))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        target = latents if s.precondition_outputs else noise - latents
        weights = compute_loss_weighting_for_sd3(s.weighting_scheme, sigmas)
        return NoisedBatch(noisy, self.timesteps[index], target, weights, {"sigmas": sigmas})

    def loss(self, prediction: torch.Tensor, noised: NoisedBatch, sample_weights: torch.Tensor) -> torch.Tensor:
        prediction = prediction.float()
        if self.settings.precondition_outputs:
            prediction = prediction * (-noised.extra["sigmas"]) + noised.noisy.float()
        assert noised.weights is not None
        loss = noised.weights * (prediction - noised.target.float()) ** 2
        loss = loss.reshape(loss.shape[0], -1).mean(dim=1)
        return (loss * sample_weights).mean()
