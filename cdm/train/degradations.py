"""Small pure functions for training inputs: degradations, levels, label dropout, crisp rendering.

The noise augmentation itself is `cdm_pipelines.augment_low_res`, shared with sampling.
"""

from __future__ import annotations

import io

import PIL.Image
import torch
import torch.nn.functional as F

from cdm.images import to_pil, to_tensor

# Other ways a low-res image comes to be, for measuring a stage on inputs it was not trained on:
# PIL's filters on an 8-bit image (what an image editor or a thumbnailer does).
PIL_FILTERS = {
    "pil-bicubic": PIL.Image.Resampling.BICUBIC,
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "box": PIL.Image.Resampling.BOX,
    "lanczos": PIL.Image.Resampling.LANCZOS,
}
DOWNSAMPLERS = ("bicubic", *PIL_FILTERS)


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Anti-aliased bicubic downsampling by an integer factor (SR3's low-res input)."""
    h, w = x.shape[-2] // factor, x.shape[-1] // factor
    return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)


def other_downsample(x: torch.Tensor, factor: int, kernel: str = "bicubic", jpeg: int = 0) -> torch.Tensor:
    """Downsample (N, 3, H, W) in [0, 1] with `kernel`: "bicubic" is `downsample` (the training
    degradation), the others PIL's filter on the 8-bit image. `jpeg` > 0 then stores each low-res
    image as a JPEG of that quality and decodes it again."""
    low = downsample(x, factor) if kernel == "bicubic" else None
    if low is not None and not jpeg:
        return low
    h, w = x.shape[-2] // factor, x.shape[-1] // factor
    out = []
    for k, image in enumerate(x):
        pil = to_pil(low[k]) if low is not None else to_pil(image).resize((w, h), PIL_FILTERS[kernel])
        if jpeg:
            buffer = io.BytesIO()
            pil.save(buffer, "JPEG", quality=jpeg)
            pil = PIL.Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        out.append(to_tensor(pil))
    return torch.stack(out).to(x)


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels, one row per sigma: exp(-k^2 / 2 sigma^2)."""
    k = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigma.device)
    kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].float() ** 2))
    return kern / kern.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur with reflect padding; sigma has shape (B,)."""
    b, c, h, w = x.shape
    radius = max(1, int(torch.ceil(3 * sigma.max()).item()))
    kern = gaussian_kernels(sigma, radius).to(x.dtype).repeat_interleave(c, dim=0)  # (B*C, K)
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kern[:, None, None, :], groups=b * c)
    y = F.conv2d(y, kern[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def random_blur(x, prob: float, sigma_range, generator=None) -> torch.Tensor:
    """CDM: blur a fraction `prob` of the low-res inputs with sigma ~ U[sigma_range]."""
    if prob <= 0:
        return x
    b = x.shape[0]
    apply = torch.rand(b, generator=generator) < prob
    sigma = torch.empty(b).uniform_(sigma_range[0], sigma_range[1], generator=generator)
    blurred = gaussian_blur(x, sigma.to(x.device))
    return torch.where(apply.to(x.device).view(-1, 1, 1, 1), blurred, x)


def sample_levels(batch_size: int, s_max: int, generator=None) -> torch.Tensor:
    """Augmentation levels s ~ U{0, ..., s_max}, one per sample (CDM Gaussian conditioning augmentation)."""
    return torch.randint(0, s_max + 1, (batch_size,), generator=generator)


def drop_labels(labels: torch.Tensor, prob: float, null_id: int, generator=None) -> torch.Tensor:
    """Classifier-free guidance training: replace each label by the null id with probability `prob`."""
    drop = torch.rand(labels.shape, generator=generator) < prob
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_id), labels)


def random_crop_box(height: int, width: int, size: int, generator=None) -> tuple[int, int]:
    """Top-left corner of a uniformly random size x size crop."""
    top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
    return top, left


def render_crisp(x: torch.Tensor, size: int, edge_px: float = 2.0) -> torch.Tensor:
    """Render low-res strokes in [0, 1] at `size` with edges about `edge_px` wide: bicubic, then a sigmoid.

    Upsampling by r = size / h spreads a unit step over about r pixels; a sigmoid of slope
    k = 4 r / edge_px squeezes it back to `edge_px` output pixels, at any resolution.
    """
    up = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    k = 4.0 * size / (x.shape[-1] * edge_px)
    return torch.sigmoid(k * (up - 0.5))
