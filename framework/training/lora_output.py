"""The trained LoRA as a file: kohya's tensors (diffusers' peft keys for SD 3.5), kohya's
header, kohya's hashes.

:func:`training_metadata` writes the ``ss_*`` keys ``train_network.py`` writes (values
as strings: ``str()`` of numbers and booleans, JSON for nested data, ``"None"`` for
unset), the dataset description (``ss_datasets``, ``ss_tag_frequency``,
``ss_dataset_dirs``), the base model's name and hashes, and the ``modelspec.*`` keys.
:func:`save_lora` writes the file through :mod:`charfw.lora.safetensors_io`, which adds
``sshs_model_hash`` / ``sshs_legacy_hash`` computed exactly as kohya computes them (A1111
shows and trusts them unchecked).
"""

from __future__ import annotations

import json
import os
import random
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charfw.training.model_sources import old_webui_hash

from .. import __version__

if TYPE_CHECKING:
    from ..lora.safetensors_io import SavedFile
    from .dataset import TrainingData
    from .families import LoadedModel
    from .networks.network import Network
    from .settings import TrainJob


def clock() -> float:
    """Now, for the file header's times; ``SOURCE_DATE_EPOCH`` (the reproducible-builds
    convention) fixes it, so that two builds of the same workspace give identical bytes."""
    fixed = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if fixed:
        try:
            return float(fixed)
        except ValueError:
            pass
    return time.time()


