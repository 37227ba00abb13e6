"""cdm-upscale's work on a 1024x768 photo (to 4096x3072) with the shipped photo stage: its former defaults
(2 DDPM steps, fp32, default memory layout, 256 px tiles overlapping by 64) beside its current ones (the
folder's: 0 steps, the one-evaluation estimate; channels-last; 32 px overlap), each in a fresh
process; peak memory; and the quality of both on the held-out photos (PSNR, SSIM, HF ratio, patch KID)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch
from common import SMOKE

SETTINGS = ("before", "now")
BEFORE_CALL = {"tile_size": 256, "tile_overlap": 64, "num_inference_steps": 2}  # tiles in output pixels
# (the folder's overlap is now 32: on the held-out photos -0.01 dB, patch KID within the seed spread)
NOW_CALL = {"tile_size": None, "tile_overlap": None, "num_inference_steps": None}  # None: the folder's
SIZE = (64, 48) if SMOKE else (1024, 768)


def speed_of(name: str):
    from cdm.devices import Speed

    return Speed.exact() if name == "before" else Speed.resolve("auto", torch.device("cpu"))


def call_of(name: str) -> dict:
    """The tiling and steps of each setting; None is the folder's own (`upscale` and cdm-upscale tile by
    default); the smoke run takes one step."""
    call = dict(BEFORE_CALL if name == "before" else NOW_CALL)
    return {**call, "num_inference_steps": 1} if SMOKE else call


def photo() -> torch.Tensor:
    """A held-out photo, centre-cropped to SIZE (or resized up when smaller), as (1, 3, h, w) in [0, 1]."""
    import torch.nn.functional as F

    from cdm.measure.heldout import data_config, whole_images

    x = whole_images(data_config("photos", None, sr=True), "test", 4, 1)[0]
    w, h = SIZE
    if x.shape[-1] < w or x.shape[-2] < h:
        x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True).clamp(0, 1)
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]


def time_one(name: str) -> dict:
    from cdm.images import to_pil
    from cdm.upscaling import PHOTO_STAGE, load_sr_stage, upscale

    pipe, _ = load_sr_stage(str(PHOTO_STAGE), None)
    pipe.set_progress_bar_config(disable=True)
    image = to_pil(photo()[0])
    call = call_of(name)
    tile = call["tile_size"] and call["tile_size"] // pipe.scale_factor
    overlap = call["tile_overlap"] and call["tile_overlap"] // pipe.scale_factor
    steps = call["num_inference_steps"]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = upscale(pipe, image, tile, overlap, steps, speed=speed_of(name))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": seconds,
        "size": list(out.size),
        "peak_rss_gib": after / 2**20,
        "loaded": before / 2**20,
    }


SEEDS = {"before": (0,), "now": (0, 1)}


def quality() -> dict:
    """PSNR, SSIM, HF ratio and patch KID on the held-out photos (whole): the former defaults at one seed,
    the current ones at two, whose spread is the noise the comparison is judged against."""
    from cdm.measure.heldout import data_config, whole_images
    from cdm.measure.sr import evaluate_sr
    from cdm.upscaling import PHOTO_STAGE, load_sr_stage

    pipe, _ = load_sr_stage(str(PHOTO_STAGE), None)
    images = whole_images(data_config("photos", None, sr=True), "test", 4, None)
    if SMOKE:
        images = [x[..., :64, :64] for x in images[:1]]
    rows = {}
    for name in SETTINGS:
        call = call_of(name)
        for seed in SEEDS[name][:1] if SMOKE else SEEDS[name]:
            rows[f"{name} seed {seed}"] = evaluate_sr(
                pipe, images, seed, kid=not SMOKE, speed=speed_of(name), **call
            )["model"]
    return rows


def main():
    if len(sys.argv) > 1:
        print(json.dumps(time_one(sys.argv[1])))
        return
    w, h = SIZE
    print(
        f"\n== cdm-upscale, shipped photo stage, one {w}x{h} photo -> {4 * w}x{4 * h} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)\nbefore: 2 DDPM steps, {speed_of('before').describe()}, 256 px tiles "
        f"overlapping by 64; now: the folder's steps and tiles, {speed_of('now').describe()}"
    )
    results = {}
    for name in SETTINGS:
        res = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, check=True)
        results[name] = json.loads(res.stdout.strip().splitlines()[-1])
    base = results["before"]["seconds"]
    for name, res in results.items():
        print(
            f"{name:<7} {res['seconds']:7.1f}s ({base / res['seconds']:.2f}x faster; goal >= 3x)  "
            f"peak RSS {res['peak_rss_gib']:.2f} GiB"
        )
    for key, m in quality().items():
        kid = f"  patch KID {m['patch_kid']:.4f}" if "patch_kid" in m else ""
        print(
            f"quality {key:<14} PSNR {m['psnr']:6.2f} dB  SSIM {m['ssim']:.4f}  HF ratio {m['hf_ratio']:.2f}{kid}"
            "  (held-out photos, whole)"
        )


if __name__ == "__main__":
    main()
