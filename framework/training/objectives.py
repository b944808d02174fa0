"""Training objectives of the DDPM families (SD 1.x, SDXL): predict the noise, or the velocity.

:class:`DDPMObjective` is kohya's ``train_network.py`` step: noise ``ε ~ N(0, 1)`` (plus
``noise_offset`` times one normal number per sample and channel), a timestep drawn
uniformly from ``[min_timestep, max_timestep)``, the noisy latents of the base model's
DDPM schedule (``DDPMScheduler.add_noise``), and as target the noise itself or, for
v-prediction models, the velocity. The loss is the mean squared error per sample, times
the data's weight (``prior_loss_weight``) and, with ``min_snr_gamma``, the min-SNR factor
``min(SNR, γ) / SNR`` (``/ (SNR + 1)`` for v-prediction), averaged over the batch.

The random numbers are drawn in this order from the run's generator: noise, the offset's
noise (when on), timesteps. A resumed run restores the generator and draws the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .families import NoisedBatch, Objective

if TYPE_CHECKING:
    from .families import LoadedModel
    from .settings import TrainSettings


class DDPMObjective(Objective):
    def __init__(self, model: LoadedModel, settings: TrainSettings, device: torch.device) -> None:
        from diffusers import DDPMScheduler

        self.settings = settings
        self.device = device
        self.prediction_type = model.prediction_type
        self.scheduler = DDPMScheduler.from_config(model.scheduler_config)
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)

    def noise(self, latents: torch.Tensor, generator: torch.Generator) -> NoisedBatch:
        s = self.settings
        device = self.device
        noise = torch.randn(latents.shape, generator=generator, device=device)
        if s.noise_offset:
            noise += s.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=device)
        timesteps = torch.randint(s.min_timestep, s.max_timestep, (latents.shape[0],), generator=generator,
                                  device=device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        return NoisedBatch(noisy, timesteps, target)

    def loss(self, prediction: torch.Tensor, noised: NoisedBatch, sample_weights: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(prediction.float(), noised.target.float(), reduction="none")
        loss = loss.mean(dim=tuple(range(1, loss.ndim)))
        weights = sample_weights
        gamma = self.settings.min_snr_gamma
        if gamma:
            alphas = self.scheduler.alphas_cumprod[noised.timesteps]
            snr = alphas / (1 - alphas)
            divisor = snr if self.prediction_type == "epsilon" else snr + 1
            weights = weights * torch.clamp(snr, max=gamma) / divisor
        return (loss * weights).mean()
