"""The trainer's settings: one validated model for the manifest's ``train:`` block and for
``charfw train``'s options, with the method's defaults (the seed's LoRA.bat).

Names follow kohya's ``train_network.py`` options where one exists (``max_train_steps``,
``lr_scheduler``, ``noise_offset``, ...), so a switching user finds them. Rules from the
method live here too: alpha written as ``A1`` / ``A50p``, the text-encoder learning rate
(44 % of the UNet's, rounded down to whole 1e-6 when not given) and the output name
(``krnk-Lora3x3A50p-AdamW8-128-100-1200``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from charfw.training.model_sources import (
    BUILTIN_PREFIX,
    BUILTIN_TRAIN_DEFAULTS,
    FAMILY_TRAIN_DEFAULTS,
)
from charfw.training.networks import network_type

from ..build.items import safe_file_stem
from ..errors import CharfwError

OPTIMIZERS = ("AdamW", "AdamW8bit", "Adafactor", "Prodigy")
#: the method's short spellings in output names
OPTIMIZER_LABELS = {"AdamW": "AdamW", "AdamW8bit": "AdamW8", "Adafactor": "AdaFactor", "Prodigy": "Prodigy"}
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
            "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")
ALPHA_RE = re.compile(r"^A(\d+(?:\.\d+)?)(p?)$", re.IGNORECASE)


def parse_alpha(value: str | float | int | None, dim: int) -> float | None:
    """``A1`` → 1, ``A50p`` → 50 % of ``dim``, a number → itself, None → kohya's default (dim)."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("alpha must not be negative")
        return float(value)
    match = ALPHA_RE.match(str(value).strip())
    if not match:
        try:
            return parse_alpha(float(str(value)), dim)
        except ValueError:
            raise ValueError(f"alpha {value!r}: write a number, A<n> (alpha n) or A<n>p (n % of the dim, e.g. A50p)") from None
    number = float(match.group(1))
    return dim * number / 100.0 if match.group(2) else number


def alpha_label(value: str | float | int | None, dim: int) -> str:
    """How the method's output names write alpha: ``A1``, ``A50p``; other values as ``A<n>``."""
    if isinstance(value, str) and ALPHA_RE.match(value.strip()):
        text = value.strip()
        return "A" + text[1:]
    number = parse_alpha(value, dim)
    if number is None:
        number = float(dim)
    if dim and number == dim / 2:
        return "A50p"
    return f"A{int(number)}" if float(number).is_integer() else f"A{number:g}".replace(".", "_")


def text_encoder_lr_for(unet_lr: float) -> float:
    """The method's rule: 44 % of the UNet's rate, rounded down to whole 1e-6 (the seed's
    LoRA.bat takes rates as integers of 1e-6: 100 → 44). Rates below 3e-6 keep 44 %."""
    units = round(unet_lr * 1e6, 6)
    rounded = math.floor(units * 44 / 100 + 1e-9)
    return rounded * 1e-6 if rounded >= 1 else unet_lr * 0.44


