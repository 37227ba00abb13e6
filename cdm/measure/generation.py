"""Scoring generation: sample a cascade for class ids in batches, and keep what the metrics need.

Samples are in [0, 1], as the cascade returns them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cdm.cascade import Cascade
from cdm.config import DataConfig
from cdm.files import atomic_write
from cdm.measure.classifier import get_classifier, predict, prepare
from cdm.measure.fid import (
    feature_distances,
    feature_stats,
    frechet_and_kernel_distance,
    frechet_distance,
    inception_features,
    kernel_distance,
    precision_recall,
)
from cdm.measure.heldout import real_images

GRID_IMAGES = 100  # the first images of a run are kept for its grid


def generate(
    cascade, ids: list[int], settings, batch: int, stop_after: int | None = None
) -> list[torch.Tensor]:
    """Outputs of every stage for these class ids (seed i for image i), in batches."""
    n = stop_after or len(cascade.pipes)
    sub = Cascade(
        [replace(stage, sampling=s) for stage, s in zip(cascade.stages[:n], settings)], cascade.root
    )
    per_stage = [[] for _ in range(n)]
    for lo in tqdm(range(0, len(ids), batch), desc="generate", unit="batch"):
        out = sub(ids[lo : lo + batch], list(range(lo, min(lo + batch, len(ids)))), progress=False)
        for k, x in enumerate(out.images):
            per_stage[k].append(x)
    return [torch.cat(x) for x in per_stage]


def class_agreement(
    images: torch.Tensor, ids: list[int], data: DataConfig, resolution: int
) -> tuple[float, dict]:
    model, meta = get_classifier(data, resolution)
    preds = predict(model, prepare(images))
    return (preds == torch.tensor(ids)).float().mean().item(), meta


def sample_batches(cascade, n, ids, settings, batches, folder: Path, judge, feature) -> None:
    """Sample each batch not yet on disk and keep only what the metrics need: class predictions,
    Inception features, and the first images for the grid. Memory stays flat for any count."""
    sub = Cascade([replace(st, sampling=s) for st, s in zip(cascade.stages[:n], settings)], cascade.root)
    for lo, hi in tqdm(batches, desc="generate", unit="batch"):
        path = folder / f"batch-{lo:08d}.npz"
        if path.is_file():
            continue  # done by an earlier run
        images = sub(ids[lo:hi], list(range(lo, hi)), progress=False).images[-1]
        arrays = {"pred": predict(judge, prepare(images)).numpy()}
        if feature is not None:
            arrays["pool"] = inception_features(images, feature)
        if lo < GRID_IMAGES:
            arrays["images"] = (images[: GRID_IMAGES - lo].clamp(0, 1) * 255).round().byte().numpy()
        atomic_write(path, lambda tmp, a=arrays: np.savez(tmp, **a), replace=False)  # cdm-eval's scratch


def load_batches(folder: Path, batches) -> dict:
    parts = [np.load(folder / f"batch-{lo:08d}.npz", allow_pickle=False) for lo, _ in batches]
    out = {"pred": np.concatenate([p["pred"] for p in parts])}
    if "pool" in parts[0]:
        out["pool"] = np.concatenate([p["pool"] for p in parts])
    grid = [p["images"] for p in parts if "images" in p]
    out["images"] = torch.from_numpy(np.concatenate(grid)).float() / 255
    return out


def stats_distances(pool: np.ndarray, reference: dict) -> dict:
    """FID against stored statistics (`load_stats`), and KID, precision and recall when they hold features."""
    distances = {"fid": frechet_distance(*feature_stats(pool), reference["mu"], reference["sigma"])}
    if "pool" in reference:
        distances["kid"] = kernel_distance(pool, reference["pool"])
        distances.update(precision_recall(reference["pool"], pool))
    return distances


def stats_note(reference: dict, path) -> str:
    return f"FID against the statistics in {path}" + (
        f" ({len(reference['pool'])} reference features)."
        if "pool" in reference
        else " (mu and sigma only: no KID, precision or recall)."
    )


def real_distances(
    pool: np.ndarray, data: DataConfig, split: str, size: int, feature
) -> tuple[dict, dict, str]:
    """FID/KID/precision/recall of the samples' features against real `split` images at `size` px, the
    real-data floor (as many real images of the other split, scored the same way) and a note on both."""
    reference, _ = real_images(data, split, size, None)
    ref_pool = inception_features(reference, feature)
    other = "train" if split != "train" else "test"  # what a perfect model would score
    real, _ = real_images(data, other, size, len(pool))
    floor = {
        "split": other,
        "num_images": len(real),
        **feature_distances(inception_features(real, feature), ref_pool),
    }
    note = (
        f"FID/KID against {len(reference)} real {split} images at {size} px. "
        f"Small-sample FID is biased upward: {len(real)} real {other} images score "
        f"FID {floor['fid']:.1f} and KID {floor['kid']:.4f} against the same reference."
    )
    return feature_distances(pool, ref_pool), floor, note


def level_sweep(
    cascade,
    k: int,
    ids: list[int],
    data: DataConfig,
    metric: str,
    modes: list[str],
    levels,
    steps,
    batch: int,
) -> list[dict]:
    """Stage k's `metric` (agreement, fid or kid) at each augmentation mode and level, the other settings
    the cascade's; a line per point on stdout."""
    reference = (
        real_images(data, "test", cascade.resolutions[k], None)[0] if metric in ("fid", "kid") else None
    )
    rows = []
    for mode in modes:
        for level in levels:
            settings = cascade.with_overrides(steps=steps)
            settings[k].noise_level, settings[k].aug_mode = level, mode
            cascade.with_overrides(noise_level=[s.noise_level for s in settings])  # validates the level
            images = generate(cascade, ids, settings, batch, k + 1)[k]
            if metric == "agreement":
                value = class_agreement(images, ids, data, cascade.resolutions[0])[0]
            else:
                value = frechet_and_kernel_distance(images, reference)[metric]
            rows.append({"aug_mode": mode, "noise_level": level, metric: value})
            print(f"{cascade.names[k]} {mode:>13} s={level:<4} {metric}={value:.4f}")
    return rows
