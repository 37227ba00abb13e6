"""cdm-upscale: run one SR stage on any image, tiling large inputs.

cdm-upscale photo.jpg                  # the shipped 4x photo stage at its fidelity end (0 steps)
cdm-upscale photo.jpg --steps 2        # two sampling steps: a little texture, a little less PSNR
cdm-upscale photo.jpg --scheduler DPMSolverMultistepScheduler --steps 20 --autoguidance 1.5 \
    --detail-threshold 0.04            # the sharp end: detail where the photo has some
cdm-upscale photo.jpg --model runs/sr64to256/export --out upscaled/
cdm-upscale --compare figure.png original.png           # downsample, upscale, compare with bicubic
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import PIL.Image
import torch.nn.functional as F
from cdm_pipelines.pipeline_sr3 import check_number

from cdm.cli.arguments import OneLineParser, add_detail_arguments, add_speed_arguments, speed_from
from cdm.config import DataConfig, DataSource, ResizeMode
from cdm.devices import default_device, resolve_device
from cdm.errors import UserError, cli, flag_error
from cdm.files import OutputFolder
from cdm.images import centre_crop, comparison_figure, decode_image, to_pil, to_rgb, to_tensor
from cdm.measure.metrics import psnr
from cdm.models import with_scheduler
from cdm.train.data import open_dataset
from cdm.train.degradations import downsample
from cdm.upscaling import (
    PHOTO_STAGE,
    load_sr_stage,
    read_image,
    upscale,
)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="cdm-upscale", description="Super-resolve images with one SR stage.")
    p.add_argument("inputs", nargs="*", type=Path, metavar="IN", help="image files (PNG, JPEG, ...)")
    p.add_argument(
        "--model",
        default=str(PHOTO_STAGE),
        help="SR stage folder, cascade folder or Hub repo id (default: the shipped 4x photo stage)",
    )
    p.add_argument(
        "--compare",
        type=Path,
        default=None,
        metavar="PNG",
        help="treat the inputs as originals: downsample them by the stage's scale, upscale, and "
        "write a figure of low-res | bicubic | model | original with zoomed crops",
    )
    p.add_argument(
        "--held-out",
        type=int,
        default=0,
        metavar="N",
        help="add the first N held-out photos of the offline photo set as inputs (with --compare)",
    )
    p.add_argument("--stage", default=None, help="which SR stage of a cascade (default: the first)")
    p.add_argument("--out", type=Path, default=Path("upscaled"), help="output folder (default upscaled/)")
    p.add_argument("--tile", type=int, help="tile size in input pixels (default: the stage's)")
    p.add_argument("--overlap", type=int, help="tile overlap in input pixels (default: the stage's)")
    steps_help = "sampling steps; 0: one UNet evaluation, the stage's estimate of E[x | low-res] (default"
    p.add_argument("--steps", type=int, help=steps_help + ": the stage's; the photo stage's is 0)")
    p.add_argument("--scheduler", help="diffusers scheduler class (default: the stage's setting)")
    add_detail_arguments(p)
    p.add_argument(
        "--noise-level",
        type=int,
        default=None,
        help="augmentation level s of the input (default: the stage's)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--self-ensemble",
        action="store_true",
        help="average over the 8 rotations and mirror images: 8x the time, higher PSNR, smoother",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--device", default=default_device(), help="cpu, cuda, cuda:N or mps")
    add_speed_arguments(p)
    return p


def held_out_photos(n: int) -> list[tuple[str, PIL.Image.Image]]:
    """The first `n` held-out photos of the offline photo set (data=photos), by name."""
    ds, _, _ = open_dataset(
        DataConfig(source=DataSource.photos, resize=ResizeMode.none, label_column=None), "test"
    )
    if n > len(ds):
        raise UserError(f"--held-out={n}: the photo set holds out {len(ds)} photos")
    return [(Path(ds[i]["image"]["path"]).stem, decode_image(ds[i]["image"])) for i in range(n)]


def upscale_as_asked(pipe, image, args) -> PIL.Image.Image:
    """`upscale` with the command line's settings; those not given are the stage's own."""
    return upscale(
        pipe,
        image,
        args.tile,
        args.overlap,
        args.steps,
        args.noise_level,
        args.seed,
        args.self_ensemble,
        args.autoguidance,
        args.speed,
        args.detail_threshold,
    )


def compare(pipe, images, names, args, out, size: int = 384) -> None:
    """Downsample each original by the stage's scale, upscale it, and write low-res | bicubic | model | original."""
    f, rows = pipe.scale_factor, []
    settings = pipe.call_settings(
        num_inference_steps=args.steps,
        autoguidance_scale=args.autoguidance,
        detail_threshold=args.detail_threshold,
    )
    steps, autoguidance = settings["num_inference_steps"], settings["autoguidance_scale"]
    sampled = f"{steps} step{'s' * (steps > 1)}" if steps else "the estimate (0 steps)"
    guided = f", autoguidance {autoguidance:g}" if autoguidance != 1 else ""
    guided += f", detail threshold {settings['detail_threshold']:g}" if settings["detail_threshold"] else ""
    for name, image in zip(names, images):
        original = centre_crop(to_tensor(to_rgb(image))[None], size, f * 4)
        lr = downsample(original, f).clamp(0, 1)
        start = time.perf_counter()
        model = to_tensor(to_rgb(upscale_as_asked(pipe, to_pil(lr[0]), args)))[None]
        seconds = time.perf_counter() - start
        bicubic = F.interpolate(lr, scale_factor=f, mode="bicubic", align_corners=False).clamp(0, 1)
        nearest = F.interpolate(lr, scale_factor=f, mode="nearest")
        scores = [psnr(x, original).item() for x in (bicubic, model)]
        print(
            f"{name} {lr.shape[-1]}x{lr.shape[-2]} -> {original.shape[-1]}x{original.shape[-2]}: PSNR bicubic "
            f"{scores[0]:.2f} dB, model {scores[1]:.2f} dB ({steps} steps, {seconds:.1f}s)"
        )
        rows.append(
            {
                f"low-res {lr.shape[-1]}x{lr.shape[-2]} (nearest)": nearest[0],
                f"bicubic {scores[0]:.2f} dB": bicubic[0],
                f"cdm, {sampled}{guided}: {scores[1]:.2f} dB": model[0],
                "original": original[0],
            }
        )
    out.write(args.compare, comparison_figure(rows).save)
    print(f"wrote {args.compare}")


