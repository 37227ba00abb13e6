"""Scoring an SR stage on held-out images: degrade each image, upscale it, and compare with the original.

Images are (1, 3, H, W) tensors in [0, 1], the range the pipelines take and return, so the stage's
output is scored as it comes.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from cdm.devices import Speed
from cdm.measure.baselines import BASELINES
from cdm.measure.fid import CachedFeatures, patch_kid
from cdm.measure.metrics import consistency, hf_ratio, patch_grid, psnr, ssim
from cdm.models import with_scheduler
from cdm.train.degradations import gaussian_blur, other_downsample

SR_METRICS = ("psnr", "ssim", "consistency", "hf_ratio")
KID_PATCH, KID_PATCHES_PER_IMAGE = 64, 64


@dataclass(frozen=True)
class Degradation:
    """How the low-res input is made from an original: `kernel` downsampling (bicubic is SR3's), a
    Gaussian blur of sigma `blur` low-res pixels (a soft handover, as CDM's blur augmentation expects),
    and a JPEG round trip at quality `jpeg` (0: none)."""

    kernel: str = "bicubic"
    blur: float = 0.0
    jpeg: int = 0

    def __call__(self, original: torch.Tensor, factor: int) -> torch.Tensor:
        low = other_downsample(original, factor, self.kernel, self.jpeg).clamp(0, 1)
        return gaussian_blur(low, torch.tensor([float(self.blur)])) if self.blur > 0 else low


def sr_outputs(
    pipe,
    images: list[torch.Tensor],
    seed: int,
    degrade=Degradation(),
    baselines=("bicubic",),
    speed: Speed = Speed.exact(),
    **call,
) -> dict:
    """The stage's output ("model"), each baseline's and the low-res input ("lr") for each of `images`;
    `call` holds the pipeline's sampling arguments (unset ones are the stage's own), `speed` the UNets'
    autocast and layout. Image i uses seed `seed + i`. Baselines are named as in `BASELINES`."""
    call.setdefault("tile_size", 0)  # whole images unless asked
    pipe.set_progress_bar_config(disable=True)
    speed.apply(pipe)
    outs = {"model": [], "lr": [], **{name: [] for name in baselines}}
    for i, target in enumerate(tqdm(images, desc="sr eval", unit="img", leave=False)):
        lr = degrade(target, pipe.scale_factor)
        with speed.autocast(pipe.device):
            out = pipe(
                lr.to(pipe.device),
                output_type="pt",
                generator=[torch.Generator().manual_seed(seed + i)],
                allow_any_size=True,
                **call,
            )
        outs["model"].append(out.images.float().cpu())
        for name in baselines:
            outs[name].append(BASELINES[name](lr, pipe.scale_factor))
        outs["lr"].append(lr)
    return outs


def kid_patch_size(images: list[torch.Tensor]) -> int:
    """Patch KID's patch side: 64 px, or the smallest image's side when images are smaller."""
    return min(KID_PATCH, *(min(x.shape[-2:]) for x in images))


def kid_patches(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """Every image's patches on an even grid (at most `KID_PATCHES_PER_IMAGE` each)."""
    return torch.cat([patch_grid(x, size, KID_PATCHES_PER_IMAGE) for x in images])


def per_image(preds: list[torch.Tensor], images: list[torch.Tensor], lrs: list[torch.Tensor]) -> dict:
    """Each image's PSNR, SSIM, consistency and HF ratio, as lists in the images' order."""
    rows = {m: [] for m in SR_METRICS}
    for pred, target, lr in zip(preds, images, lrs):
        rows["psnr"].append(psnr(pred, target).item())
        rows["ssim"].append(ssim(pred, target).item())
        rows["consistency"].append(consistency(pred, lr).item())
        rows["hf_ratio"].append(hf_ratio(pred, target, target.shape[-1] // lr.shape[-1]).item())
    return rows


def score_sr(
    preds: list[torch.Tensor],
    images: list[torch.Tensor],
    lrs: list[torch.Tensor],
    kid: bool,
    feature=None,
    rows: dict | None = None,
) -> dict:
    """Mean PSNR, SSIM, consistency and HF ratio over the images, and patch KID over all their patches
    (`feature`: the Inception to use, e.g. a `CachedFeatures` shared by every method; `rows`: the
    images' `per_image` scores, when already computed)."""
    rows = rows or per_image(preds, images, lrs)
    result = {m: sum(v) / len(v) for m, v in rows.items()}
    if kid:
        size = kid_patch_size(images)
        result["patch_kid"] = patch_kid(kid_patches(preds, size), kid_patches(images, size), feature)
    return result


def farthest_from_one(hf: list[float]) -> list[int]:
    """Image indices by how far their HF ratio is from the original's, 1, on a log scale, farthest first."""
    return sorted(range(len(hf)), key=lambda i: -abs(math.log(max(hf[i], 1e-12))))


def worst_decile(hf: list[float]) -> list[int]:
    """The tenth of the images (at least one) whose HF ratio is farthest from the original's: where a
    method adds the most detail the original lacks, or keeps the least."""
    return sorted(farthest_from_one(hf)[: max(1, math.ceil(len(hf) / 10))])


def spread(preds, images, lrs, kid: bool, feature=None, rows: dict | None = None) -> dict:
    """How a method's scores spread over the images: the median and the worst decile (the 10th
    percentile of PSNR and SSIM; the 10th and 90th of the HF ratio), and patch KID over the patches of
    the worst decile by HF ratio (`worst_decile`). `rows`: the images' `per_image` scores, if known."""
    rows = rows or per_image(preds, images, lrs)

    def pct(values, q):
        return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))

    out = {
        "psnr_median": pct(rows["psnr"], 0.5),
        "psnr_p10": pct(rows["psnr"], 0.1),
        "ssim_median": pct(rows["ssim"], 0.5),
        "ssim_p10": pct(rows["ssim"], 0.1),
        "hf_ratio_median": pct(rows["hf_ratio"], 0.5),
        "hf_ratio_p10": pct(rows["hf_ratio"], 0.1),
        "hf_ratio_p90": pct(rows["hf_ratio"], 0.9),
    }
    if kid:
        size, order = kid_patch_size(images), farthest_from_one(rows["hf_ratio"])
        worst = worst_decile(rows["hf_ratio"])
        while len(kid_patches([images[i] for i in worst], size)) < 2 and len(worst) < len(order):
            worst = order[: len(worst) + 1]  # KID needs two patches a side
        pick = [preds[i] for i in worst], [images[i] for i in worst]
        out["patch_kid_worst"] = patch_kid(kid_patches(pick[0], size), kid_patches(pick[1], size), feature)
    return {"per_image": rows, "spread": out}


def evaluate_sr(pipe, images, seed: int = 0, degrade=Degradation(), kid: bool = False, **call) -> dict:
    """PSNR, SSIM, consistency, HF ratio (and patch KID) of the stage and of bicubic on the same inputs."""
    outs = sr_outputs(pipe, images, seed, degrade, **call)
    return {m: score_sr(outs[m], images, outs["lr"], kid) for m in ("model", "bicubic")}


def sr_sweep(
    pipe,
    images: list,
    grid: list[tuple[str, int]],
    seed: int,
    degrade,
    kid: bool,
    baselines=("bicubic",),
    **call,
) -> tuple[list[dict], dict]:
    """Score the stage at every (scheduler, steps) of the grid, and each baseline once (every point has
    the same inputs); a line per point on stderr. Returns the sweep's rows, the baselines' scores and, for
    the first point and each baseline, how the scores spread over the images (`spread`)."""
    sweep, scores, spreads = [], {}, {}
    feature = CachedFeatures() if kid else None  # the originals' features, computed once
    for name, steps in grid:
        todo = () if scores else baselines
        sampler = with_scheduler(pipe, name, steps)
        outs = sr_outputs(sampler, images, seed, degrade, todo, num_inference_steps=steps, **call)
        rows = {m: per_image(outs[m], images, outs["lr"]) for m in ("model", *todo)}  # once per method
        if todo:
            spreads = {m: spread(outs[m], images, outs["lr"], kid, feature, rows[m]) for m in rows}
            scores = {b: score_sr(outs[b], images, outs["lr"], kid, feature, rows[b]) for b in todo}
        model = score_sr(outs["model"], images, outs["lr"], kid, feature, rows["model"])
        row = {"scheduler": name, "steps": steps, **model}
        sweep.append(row)
        line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        print(line, file=sys.stderr)
    return sweep, scores, spreads
