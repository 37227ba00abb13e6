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

    `estimate_fraction` q > 0 trains the sampler's 0-step estimate directly: each example is, with
    probability q, shown at the last timestep with the noise's mean (zeros) as x_t, and its target is
    the one whose clean estimate is x_0 (v = -x_0 / sqrt(1 - ab) for v-prediction). The minimiser is
    E[x_0 | conditioning], the estimate a regression network would give; the rest of the batch keeps
    the diffusion loss, so sampling with steps still works.
    """

    scheduler: object  # a DDPMScheduler: the forward process
    prediction_type: str = "epsilon"
    timestep_power: float = 1.0
    estimate_fraction: float = 0.0

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
        if self.estimate_fraction > 0:
            x_t, t, target = self.with_estimates(x0, x_t, t, target, generator)
        return F.mse_loss(model_fn(x_t, t).float(), target.float())

    def with_estimates(self, x0, x_t, t, target, generator=None):
        """Replace a random `estimate_fraction` of the examples by the 0-step estimate's: zeros at T - 1."""
        if self.prediction_type != "v_prediction":
            raise ValueError(f"estimate_fraction with {self.prediction_type!r}: expected v_prediction")
        pick = torch.rand(x0.shape[0], generator=generator) < self.estimate_fraction
        if not pick.any():
            return x_t, t, target
        pick = pick.to(x0.device)
        last = self.scheduler.config.num_train_timesteps - 1
        alphabar = self.scheduler.alphas_cumprod[last].to(x0.device, torch.float64)
        v = (-x0.double() / (1 - alphabar).sqrt()).to(target.dtype)
        mask = pick.view(-1, *[1] * (x0.dim() - 1))
        return (
            torch.where(mask, torch.zeros_like(x_t), x_t),
            torch.where(pick, torch.full_like(t, last), t),
            torch.where(mask, v, target),
        )
