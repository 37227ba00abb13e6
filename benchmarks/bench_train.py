"""cdm-train's step against a bare accelerate loop (same UNet, batch, precision), and base-stage MFU."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import accelerate
import torch
from accelerate.state import AcceleratorState
from common import SMOKE, header
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from cdm.cli.train import compose_config
from cdm.config import TrainRunConfig, validate
from cdm.models import build_unet
from cdm.train.loop import train

BATCH, STEPS = (2, 2) if SMOKE else (8, 12)


def cdm_images_per_second(precision: str, out: Path, recipe: list[str] | None = None) -> float:
    recipe = recipe or ["stage=base64", "unet=small", "data=digits", f"train.batch_size={BATCH}"]
    overrides = [
        *recipe,
        f"train.max_steps={STEPS}",
        f"train.mixed_precision={precision}",
        "train.tracker=none",
        "train.sample_every=100000",
        "train.checkpoint_every=100000",
        "train.num_samples=1",
        "stage.sample.steps=1",
        f"train.output_dir={out}",
    ]
    cfg = OmegaConf.merge(OmegaConf.structured(TrainRunConfig), compose_config(overrides))
    validate(cfg)
    AcceleratorState._reset_state(reset_partial_state=True)  # each run picks its own precision
    train(cfg)
    info = json.loads((out / "run_info.json").read_text())
    return info["steps_per_second"] * info["images_per_step"]


def bare_images_per_second(precision: str) -> tuple[float, float]:
    """A plain accelerate loop on in-memory tensors; also returns the seconds per step."""
    cfg = OmegaConf.merge(
        OmegaConf.structured(TrainRunConfig), compose_config(["stage=base64", "unet=small"])
    )
    unet = build_unet(cfg.stage, cfg.unet, 10)
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = accelerate.Accelerator(mixed_precision=precision)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    unet, opt = acc.prepare(unet, opt)
    x = torch.randn(BATCH, 3, 64, 64)
    labels = torch.randint(0, 11, (BATCH,))

    def step():
        t = torch.randint(0, 1000, (BATCH,))
        with acc.autocast():
            loss = (unet(x, t, class_labels=labels).sample.float() - x).pow(2).mean()
        acc.backward(loss)
        acc.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    step()
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    per_step = (time.perf_counter() - start) / STEPS
    return BATCH / per_step, per_step


def matmul_peak(dtype) -> float:
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    start = time.perf_counter()
    n = 5
    for _ in range(n):
        a @ b
    return 2 * 2048**3 * n / (time.perf_counter() - start)


def train_step_flops() -> float:
    cfg = OmegaConf.merge(
        OmegaConf.structured(TrainRunConfig), compose_config(["stage=base64", "unet=small"])
    )
    unet = build_unet(cfg.stage, cfg.unet, 10)
    x = torch.randn(BATCH, 3, 64, 64)
    with FlopCounterMode(display=False) as counter:
        loss = unet(
            x, torch.randint(0, 1000, (BATCH,)), class_labels=torch.zeros(BATCH, dtype=torch.long)
        ).sample
        loss.pow(2).mean().backward()
    return counter.get_total_flops()


PHOTO_BATCH = 2 if SMOKE else 16


def photo_recipe() -> None:
    """The photo stage's recipe (photo_sr4x: 16 crops of 64 px a step) at its former precision (bf16
    autocast on any CPU) and at its current one (`auto`: bf16 only where the CPU has bf16 units)."""
    from cdm.devices import training_precision

    header(f"training the photo recipe (experiment=photo_sr4x), batch {PHOTO_BATCH}, {STEPS} steps")
    recipe = ["experiment=photo_sr4x", f"train.batch_size={PHOTO_BATCH}", "train.init_from=null"]
    rates = {}
    for name, precision in (("before", "bf16"), ("now", "auto")):
        with tempfile.TemporaryDirectory() as tmp:
            rates[name] = cdm_images_per_second(precision, Path(tmp) / "run", recipe) / PHOTO_BATCH
        resolved = training_precision(precision)
        print(f"{name:<7} train.mixed_precision={precision} ({resolved})  {rates[name]:5.2f} steps/s")
    print(f"speed-up: {rates['now'] / rates['before']:.2f}x (goal >= 2x)")


def main():
    photo_recipe()
    header(f"training step, base64 small preset, batch {BATCH}, {STEPS} steps")
    flops = train_step_flops()
    for precision, dtype in (("no", torch.float32), ("bf16", torch.bfloat16)):
        with tempfile.TemporaryDirectory() as tmp:
            ours = cdm_images_per_second(precision, Path(tmp) / "run")
        bare, per_step = bare_images_per_second(precision)
        peak = matmul_peak(dtype)
        mfu = flops / per_step / peak
        print(
            f"precision={precision:<4} cdm-train {ours:6.1f} img/s  bare accelerate {bare:6.1f} img/s  "
            f"ratio {ours / bare:.3f} (goal >= 1.0)"
        )
        print(
            f"               model FLOPs/step {flops / 1e9:.1f} G, achieved {flops / per_step / 1e9:.1f} GFLOP/s, "
            f"matmul peak {peak / 1e9:.1f} GFLOP/s ({dtype}), MFU {mfu:.1%} (goal >= 70%)"
        )


if __name__ == "__main__":
    main()
