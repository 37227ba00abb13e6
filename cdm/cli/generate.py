"""cdm-generate: sample a whole cascade for one or more classes.

cdm-generate --class 207 --model user/cascade --num-images 4 --seed 0 --out samples/
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import PIL.Image
from accelerate import PartialState
from cdm_pipelines.pipeline_sr3 import check_number

from cdm.cascade import DEMO_CASCADE, Cascade
from cdm.cli.arguments import OneLineParser, add_speed_arguments, speed_from
from cdm.devices import default_device, resolve_device
from cdm.errors import UserError, cli
from cdm.files import OutputFolder
from cdm.images import save_grid, to_pil, to_tensor

CHUNK = 16  # images taken through the whole cascade at a time
GRID_MAX = 64  # the grid shows at most this many final images


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected comma-separated {kind.__name__} values"
            ) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="cdm-generate", description="Sample images from a cascade.")
    p.add_argument(
        "--class",
        dest="classes",
        action="append",
        required=True,
        metavar="ID_OR_NAME",
        help="class index or label name (repeat for several classes), e.g. 207 or 'golden retriever'",
    )
    p.add_argument("--model", default=None, help="cascade folder or Hub repo id (default: the demo cascade)")
    p.add_argument("--num-images", type=int, default=1, help="images per class (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--out", type=Path, default=Path("samples"), help="output folder (default samples/)")
    p.add_argument("--steps", type=_csv(int), help="steps per stage, e.g. 50,50,25 (one value: every stage)")
    p.add_argument(
        "--guidance", type=_csv(float), help="guidance scale (one value: class-conditional stages)"
    )
    p.add_argument("--noise-level", type=_csv(int), help="augmentation level s per stage, e.g. 0,100,100")
    p.add_argument("--aug-mode", type=_csv(str), help="truncated or non-truncated (per stage or one value)")
    p.add_argument(
        "--scheduler", type=_csv(str), help="diffusers scheduler class name(s), e.g. DDIMScheduler"
    )
    p.add_argument("--stages", type=int, default=None, help="run only the first N stages")
    p.add_argument("--save-intermediates", action="store_true", help="also save every stage's images")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    p.add_argument("--device", default=default_device(), help="cpu, cuda, cuda:N or mps")
    add_speed_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--device-map",
        type=_csv(str),
        default=None,
        metavar="DEV,DEV,...",
        help="one device per stage, e.g. cuda:0,cuda:1,cuda:1; the stages then run as a pipeline",
    )
    return p


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.split(",")[0].strip().lower()).strip("-") or "class"


def planned_files(cascade, ids, seeds, out: Path, intermediates: bool) -> dict[int, list[Path]]:
    """Every file this run will write, by stage index (the last stage always, others on request)."""
    last = len(cascade.pipes) - 1
    files = {}
    for k, res in enumerate(cascade.resolutions):
        if k == last or intermediates:
            files[k] = [
                out / f"{i:03d}-{slug(cascade.base.labels.get(c, str(c)))}-seed{s}-{res}px.png"
                for i, (c, s) in enumerate(zip(ids, seeds))
            ]
    return files


@cli
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.device = resolve_device(args.device)
    try:
        check_number("--num-images", args.num_images, 1, 100_000, integer=True)
        check_number("--seed", args.seed, 0, 2**63 - 1 - 100_000 * len(args.classes), integer=True)
    except ValueError as err:
        raise UserError(str(err)) from None
    cascade = Cascade.from_pretrained(args.model or DEMO_CASCADE)
    if args.stages is not None:
        if not 1 <= args.stages <= len(cascade.pipes):
            raise UserError(f"--stages={args.stages}: expected 1..{len(cascade.pipes)}")
        cascade = cascade[: args.stages]
    settings = cascade.with_overrides(
        steps=args.steps,
        guidance_scale=args.guidance,
        noise_level=args.noise_level,
        aug_mode=args.aug_mode,
        scheduler=args.scheduler,
    )
    ids = [i for c in args.classes for i in class_ids(cascade, c, args.model) for _ in range(args.num_images)]
    seeds = [args.seed + i for i in range(len(ids))]
    files = planned_files(cascade, ids, seeds, args.out, args.save_intermediates)
    grid_path = args.out / "grid.png"
    # one process, unless started by accelerate launch (which marks CPU-only launches in the environment)
    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    out = OutputFolder(args.out, args.overwrite, lock=state.is_main_process)
    out.plan([p for group in files.values() for p in group] + [grid_path])
    place(cascade, state, args)
    with out:
        with state.split_between_processes(list(range(len(ids)))) as mine:
            mine = list(mine)
        seconds = sample_share(cascade, ids, seeds, settings, files, mine, args, out)
        state.wait_for_everyone()
        if not state.is_main_process:
            return
        out.adopt([p for group in files.values() for p in group])  # the other processes' images too
        final = files[len(cascade.pipes) - 1][:GRID_MAX]
        grid = [to_tensor(PIL.Image.open(p).convert("RGB")) for p in final]
        out.write(grid_path, lambda tmp: save_grid(grid, tmp, ncols=min(len(final), 8)))
    labels = cascade.base.labels
    names = ", ".join(dict.fromkeys(f"{c} ({labels.get(c, c)})" for c in ids))
    share = f" ({len(mine)} on this process of {state.num_processes})" if state.num_processes > 1 else ""
    print(f"{len(ids)} image(s) of class {names} from {cascade.root}")
    for name, res, sec in zip(cascade.names, cascade.resolutions, seconds):
        print(f"  {name:<12} {res:>5}px  {sec:7.1f}s  ({sec / max(len(mine), 1):.1f}s per image){share}")
    print(f"wrote {sum(len(v) for v in files.values())} PNGs and {grid_path} to {args.out}/")


def class_ids(cascade, label: str, model: str | None) -> list[int]:
    """A class index or name; against the default model, the error says what that model is and how to
    name another (`--class 207` means an ImageNet cascade)."""
    try:
        return cascade.class_ids([label])
    except UserError as err:
        if model is not None:
            raise
        raise UserError(
            f"{err}. The default model is the shipped demo cascade ({cascade.num_classes} digit classes, "
            f"0..{cascade.num_classes - 1}); for other classes pass a cascade trained on them, e.g. "
            f"cdm-generate --model USER/IMAGENET-CASCADE --class {label!r}"
        ) from None


def place(cascade, state, args) -> None:
    """All stages on this process's device, or each on its own (--device-map, one process)."""
    if args.device_map is None:
        cascade.to(state.device if state.num_processes > 1 else args.device)
    elif state.num_processes > 1:
        raise UserError("--device-map places the stages of one process: run it without accelerate launch")
    else:
        cascade.place([resolve_device(d) for d in args.device_map])
    cascade.optimize(speed_from(args, cascade.pipes[0].device))


