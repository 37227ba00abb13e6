"""Image metrics as small pure functions on (B, 3, H, W) tensors in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cdm.degradations import downsample, gaussian_kernels


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, for data range 1: 10 log10(1 / MSE)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-12))


def ssim(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5, radius: int = 5) -> torch.Tensor:
    """SSIM (Wang et al. 2004) per image: 11x11 Gaussian window, sigma 1.5, C1=0.01^2, C2=0.03^2, RGB mean."""
    c = x.shape[1]
    k = gaussian_kernels(torch.tensor([sigma]), radius)[0]
    window = (k[:, None] * k[None, :]).expand(c, 1, -1, -1).to(x)

    def blur(z):
        return F.conv2d(z, window, groups=c)

    x, y = x.float(), y.float()
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def consistency(sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """SR3 consistency: MSE between the downsampled output and the low-res input, in [0, 1] pixel scale.

    Uses the same anti-aliased bicubic downsampler that made the low-res input.
    """
    factor = sr.shape[-1] // lr.shape[-1]
    return (downsample(sr.float(), factor).clamp(0, 1) - lr.float()).pow(2).flatten(1).mean(1)