class TrainSettings(BaseModel):
    """Everything that decides how a LoRA is trained. The base model, VAE and clip skip
    come from the manifest's ``model:`` section in a build (options of ``charfw train``)."""

    model_config = ConfigDict(extra="forbid")

    # --- the network -----------------------------------------------------------------
    network: str = Field("lora3x3", description="lora (attention and projections), lora3x3 (plus 3x3 convs), "
                         "loha (LyCORIS LoHa)")
    dim: int = Field(128, ge=1, le=4096, description="rank of Linear and 1x1 layers (kohya's network_dim)")
    alpha: str | float = Field("A50p", description="A1 (alpha 1), A50p (half the dim) or a number "
                               "(kohya's network_alpha)")
    conv_dim: int | None = Field(None, ge=0, le=4096, description="rank of 3x3 convolutions (lora3x3, loha); "
                                 "default: dim; 0 leaves them out")
    conv_alpha: str | float | None = Field(None, description="default: alpha applied to conv_dim")
    network_dropout: float | None = Field(None, ge=0, lt=1, description="dropout on the down projections (lora)")
    train_unet_only: bool = Field(False, description="no text-encoder modules (kohya's network_train_unet_only)")
    text_encoders: list[int] | None = Field(None, description="which text encoders get modules, counted from 1 "
                                            "(SDXL: [1] CLIP-L only, [2] OpenCLIP-G only, [] none); default: all "
                                            "the model family trains")
    continue_from: str | None = Field(None, description="continue training from this LoRA file (the seed's "
                                      "'continue' argument; kohya's network_weights)")

    # --- learning ----------------------------------------------------------------------
    learning_rate: float = Field(1e-4, ge=0, description="the UNet's learning rate (the seed's 100 = 100e-6)")
    text_encoder_lr: float | None = Field(None, ge=0, description="default: 44 % of learning_rate, rounded down to "
                                          "whole 1e-6 (Prodigy: the same); 0 freezes the text encoder")
    optimizer: str = Field("AdamW8bit", description=f"{', '.join(OPTIMIZERS)} (AdamW8bit needs an NVIDIA GPU)")
    optimizer_args: dict[str, Any] = Field(default_factory=dict, description="extra optimizer arguments, "
                                           "e.g. {weight_decay: 0.01}")
    lr_scheduler: str = Field("cosine_with_restarts", description=", ".join(SCHEDULERS))
    lr_scheduler_num_cycles: int = Field(1, ge=1, description="restarts of cosine_with_restarts")
    lr_scheduler_power: float = Field(1.0, description="power of the polynomial schedule")
    lr_warmup_steps: float = Field(0, ge=0, description="warm-up steps, or a fraction of the run below 1")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0: off)")
    gradient_accumulation_steps: int = Field(1, ge=1, description="batches per optimizer step")
    max_train_steps: int = Field(1200, ge=1, description="optimizer steps")
    max_train_epochs: int | None = Field(None, ge=1, description="epochs (overrides max_train_steps)")
    seed: int = Field(31337, description="seeds noise, data order and augmentation")

    # --- noise and loss ----------------------------------------------------------------
    noise_offset: float = Field(0.0, ge=0, description="kohya's noise offset (0.05-0.1 widens the brightness range)")
    min_snr_gamma: float | None = Field(None, gt=0, description="min-SNR loss weighting (5 is common)")
    prior_loss_weight: float = Field(1.0, ge=0, description="loss weight of regularisation images (is_reg)")
    min_timestep: int = Field(0, ge=0, le=999, description="lowest training timestep")
    max_timestep: int = Field(1000, ge=1, le=1000, description="highest training timestep (exclusive)")
    # SD 3.5 (flow matching), diffusers' train_dreambooth_lora_sd3.py options
    weighting_scheme: Literal["logit_normal", "mode", "sigma_sqrt", "cosmap", "none"] = Field(
        "logit_normal", description="SD 3.5: timestep sampling and loss weighting (diffusers' SD3 trainer)")
    logit_mean: float = Field(0.0, description="SD 3.5, logit_normal: mean of the normal drawn through a sigmoid")
    logit_std: float = Field(1.0, gt=0, description="SD 3.5, logit_normal: its standard deviation")
    mode_scale: float = Field(1.29, description="SD 3.5, mode: how much the timesteps gather at the middle")
    precondition_outputs: bool = Field(True, description="SD 3.5: compare the prediction as x0 (pred * -sigma + "
                                       "noisy) with the latents, as diffusers; off: the flow noise - latents")
    t5: bool = Field(False, description="SD 3.5: load T5-XXL and condition on it (much memory; off: zeros)")
    t5_max_length: int = Field(77, ge=1, le=512, description="SD 3.5: T5 tokens per caption")

    # --- precision, memory and speed ---------------------------------------------------
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("fp16", description="autocast on a GPU; a CPU trains "
                                                           "in float32")
    save_precision: Literal["fp16", "bf16", "float"] = Field("fp16", description="dtype of the saved file")
    gradient_checkpointing: bool = Field(True, description="recompute UNet activations: less memory, ~25 % slower")
    cache_latents: Literal["disk", "memory", "off"] = Field("disk", description="VAE latents kept on disk (shared "
                                                            "between runs and parts), in memory, or not at all")
    cache_text_encoder_outputs: bool = Field(True, description="when the text encoder is frozen and captions "
                                             "are fixed")
    vae_batch_size: int = Field(4, ge=1, description="images per VAE call while caching")
    max_token_length: Literal[75, 150, 225] | None = Field(None, description="tokens per caption (75 by default)")
    resolution: int | None = Field(None, ge=64, description="train at this resolution instead of the dataset "
                                   "config's (quick runs on small models)")
    channels_last: bool = Field(False, description="UNet activations in channels-last layout (faster convolutions "
                                "on recent NVIDIA GPUs)")
    torch_compile: bool = Field(False, description="compile the UNet with torch.compile (GPU; the first step "
                                "takes minutes, later ones are faster)")

    # --- data --------------------------------------------------------------------------
    bad_images: Literal["skip", "stop"] = Field("skip", description="an unreadable image is left out (and "
                                                "reported) or stops the run before training")

    # --- saving and resuming -----------------------------------------------------------
    output_name: str | None = Field(None, description="file name without .safetensors (default: the method's, "
                                    "e.g. krnk-Lora3x3A50p-AdamW8-128-100-1200)")
    save_every_n_steps: int | None = Field(None, ge=1, description="also save <name>-step00000100.safetensors ...")
    save_every_n_epochs: int | None = Field(None, ge=1, description="also save <name>-000001.safetensors ...")
    save_last_n: int | None = Field(None, ge=1, description="keep only the newest N of those")
    save_state: bool = Field(False, description="save resumable state with each of those and at the end")
    save_state_every_minutes: float = Field(0, ge=0, description="save resumable state this often (0: never)")
    save_last_n_states: int = Field(1, ge=1, description="resumable states kept")
    training_comment: str | None = Field(None, description="stored as ss_training_comment")

    # --- sampling during training ------------------------------------------------------
    sample_prompts: str | None = Field(None, description="prompt file in kohya's syntax (.txt with --n --w --h "
                                       "--d --s --l --ss, or .toml / .json)")
    sample_every_n_steps: int | None = Field(None, ge=1, description="sample every N steps")
    sample_every_n_epochs: int | None = Field(None, ge=1, description="sample every N epochs")
    sample_at_first: bool = Field(False, description="sample before the first step")
    sample_sampler: str = Field("ddim", description="default sampler of the prompts (kohya's names)")

    # --- logging -----------------------------------------------------------------------
    log_with: Literal["tensorboard", "wandb", "all", "none"] = Field("tensorboard", description="training logs")
    log_prefix: str | None = Field(None, description="prefix of the log run's name")
    wandb_run_name: str | None = Field(None, description="the W&B run's name")

    @field_validator("network")
    @classmethod
    def _network(cls, value: str) -> str:
        try:
            return network_type(value).name
        except CharfwError as exc:
            raise ValueError(exc.message) from None

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, value: str) -> str:
        for name in OPTIMIZERS:
            if value.replace("_", "").lower() in (name.lower(), OPTIMIZER_LABELS[name].lower()):
                return name
        raise ValueError(f"unknown optimizer '{value}'; use one of {', '.join(OPTIMIZERS)}")

    @field_validator("lr_scheduler")
    @classmethod
    def _scheduler(cls, value: str) -> str:
        if value not in SCHEDULERS:
            raise ValueError(f"unknown lr_scheduler '{value}'; use one of {', '.join(SCHEDULERS)}")
        return value

    @field_validator("sample_sampler")
    @classmethod
    def _sampler(cls, value: str) -> str:
        if value.lower() not in SAMPLERS:
            raise ValueError(f"unknown sampler '{value}'; use one of {', '.join(SAMPLERS)}")
        return value.lower()

    @field_validator("alpha", "conv_alpha")
    @classmethod
    def _alpha(cls, value: Any) -> Any:
        if value is not None:
            parse_alpha(value, 1)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainSettings:
        if self.network == "lora" and self.conv_dim:
            raise ValueError("conv_dim needs network: lora3x3 (lora trains attention and projections only)")
        if self.min_timestep >= self.max_timestep:
            raise ValueError("min_timestep must be below max_timestep")
        if self.save_last_n is not None and not (self.save_every_n_steps or self.save_every_n_epochs):
            raise ValueError("save_last_n needs save_every_n_steps or save_every_n_epochs")
        if self.sample_prompts is None and (self.sample_every_n_steps or self.sample_every_n_epochs or self.sample_at_first):
            raise ValueError("sampling needs sample_prompts (a prompt file)")
        if self.optimizer == "Prodigy" and self.text_encoder_lr not in (None, 0, self.learning_rate):
            raise ValueError("Prodigy needs the same learning rate for the UNet and the text encoder (or 0 for "
                             "one of them); leave text_encoder_lr out")
        return self

    # --- resolved values -----------------------------------------------------------------

    def network_config(self) -> Any:
        kind = network_type(self.network)
        conv_dim = None
        if kind.allows_conv:
            conv_dim = self.dim if self.conv_dim is None else (self.conv_dim or None)
        conv_alpha = None
        if conv_dim is not None:
            conv_alpha = parse_alpha(self.conv_alpha if self.conv_alpha is not None else self.alpha, conv_dim)
        return kind.config(dim=self.dim, alpha=parse_alpha(self.alpha, self.dim), conv_dim=conv_dim,
                           conv_alpha=conv_alpha, dropout=self.network_dropout)

    def resolved_text_encoder_lr(self) -> float:
        if self.train_unet_only:
            return 0.0
        if self.text_encoder_lr is not None:
            return self.text_encoder_lr
        # Prodigy estimates its own step size; its "learning rate" is one multiplier that
        # must be the same for every trained group
        return self.learning_rate if self.optimizer == "Prodigy" else text_encoder_lr_for(self.learning_rate)

    def method_name(self, keyword: str) -> str:
        """``<keyword>-<Network><Alpha>-<Optimizer>-<dim>-<lr in 1e-6>-<steps>``."""

        lr = round(self.learning_rate * 1e6, 6)
        lr_text = str(int(lr)) if float(lr).is_integer() else f"{lr:g}".replace(".", "_")
        length = f"{self.max_train_epochs}ep" if self.max_train_epochs else str(self.max_train_steps)
        label = network_type(self.network).label + alpha_label(self.alpha, self.dim)
        return ascii_file_name(f"{keyword}-{label}-{OPTIMIZER_LABELS[self.optimizer]}-{self.dim}-{lr_text}-{length}")

    def for_model(self, base_model: str | None, family: str | None = None) -> TrainSettings:
        """These settings with the model family's defaults and a built-in model's (which win)
        for the options not set explicitly (see ``FAMILY_TRAIN_DEFAULTS``,
        ``BUILTIN_TRAIN_DEFAULTS``); unchanged for any other model."""

        defaults = dict(FAMILY_TRAIN_DEFAULTS.get(family or "", {}))
        if base_model and base_model.startswith(BUILTIN_PREFIX):
            defaults.update(BUILTIN_TRAIN_DEFAULTS.get(base_model[len(BUILTIN_PREFIX):], {}))
        unset = {k: v for k, v in defaults.items() if k not in self.model_fields_set}
        if not unset:
            return self
        return type(self).model_validate({**self.model_dump(exclude_unset=True), **unset})

    def fingerprint_data(self) -> dict[str, Any]:
        """The settings that change the trained weights (not where or how often files go)."""
        ignored = {"output_name", "save_every_n_steps", "save_every_n_epochs", "save_last_n", "save_state",
                   "save_state_every_minutes", "save_last_n_states", "training_comment", "sample_prompts",
                   "sample_every_n_steps", "sample_every_n_epochs", "sample_at_first", "sample_sampler",
                   "log_with", "log_prefix", "wandb_run_name", "cache_latents", "cache_text_encoder_outputs",
                   "vae_batch_size", "bad_images", "channels_last", "torch_compile"}
        return self.model_dump(mode="json", exclude=ignored)


