"""Diffusion training losses as small callables with explicit hyperparameters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class DiffusionLoss:
    """DDPM simple loss (Ho et al. 2020, eq. 14): t ~ U{0..T-1}, x_t = q(x_t | x_0), MSE on eps or v.

    `model_fn(x_t, t)` returns the network prediction; conditioning is closed over by the caller.
    v-prediction follows Salimans & Ho 2022: v = sqrt(ab) eps - sqrt(1 - ab) x_0.
    """

    scheduler: object  # a DDPMScheduler: the forward process
    prediction_type: str = "epsilon"

    def __call__(self, model_fn: Callable, x0: torch.Tensor, generator=None) -> torch.Tensor:
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
        t = t.to(x0.device)
        eps = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.scheduler.add_noise(x0, eps, t)
        target = eps if self.prediction_type == "epsilon" else self.scheduler.get_velocity(x0, eps, t)
        return F.mse_loss(model_fn(x_t, t).float(), target.float())
