"""The demo cascade: one 64 -> 256 -> 1024 image at batch 1, per stage, with and without bf16 autocast and
channels_last; and the peak memory of the 1024 stage. Each setting runs in a fresh process."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch
from common import SMOKE

CONFIGS = [
    ("fp32", False, False),
    ("fp32+channels_last", False, True),
    ("bf16", True, False),
    ("bf16+channels_last", True, True),
]


def run_one(bf16: bool, channels_last: bool) -> dict:
    from cdm.cascade import DEMO_CASCADE, Cascade

    cascade = Cascade.from_pretrained(DEMO_CASCADE).optimize(bf16=bf16, channels_last=channels_last)
    settings = cascade.with_overrides(steps=[1] * len(cascade.stages)) if SMOKE else cascade.settings
    if not SMOKE:
        cascade([3], seeds=[0], progress=False)  # warm-up (kernels, allocator)
    start = time.perf_counter()
    out = cascade([7], [1], settings, progress=False)
    total = time.perf_counter() - start
    return {"stages": dict(zip(out.stage_names, out.seconds)), "total": total}


def peak_1024(bf16: bool, channels_last: bool) -> dict:
    """Peak resident memory of a process that runs only the 1024 stage on one 256 px image."""
    from cdm.cascade import DEMO_CASCADE, Cascade

    cascade = Cascade.from_pretrained(DEMO_CASCADE).optimize(bf16=bf16, channels_last=channels_last)
    pipe, s = cascade.pipes[-1], cascade.settings[-1]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    x = torch.rand(1, 3, 256, 256)  # what the stage before hands over: a "pt" image in [0, 1]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        pipe(x, noise_level=s.noise_level, num_inference_steps=1 if SMOKE else s.steps, output_type="pt")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_gib": after / 2**20, "loaded_rss_gib": before / 2**20}


def main():
    if len(sys.argv) > 1:
        what, bf16, cl = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
        print(json.dumps(run_one(bf16, cl) if what == "time" else peak_1024(bf16, cl)))
        return
    print(f"\n== demo cascade, batch 1, one image 64 -> 256 -> 1024 (torch {torch.__version__})")
    baseline = None
    for name, bf16, cl in CONFIGS[:1] if SMOKE else CONFIGS:
        args = [str(int(bf16)), str(int(cl))]
        res = json.loads(
            subprocess.run(
                [sys.executable, __file__, "time", *args], capture_output=True, text=True, check=True
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        mem = json.loads(
            subprocess.run(
                [sys.executable, __file__, "mem", *args], capture_output=True, text=True, check=True
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        baseline = baseline or res["total"]
        stages = "  ".join(f"{k} {v:5.1f}s" for k, v in res["stages"].items())
        print(
            f"{name:<19} {stages}  total {res['total']:5.1f}s (ratio {res['total'] / baseline:.2f} vs fp32; "
            f"goal <= 60 s)  1024-stage peak RSS {mem['peak_rss_gib']:.2f} GiB (goal <= 3)"
        )


if __name__ == "__main__":
    main()