def _s(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def training_metadata(job: TrainJob, *, data: TrainingData, model: LoadedModel, network: Network,
                      optimizer_name: str, mixed_precision: str, cache_latents: bool, total_steps: int,
                      total_epochs: int, batches_per_epoch: int, text_encoder_lr: float,
                      started_at: float, warmup: int) -> dict[str, str]:
    """The header of every file a run writes (``ss_steps``/``ss_epoch`` are added per save)."""

    s = job.settings
    config = network.config
    first = data.blocks[0].buckets.resolution
    meta: dict[str, Any] = {
        "ss_session_id": random.Random(f"{job.fingerprint}/{started_at}").randint(0, 2**32 - 1),
        "ss_training_started_at": started_at,
        "ss_output_name": job.name,
        "ss_learning_rate": s.learning_rate,
        "ss_text_encoder_lr": text_encoder_lr,
        "ss_unet_lr": s.learning_rate,
        "ss_num_train_images": data.num_train_images,
        "ss_num_validation_images": 0,
        "ss_num_reg_images": data.num_reg_images,
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_num_epochs": total_epochs,
        "ss_gradient_checkpointing": s.gradient_checkpointing,
        "ss_gradient_accumulation_steps": s.gradient_accumulation_steps,
        "ss_max_train_steps": total_steps,
        "ss_lr_warmup_steps": warmup,
        "ss_lr_scheduler": s.lr_scheduler,
        "ss_network_module": config.network_module,
        "ss_network_dim": config.dim,
        "ss_network_alpha": config.dim if not config.alpha else config.alpha,
        "ss_network_dropout": s.network_dropout,
        "ss_network_args": json.dumps(config.network_args()) if config.network_args() else "None",
        "ss_mixed_precision": mixed_precision,
        "ss_full_fp16": False,
        "ss_clip_skip": job.clip_skip,
        "ss_max_token_length": s.max_token_length,
        "ss_cache_latents": cache_latents,
        "ss_seed": s.seed,
        "ss_lowram": False,
        "ss_noise_offset": s.noise_offset or None,
        "ss_multires_noise_iterations": None,
        "ss_multires_noise_discount": 0.3,
        "ss_adaptive_noise_scale": None,
        "ss_zero_terminal_snr": False,
        "ss_training_comment": s.training_comment,
        "ss_sd_scripts_commit_hash": f"charfw-{__version__}",
        "ss_optimizer": optimizer_name,
        "ss_max_grad_norm": s.max_grad_norm,
        "ss_caption_dropout_rate": 0.0,
        "ss_caption_dropout_every_n_epochs": 0,
        "ss_caption_tag_dropout_rate": 0.0,
        "ss_face_crop_aug_range": None,
        "ss_prior_loss_weight": s.prior_loss_weight,
        "ss_min_snr_gamma": s.min_snr_gamma,
        "ss_scale_weight_norms": None,
        "ss_ip_noise_gamma": None,
        "ss_debiased_estimation": False,
        "ss_noise_offset_random_strength": False,
        "ss_ip_noise_gamma_random_strength": False,
        "ss_loss_type": "l2",
        "ss_huber_schedule": "snr",
        "ss_huber_scale": 1,
        "ss_huber_c": 0.1,
        "ss_fp8_base": False,
        "ss_fp8_base_unet": False,
        "ss_validation_seed": None,
        "ss_validation_split": 0.0,
        "ss_max_validation_steps": None,
        "ss_validate_every_n_epochs": None,
        "ss_validate_every_n_steps": None,
        "ss_resize_interpolation": None,
        "ss_datasets": json.dumps(data.datasets_metadata(), ensure_ascii=False),
        "ss_tag_frequency": json.dumps(data.tag_frequency(), ensure_ascii=False),
        "ss_dataset_dirs": json.dumps(data.dataset_dirs(), ensure_ascii=False),
        "ss_sd_model_name": model.source.name,
    }
    meta.update(model.family.metadata(model))
    if model.source.kind == "single_file" and model.source.path is not None:
        meta["ss_sd_model_hash"] = old_webui_hash(model.source.path)
        if job.sha256 is not None:
            meta["ss_new_sd_model_hash"] = job.sha256(model.source.path)
    if model.vae_source is not None:
        meta["ss_vae_name"] = model.vae_source.name
        if model.vae_source.kind == "single_file" and model.vae_source.path is not None:
            meta["ss_vae_hash"] = old_webui_hash(model.vae_source.path)
            if job.sha256 is not None:
                meta["ss_new_vae_hash"] = job.sha256(model.vae_source.path)
    meta.update({
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.implementation_version": f"charfw/{__version__}",
        "modelspec.title": job.name,
        "modelspec.resolution": f"{first[0]}x{first[1]}",
    })
    if model.family.uses_clip_skip:
        meta["modelspec.encoder_layer"] = job.clip_skip
    if s.min_timestep or s.max_timestep != 1000:
        meta["modelspec.timestep_range"] = f"{s.min_timestep},{s.max_timestep}"
    meta.update(job.extra_metadata)
    return {k: _s(v) for k, v in meta.items()}


def save_lora(path: Path, network: Network, *, precision: str, metadata: dict[str, str], step: int,
              epoch: int) -> SavedFile:
    """Write the network's kohya tensors with the run's header plus this save's step/epoch."""
    from ..lora.safetensors_io import write_safetensors

    header = {**metadata, "ss_steps": str(step), "ss_epoch": str(epoch),
              "ss_training_finished_at": str(clock()),
              "modelspec.date": datetime.fromtimestamp(clock()).astimezone().isoformat(timespec="seconds")}
    dtype = {"fp16": "fp16", "bf16": "bf16", "float": "fp32"}[precision]
    if network.file_keys:  # diffusers' peft format (SD 3.5): its loaders expect this key
        header.setdefault("format", "pt")
    return write_safetensors(path, network.file_state_dict(), header, dtype=dtype)


def intermediate_name(name: str, *, step: int | None = None, epoch: int | None = None) -> str:
    """kohya's names: ``<name>-step00000100`` and ``<name>-000001``."""
    if step is not None:
        return f"{name}-step{step:08d}"
    assert epoch is not None
    return f"{name}-{epoch:06d}"


def prune_intermediate(folder: Path, name: str, keep: int | None) -> None:
    """Keep the newest ``keep`` intermediate files of one kind (steps, epochs)."""
    if not keep:
        return
    for pattern in (f"{name}-step*.safetensors", f"{name}-[0-9]*.safetensors"):
        files = sorted(folder.glob(pattern))
        for old in files[:-keep]:
            old.unlink(missing_ok=True)
