"""Optimizers and learning-rate schedules by the names kohya uses.

* ``AdamW`` (torch; fused kernels on CUDA), ``AdamW8bit`` (bitsandbytes, CUDA only),
  ``Adafactor`` (transformers; with its default ``relative_step=True`` it sets its own
  rate and the learning rates given are ignored, as the seed's "AdaFactor needs no
  learning rate" says), ``Prodigy`` (prodigyopt; learning rates around 1).
* Schedules: diffusers' ``constant``, ``constant_with_warmup``, ``linear``, ``cosine``,
  ``cosine_with_restarts`` (``lr_scheduler_num_cycles``), ``polynomial``; warm-up in steps
  or as a fraction of the run. The scheduler steps once per optimizer step, so its state
  after ``n`` steps is the same whether the run was resumed or not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import CharfwError, require_module

if TYPE_CHECKING:
    import torch

    from .settings import TrainSettings


def check_available(settings: TrainSettings, device: torch.device) -> None:
    """Raise a one-line error now if the optimizer cannot run here (not after the model
    was loaded and the latents cached)."""
    if settings.optimizer == "AdamW8bit":
        if device.type != "cuda":
            raise CharfwError(
                f"optimizer AdamW8bit needs bitsandbytes on an NVIDIA GPU, and this run is on {device.type.upper()}",
                hint="use optimizer: AdamW here (same training, 32-bit optimizer state)",
            )
        require_module("bitsandbytes", extra="cuda", purpose="optimizer AdamW8bit")
    elif settings.optimizer == "Prodigy":
        require_module("prodigyopt", extra="train", purpose="optimizer Prodigy")


def make_optimizer(settings: TrainSettings, groups: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    import torch

    args = dict(settings.optimizer_args)
    name = settings.optimizer
    params = [{k: v for k, v in g.items() if k != "name"} for g in groups]
    if not params:
        raise CharfwError("nothing to train: every learning rate is 0",
                          hint="set learning_rate (UNet) or text_encoder_lr above 0")
    if name == "AdamW":
        # a LoRA is hundreds of small tensors: one fused kernel (CUDA) or one batched
        # ("foreach") update for all of them instead of a loop over tensors
        if device.type == "cuda":
            args.setdefault("fused", True)
        elif "fused" not in args:
            args.setdefault("foreach", True)
        return torch.optim.AdamW(params, lr=settings.learning_rate, **args)
    if name == "AdamW8bit":
        check_available(settings, device)
        bnb = require_module("bitsandbytes", extra="cuda", purpose="optimizer AdamW8bit")
        return bnb.optim.AdamW8bit(params, lr=settings.learning_rate, **args)  # type: ignore[attr-defined]
    if name == "Adafactor":
        from transformers.optimization import Adafactor

        args.setdefault("relative_step", True)
        args.setdefault("scale_parameter", args["relative_step"])
        args.setdefault("warmup_init", False)
        if args["relative_step"]:
            for g in params:
                g["lr"] = None
            return Adafactor(params, lr=None, **args)
        return Adafactor(params, lr=settings.learning_rate, **args)
    if name == "Prodigy":
        prodigy = require_module("prodigyopt", extra="train", purpose="optimizer Prodigy")
        return prodigy.Prodigy(params, lr=settings.learning_rate, **args)  # type: ignore[attr-defined]
    raise CharfwError(f"unknown optimizer '{name}'")


def uses_relative_step(optimizer: Any) -> bool:
    """Adafactor with relative steps sets its own rate: no schedule applies."""
    return type(optimizer).__name__ == "Adafactor" and bool(optimizer.defaults.get("relative_step"))


def warmup_steps(settings: TrainSettings, total_steps: int) -> int:
    value = settings.lr_warmup_steps
    return int(value * total_steps) if 0 < value < 1 else int(value)


def make_scheduler(settings: TrainSettings, optimizer: Any, total_steps: int) -> Any:
    if uses_relative_step(optimizer):
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer)
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        settings.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(settings, total_steps),
        num_training_steps=total_steps, num_cycles=settings.lr_scheduler_num_cycles,
        power=settings.lr_scheduler_power,
    )


def optimizer_description(optimizer: Any, settings: TrainSettings) -> str:
    """``ss_optimizer``: the class path and its arguments, as kohya records it."""
    cls = type(optimizer)
    args = ",".join(f"{k}={v}" for k, v in settings.optimizer_args.items())
    return f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else "")
