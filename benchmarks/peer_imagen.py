"""cdm's photo recipe beside imagen-pytorch's SR Unet, trained on the same photos and crops for the same
CPU time, then scored on the same held-out 128 px crops (docs/peer.md has the table and the commands).

Steps, each its own process (imagen-pytorch needs torchvision, so it runs from a separate venv):

  python benchmarks/peer_imagen.py data OUT                      # cdm's venv: training photos, held-out crops
  PEER/bin/python benchmarks/peer_imagen.py train OUT --minutes 30 --threads 1   # imagen-pytorch
  python benchmarks/peer_imagen.py cdm OUT --minutes 30 --threads 1              # cdm's photo recipe
  PEER/bin/python benchmarks/peer_imagen.py sample OUT           # imagen-pytorch upscales the crops
  python benchmarks/peer_imagen.py score OUT                     # both, beside bicubic: PSNR, SSIM, HF, KID

imagen-pytorch is configured from its README: `ElucidatedImagen` (its recommended sampler, 32 steps)
with `condition_on_text=False`, a `NullUnet` in place of the base stage, and a `Unet(lowres_cond=True)`
at its defaults except the size (dim 40, dim_mults (1, 2, 4): 5.6M parameters against the photo stage's
4.85M) and attention at the lowest level only (its default of attention at every level would hold a
16384-token attention map at 128 px). It trains through its own `ImagenTrainer` at its defaults (lr 1e-4,
EMA). Its T5 text encoder is never used; imagen-pytorch still reads T5's width when it is imported,
which would need the network, so that one number (768) is given to it here.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

CROP, SCALE, BATCH = 64, 4, 16  # the photo recipe's: 64 px crops (16 px low-res), 16 a step
TEST_CROP, TEST_PER_PHOTO = 128, 3  # imagen samples with 32 Heun steps: 256 px crops took > 5 min each here


def write_data(out: Path) -> None:
    """The photo recipe's training photos as PNGs, and held-out 128 px crops with their low-res inputs
    (anti-aliased bicubic, as cdm-eval makes them) as float arrays, so both models see the same values."""
    import torch

    from cdm.config import DataConfig, DataSource, ResizeMode
    from cdm.images import to_pil
    from cdm.measure.heldout import data_config, whole_images
    from cdm.train.data import open_dataset
    from cdm.train.degradations import downsample

    ds, _, _ = open_dataset(
        DataConfig(source=DataSource.photos, resize=ResizeMode.none, label_column=None), "train"
    )
    (out / "train").mkdir(parents=True, exist_ok=True)
    from cdm.images import decode_image

    for i in range(len(ds)):
        decode_image(ds[i]["image"]).convert("RGB").save(out / "train" / f"{i:04d}.png")
    hr, names = [], []
    for k, x in enumerate(whole_images(data_config("photos", None, sr=True), "test", 4, None)):
        h, w = x.shape[-2:]
        for top in range(0, h - TEST_CROP + 1, TEST_CROP):
            for left in range(0, w - TEST_CROP + 1, TEST_CROP):
                if sum(n.startswith(f"{k}-") for n in names) < TEST_PER_PHOTO:
                    hr.append(x[..., top : top + TEST_CROP, left : left + TEST_CROP])
                    names.append(f"{k}-{top}-{left}")
    hr = torch.cat(hr)
    np.save(out / "test_hr.npy", hr.numpy())
    np.save(out / "test_lr.npy", downsample(hr, SCALE).clamp(0, 1).numpy())
    (out / "test_names.json").write_text(json.dumps(names))
    print(f"{len(ds)} training photos, {len(names)} held-out crops of {TEST_CROP} px -> {out}")
    to_pil(hr[0]).save(out / "test_example.png")


def random_crops(photos: list[np.ndarray], rng: random.Random, n: int) -> np.ndarray:
    """n random 64 px crops, each flipped and rotated at random (the photo recipe's augmentation)."""
    crops = []
    for _ in range(n):
        p = photos[rng.randrange(len(photos))]
        top, left = rng.randrange(p.shape[0] - CROP + 1), rng.randrange(p.shape[1] - CROP + 1)
        c = p[top : top + CROP, left : left + CROP]
        c = np.rot90(c[:, ::-1] if rng.random() < 0.5 else c, rng.randrange(4))
        crops.append(np.ascontiguousarray(c))
    return np.stack(crops).transpose(0, 3, 1, 2).astype(np.float32) / 255


def imagen_offline():
    """Import imagen-pytorch without the network: it reads the T5 encoder's width at import time."""
    from transformers import T5Config

    original = T5Config.from_pretrained.__func__

    def width_only(cls, name, *args, **kwargs):
        return cls(d_model=768) if "t5" in str(name) else original(cls, name, *args, **kwargs)

    T5Config.from_pretrained = classmethod(width_only)
    import imagen_pytorch

    return imagen_pytorch


def make_imagen(sizes: tuple[int, int]):
    ip = imagen_offline()
    unet = ip.Unet(
        dim=40,
        dim_mults=(1, 2, 4),
        lowres_cond=True,
        layer_attns=(False, False, True),
        layer_cross_attns=False,
    )
    return ip.ElucidatedImagen(unets=(ip.NullUnet(), unet), image_sizes=sizes, condition_on_text=False)


def train_imagen(out: Path, minutes: float) -> None:
    import PIL.Image
    import torch

    ip = imagen_offline()
    imagen = make_imagen((CROP // SCALE, CROP))
    trainer = ip.ImagenTrainer(imagen, only_train_unet_number=2, verbose=False)
    params = sum(p.numel() for p in imagen.unets[1].parameters())
    photos = [np.asarray(PIL.Image.open(p).convert("RGB")) for p in sorted((out / "train").glob("*.png"))]
    rng, losses, start, steps = random.Random(0), [], time.time(), 0
    torch.manual_seed(0)
    while time.time() - start < minutes * 60:
        loss = trainer(torch.from_numpy(random_crops(photos, rng, BATCH)), unet_number=2)
        trainer.update(unet_number=2)
        losses.append(float(loss))
        steps += 1
        if steps % 50 == 0:
            print(f"step {steps} loss {np.mean(losses[-50:]):.4f} {time.time() - start:.0f}s", flush=True)
    seconds = time.time() - start
    torch.save(
        trainer.ema_unets[1].ema_model.state_dict() if trainer.use_ema else imagen.unets[1].state_dict(),
        out / "imagen_unet.pt",
    )
    record = {
        "steps": steps,
        "seconds": seconds,
        "parameters": params,
        "final_loss": float(np.mean(losses[-50:])),
    }
    (out / "imagen_train.json").write_text(json.dumps(record))
    print(json.dumps(record))


def sample_imagen(out: Path) -> None:
    import torch

    imagen = make_imagen((CROP, TEST_CROP))
    imagen.unets[1].load_state_dict(torch.load(out / "imagen_unet.pt", weights_only=True))
    imagen.eval()
    lr = torch.from_numpy(np.load(out / "test_lr.npy"))
    outs, start = [], time.time()
    torch.manual_seed(0)
    for i in range(len(lr)):
        with torch.no_grad():
            x = imagen.sample(
                batch_size=1, start_at_unet_number=2, start_image_or_video=lr[i : i + 1], use_tqdm=False
            )
        outs.append(x.float().clamp(0, 1).numpy())
        print(f"crop {i + 1}/{len(lr)} {time.time() - start:.0f}s", flush=True)
    np.save(out / "imagen_out.npy", np.concatenate(outs))


def train_cdm(out: Path, minutes: float) -> None:
    """cdm's photo recipe from scratch on the same photo set (its own data path: random 64 px crops after
    a random rescale by 0.5-1, flips and rotations), for as many steps as fit in `minutes` (the rate is
    measured on a 20-step probe, kept for a re-run, then the run is sized to the budget)."""
    import subprocess

    def run(steps: int, folder: Path) -> dict:
        cmd = [
            str(Path(sys.executable).parent / "cdm-train"),
            "experiment=photo_sr4x",  # its own data path over the same photo set (data=photos)
            "train.tracker=none",
            f"train.max_steps={steps}",
            "train.sample_every=1000000",
            "train.checkpoint_every=1000000",
            f"train.output_dir={folder}",
        ]
        subprocess.run(cmd, check=True)
        return json.loads((folder / "run_info.json").read_text())

    if not (out / "cdm_probe" / "run_info.json").is_file():
        run(20, out / "cdm_probe")
    rate = json.loads((out / "cdm_probe" / "run_info.json").read_text())["steps_per_second"]
    steps = max(1, int(rate * minutes * 60))
    print(f"cdm: {rate:.3f} steps/s on the probe: {steps} steps for {minutes} min", flush=True)
    record = run(steps, out / "cdm_run")
    (out / "cdm_train.json").write_text(json.dumps(record))


def score(out: Path) -> None:
    import torch

    from cdm.devices import Speed
    from cdm.measure.baselines import bicubic
    from cdm.measure.sr import score_sr
    from cdm.stage_io import load_stage

    hr = torch.from_numpy(np.load(out / "test_hr.npy"))
    lr = torch.from_numpy(np.load(out / "test_lr.npy"))
    hrs, lrs = list(hr.split(1)), list(lr.split(1))
    rows = {"bicubic": [bicubic(x, SCALE) for x in lrs]}
    pipe = load_stage(out / "cdm_run" / "export")
    pipe.set_progress_bar_config(disable=True)
    speed = Speed.resolve("auto", torch.device("cpu"))
    speed.apply(pipe)
    cdm_out = []
    for i, x in enumerate(lrs):
        with speed.autocast(pipe.device):
            cdm_out.append(
                pipe(x, output_type="pt", generator=torch.Generator().manual_seed(i)).images.float()
            )
    rows["cdm photo recipe"] = cdm_out
    rows["imagen-pytorch"] = list(torch.from_numpy(np.load(out / "imagen_out.npy")).split(1))
    table = {name: score_sr(preds, hrs, lrs, kid=True) for name, preds in rows.items()}
    (out / "scores.json").write_text(json.dumps(table, indent=1))
    for name, m in table.items():
        print(f"| {name} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['hf_ratio']:.2f} | {m['patch_kid']:.4f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["data", "train", "cdm", "sample", "score"])
    p.add_argument("out", type=Path)
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        import os

        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    {
        "data": lambda: write_data(args.out),
        "train": lambda: train_imagen(args.out, args.minutes),
        "cdm": lambda: train_cdm(args.out, args.minutes),
        "sample": lambda: sample_imagen(args.out),
        "score": lambda: score(args.out),
    }[args.what]()


if __name__ == "__main__":
    main()
