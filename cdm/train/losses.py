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

    `timestep_power` p > 1 draws t = floor(T u^p), u ~ U(0, 1), instead: more of the training goes to
    low noise levels, where the finest detail is learned (the minimiser at each t is unchanged;
    only where the capacity and the updates go). p = 1 is the uniform draw.
    """

    scheduler: object  # a DDPMScheduler: the forward process
    prediction_type: str = "epsilon"
    timestep_power: float = 1.0

    def timesteps(self, n: int, generator=None) -> torch.Tensor:
        T = self.scheduler.config.num_train_timesteps
        if self.timestep_power == 1.0:
            return torch.randint(0, T, (n,), generator=generator)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return (T * u**self.timestep_power).long().clamp_(max=T - 1)

    def __call__(self, model_fn: Callable, x0: torch.Tensor, generator=None) -> torch.Tensor:
        t = self.timesteps(x0.shape[0], generator).to(x0.device)
        eps = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.scheduler.add_noise(x0, eps, t)
        target = eps if self.prediction_type == "epsilon" else self.scheduler.get_velocity(x0, eps, t)
        return F.mse_loss(model_fn(x_t, t).float(), target.float())
