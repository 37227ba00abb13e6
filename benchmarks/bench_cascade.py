"""The demo cascade at its former defaults (fp32, default memory layout) beside its current ones
(`--precision auto`: bf16 autocast where the CPU has bf16 units, channels-last and freed memory kept on
a CPU): one 64 -> 256 -> 1024 image at batch 1, after two warm-up images, per stage, each setting in a
fresh process; the 1024 stage's peak memory; and a quality check of each SR stage on held-out digits
(PSNR and SSIM, before and now)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch
from common import SMOKE

SETTINGS = ("before", "now")


def speed_of(name: str):
    from cdm.devices import Speed

    return Speed.exact() if name == "before" else Speed.resolve("auto", torch.device("cpu"))


def run_one(name: str) -> dict:
    from cdm.cascade import DEMO_CASCADE, Cascade

    cascade = Cascade.from_pretrained(DEMO_CASCADE).optimize(speed_of(name))
    settings = cascade.with_overrides(steps=[1] * len(cascade.stages)) if SMOKE else cascade.settings
    # warm-up: oneDNN's kernels, and the heap, which reaches its working size by the second image
    if not SMOKE:
        for label in (3, 5):
            cascade([label], seeds=[0], progress=False)
    start = time.perf_counter()
    out = cascade([7], [1], settings, progress=False)
    total = time.perf_counter() - start
    return {"stages": dict(zip(out.stage_names, out.seconds)), "total": total}


def peak_1024(name: str) -> dict:
    """Peak resident memory of a process that runs only the 1024 stage on one 256 px image."""
    from cdm.cascade import DEMO_CASCADE, Cascade

    speed = speed_of(name)
    cascade = Cascade.from_pretrained(DEMO_CASCADE).optimize(speed)
    pipe, s = cascade.pipes[-1], cascade.settings[-1]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    x = torch.rand(1, 3, 256, 256)  # what the stage before hands over: a "pt" image in [0, 1]
    with speed.autocast(pipe.device):
        pipe(x, noise_level=s.noise_level, num_inference_steps=1 if SMOKE else s.steps, output_type="pt")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_gib": after / 2**20, "loaded_rss_gib": before / 2**20}


def quality() -> dict:
    """Each SR stage's PSNR and SSIM on held-out digit crops, at the folder's settings, before and now."""
    from cdm.cascade import DEMO_CASCADE, Cascade
    from cdm.images import centre_crop
    from cdm.measure.heldout import data_config, real_images
    from cdm.measure.sr import evaluate_sr

    cascade = Cascade.from_pretrained(DEMO_CASCADE)
    rows = {}
    for stage in cascade.stages[1:]:
        size = stage.pipe.unet.config.sample_size
        real = real_images(data_config("digits", None), "test", size, 2 if SMOKE else 6)[0]
        crops = [centre_crop(x, size // 4, stage.pipe.scale_factor) for x in real.split(1)]
        call = {"noise_level": stage.sampling.noise_level, "num_inference_steps": 1 if SMOKE else None}
        for name in SETTINGS:
            scores = evaluate_sr(stage.pipe, crops, speed=speed_of(name), **call)["model"]
            rows[f"{stage.name} {name}"] = (scores["psnr"], scores["ssim"])
    return rows


def measure(what: str, name: str) -> dict:
    res = subprocess.run([sys.executable, __file__, what, name], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    if len(sys.argv) > 1:
        what, name = sys.argv[1], sys.argv[2]
        print(json.dumps(run_one(name) if what == "time" else peak_1024(name)))
        return
    now = speed_of("now")
    print(
        f"\n== demo cascade, batch 1, one image 64 -> 256 -> 1024 (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)\nbefore: {speed_of('before').describe()}; now: {now.describe()}"
    )
    results = {name: (measure("time", name), measure("mem", name)) for name in SETTINGS}
    (base, _), (new, _) = results["before"], results["now"]
    for name, (res, mem) in results.items():
        stages = "  ".join(f"{k} {v:5.1f}s ({v / base['stages'][k]:.2f}x)" for k, v in res["stages"].items())
        print(
            f"{name:<7} {stages}  total {res['total']:5.1f}s ({res['total'] / base['total']:.2f}x; goal <= 5 s)"
            f"  1024-stage peak RSS {mem['peak_rss_gib']:.2f} GiB"
        )
    print(f"speed-up of the whole cascade: {base['total'] / new['total']:.2f}x")
    for key, (p, s) in quality().items():
        print(
            f"quality {key:<20} PSNR {p:6.2f} dB  SSIM {s:.4f}  (6 held-out digits at the folder's settings)"
        )


if __name__ == "__main__":
    main()