def sample_share(cascade, ids, seeds, settings, files: dict, mine: list[int], args, out) -> list[float]:
    """Sample this process's images in chunks (memory stays flat), writing each stage's PNGs as they
    arrive; returns the seconds spent per stage."""
    if args.device_map is not None:  # the stages as a pipeline, a few images at a time

        def on_chunk_end(k, lo, hi, images):
            for pos, img in zip(mine[lo:hi], images):
                if k in files:
                    out.write(files[k][pos], to_pil(img).save)

        chunk = min(s.max_batch for s in settings)
        sub_ids, sub_seeds = [ids[p] for p in mine], [seeds[p] for p in mine]
        return cascade.pipelined(sub_ids, sub_seeds, settings, chunk, on_chunk_end)
    seconds = [0.0] * len(cascade.pipes)
    for lo in range(0, len(mine), CHUNK):
        part = mine[lo : lo + CHUNK]

        def on_stage_end(k, name, images, part=part):
            for pos, img in zip(part, images):
                if k in files:
                    out.write(files[k][pos], to_pil(img).save)

        result = cascade(
            [ids[p] for p in part], [seeds[p] for p in part], settings, on_stage_end, progress=not args.quiet
        )
        seconds = [a + b for a, b in zip(seconds, result.seconds)]
    return seconds


if __name__ == "__main__":
    sys.exit(main())