def ascii_file_name(text: str, *, fallback: str = "lora") -> str:
    """A file stem A1111 can find: ASCII letters, digits, ``-``, ``_`` and ``.`` only.

    Accents are folded (``é`` → ``e``); other characters (Japanese, spaces, slashes)
    become ``_``. A name with nothing ASCII left becomes ``fallback`` plus a short hash, so
    different names stay different (:func:`~charfw.build.items.safe_file_stem`, ``folded``).
    """
    return safe_file_stem(text, charset="folded", fallback=fallback)


@dataclass
class TrainJob:
    """One training run: the settings plus where everything is and goes."""

    settings: TrainSettings
    #: the kohya dataset TOML
    dataset_config: Path
    #: base model reference (see :mod:`charfw.training.model_sources`)
    base_model: str
    output_dir: Path
    #: caches shared between runs (latents, text-encoder outputs, built-in models)
    cache_dir: Path
    vae: str | None = None
    clip_skip: int = 2
    family: str = "sd1"
    #: default: the method's name for ``keyword``
    output_name: str | None = None
    keyword: str = "lora"
    #: resumable state (default: ``<output_dir>/<name>-state``)
    state_dir: Path | None = None
    #: TensorBoard logs (default: ``<output_dir>/logs``)
    logging_dir: Path | None = None
    #: sample images (default: ``<output_dir>/sample``)
    sample_dir: Path | None = None
    #: None: start fresh; "auto": the newest matching state if any; a path: that state
    resume: str | Path | None = None
    #: tags resumable state: state saved under another fingerprint is never resumed
    fingerprint: str = ""
    #: stat-cached file hashing (a build passes its hash cache)
    sha256: Any = None
    #: a folder relative image_dir entries are also looked up in (after the working folder)
    relative_to: Path | None = None
    #: called with one line per skipped image
    report_problem: Any = None
    #: where log lines go (default: the console)
    log: Any = None
    #: a label for progress bars ("krnk/face train")
    label: str = "train"
    #: where the dataset's color_aug / random_crop are set (a build: its manifest's
    #: dataset stage), for the hint that says how to cache latents
    dataset_options_at: str = "in the dataset config"
    #: progress bars: a function (total, what) -> context manager yielding a bar with
    #: ``advance()`` and ``update(postfix=...)`` (default: the console's)
    progress: Any = None
    extra_metadata: dict[str, str] = field(default_factory=dict)
    #: called as ``after_training(model, network)`` once the file is written, with the
    #: network still applied (evaluations, tests that compare against the trainer's own output)
    after_training: Any = None

    @property
    def name(self) -> str:
        return ascii_file_name(self.output_name or self.settings.output_name or self.settings.method_name(self.keyword))
