"""Image metrics as small pure functions on (B, 3, H, W) tensors in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cdm.train.degradations import downsample, gaussian_kernels


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


def high_frequency_energy(x: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Spectral energy above `cutoff` cycles/pixel (either axis), per image; Hann-windowed, mean removed."""
    h, w = x.shape[-2:]
    window = torch.hann_window(h, periodic=False)[:, None] * torch.hann_window(w, periodic=False)[None, :]
    grey = x.float().mean(1)
    grey = (grey - grey.mean(dim=(-2, -1), keepdim=True)) * window.to(x.device)
    power = torch.fft.fft2(grey).abs().pow(2)
    fy, fx = torch.fft.fftfreq(h).abs().to(x.device), torch.fft.fftfreq(w).abs().to(x.device)
    high = (fy[:, None] > cutoff) | (fx[None, :] > cutoff)
    return (power * high).flatten(1).sum(1)


def hf_ratio(sr: torch.Tensor, hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Energy above the low-res Nyquist frequency (0.5 / scale cycles/pixel) of the output over the original's.

    1.0 matches the original's detail; interpolation gives nearly 0; grain and ringing push it above 1.
    """
    cutoff = 0.5 / scale
    return high_frequency_energy(sr, cutoff) / high_frequency_energy(hr, cutoff).clamp(min=1e-12)


def patch_grid(x: torch.Tensor, size: int, count: int) -> torch.Tensor:
    """Up to `count` size x size patches from a (1, C, H, W) image on an even grid, as (N, C, size, size)."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        return x.new_zeros((0, x.shape[1], size, size))
    side = max(1, round(count**0.5))
    tops = torch.linspace(0, h - size, side).round().long().unique().tolist()
    lefts = torch.linspace(0, w - size, side).round().long().unique().tolist()
    return torch.cat([x[..., t : t + size, left : left + size] for t in tops for left in lefts])