# the pipeline's argument -> this command's flag, for the pipeline's error lines
FLAGS = {
    "num_inference_steps": "--steps",
    "noise_level": "--noise-level",
    "autoguidance_scale": "--autoguidance",
    "detail_threshold": "--detail-threshold",
    "tile_size": "--tile (times the scale)",
    "tile_overlap": "--overlap (times the scale)",
}


def check_arguments(args, pipe) -> None:
    """The command line's settings, checked by the stage's own rules (its pipeline's) before any work."""
    f = pipe.scale_factor
    try:
        for flag, value, lo in (
            ("--tile", args.tile, 1),
            ("--overlap", args.overlap, 0),
            ("--seed", args.seed, 0),
        ):
            if value is not None:
                check_number(flag, value, lo, None, integer=True)
        pipe.call_settings(
            num_inference_steps=args.steps,
            noise_level=args.noise_level,
            autoguidance_scale=args.autoguidance,
            detail_threshold=args.detail_threshold,
            tile_size=None if args.tile is None else args.tile * f,
            tile_overlap=None if args.overlap is None else args.overlap * f,
        )
        check_number("--held-out", args.held_out, 0, 1000, integer=True)
    except ValueError as err:
        raise flag_error(err, FLAGS) from None
    if args.held_out and args.compare is None:
        raise UserError(
            "--held-out needs --compare FIGURE.png: held-out photos are originals to compare with"
        )


@cli
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.device = resolve_device(args.device)
    args.speed = speed_from(args, args.device)
    pipe, _ = load_sr_stage(args.model, args.stage)
    check_arguments(args, pipe)
    pipe = with_scheduler(pipe, args.scheduler, args.steps or pipe.call_settings()["num_inference_steps"])
    # every input is checked (its size from the header, before decoding) before anything is written
    images = [read_image(p, pipe.scale_factor) for p in args.inputs]
    names = [p.stem for p in args.inputs]
    if args.held_out:
        held = held_out_photos(args.held_out)
        images, names = images + [image for _, image in held], names + [name for name, _ in held]
    if not images:
        raise UserError("no input image: pass image files (or --compare FIGURE.png --held-out N)")

    if args.compare is not None:
        out = OutputFolder(args.compare.parent, args.overwrite, flag="--compare", inputs=args.inputs)
        out.plan([args.compare])
        with out:
            compare(pipe.to(args.device), images, names, args, out)
        return
    out = OutputFolder(args.out, args.overwrite, inputs=args.inputs)
    outputs = out.plan([args.out / f"{p.stem}-x{pipe.scale_factor}.png" for p in args.inputs])
    pipe.to(args.device)
    with out:
        for path, image, target in zip(args.inputs, images, outputs):
            start = time.perf_counter()
            result = upscale_as_asked(pipe, image, args)
            out.write(target, result.save)
            print(
                f"{path} {image.width}x{image.height} -> {target} {result.width}x{result.height} "
                f"({time.perf_counter() - start:.1f}s)"
            )


if __name__ == "__main__":
    sys.exit(main())
