"""cdm-export: assemble a cascade (or a single stage) folder with its model card, and push it.

cdm-export runs/base64 runs/sr64to256 runs/sr256to1024 --out my-cascade --eval results.json
cdm-export my-cascade --push-to-hub user/my-cascade
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import PIL.Image
from cdm_pipelines import SR3Pipeline
from cdm_pipelines.pipeline_sr3 import check_guide

from cdm.cascade import Cascade, Stage, check_settings
from cdm.config import sampling_fields
from cdm.errors import UserError, cli
from cdm.files import EXPORT_MARKER, check_replaceable, mark_export, replace_folder, staging_folder
from cdm.hub.cards import load_results, make_card
from cdm.hub.publish import push_to_hub
from cdm.hub.space import check_space, write_space
from cdm.stage_io import (
    copy_stage,
    find_stage_folder,
    load_stage,
    stage_info,
    stage_settings,
    write_cascade_json,
    write_pipeline_file,
    write_sampler,
)

STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def apply_overrides(names: list[str], settings: list, overrides: list[str]) -> None:
    """`STAGE.KEY=VALUE` edits of the per-stage sampling defaults, typed like SamplingConfig."""
    fields = sampling_fields()
    for item in overrides:
        key, sep, value = item.partition("=")
        stage, _, field = key.partition(".")
        if not sep or stage not in names or field not in fields:
            raise UserError(
                f"--set {item}: expected STAGE.KEY=VALUE with STAGE in {names} and KEY in {list(fields)}"
            )
        kind = fields[field]
        try:
            setattr(settings[names.index(stage)], field, kind(value))
        except ValueError:
            raise UserError(f"--set {item}: {value!r} is not a valid {kind.__name__}") from None


def assemble(
    inputs: list[Path],
    out: Path,
    results: list[dict],
    repo: str,
    license: str | None,
    grid: Path | None,
    overwrite: bool,
    half: bool = False,
    overrides: list[str] = (),
    notes: str | None = None,
    guide: Path | None = None,
) -> Path:
    """Build the folder under a temporary name and move it into place only when complete."""
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists: pass --overwrite or choose another --out")
    check_replaceable(out, inputs)
    if grid is not None and not grid.is_file():
        raise UserError(f"--samples {grid}: no such image")
    folders, infos, pipes, names, settings = load_inputs(inputs, list(overrides))
    licenses = {(i or {}).get("train", {}).get("license") for i in infos} - {None}
    license = license or (licenses.pop() if len(licenses) == 1 else "apache-2.0")
    single = len(pipes) == 1
    guide_folder = take_guide(guide, pipes) if guide is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_folder(out)
    try:
        targets = [tmp] if single else [tmp / name for name in names]
        for folder, target, pipe, s in zip(folders, targets, pipes, settings):
            copy_stage(folder, target, half)
            write_pipeline_file(pipe, target)
            write_sampler(pipe, s, target)
        if guide_folder is not None:
            attach_guide(guide_folder, tmp, half)
        if not single:
            imagenet = any("imagenet" in str((i or {}).get("data", {})).lower() for i in infos)
            write_cascade_json(tmp, names, settings, {"label_set": "imagenet"} if imagenet else None)
        if grid is not None:  # a card image, not an archive: at most 2048 px on a side
            with PIL.Image.open(grid) as image:
                image.thumbnail((2048, 2048), PIL.Image.LANCZOS)
                image.convert("RGB").save(tmp / "samples.png", optimize=True)
        card = make_card(
            names, pipes, settings, infos, results, repo, license, has_samples=grid is not None, notes=notes
        )
        card.save(tmp / "README.md")
        mark_export(tmp, {"written_by": "cdm-export", "inputs": [str(p) for p in inputs], "repo": repo})
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def take_guide(guide: Path, pipes: list) -> Path:
    """`--guide`: an SR stage of the same task (scale, target, prediction) for the one SR stage exported.
    Its UNet joins that stage's pipeline, which the card describes; returns the guide's folder."""
    if len(pipes) != 1 or not isinstance(pipes[0], SR3Pipeline):
        raise UserError(
            f"--guide {guide}: a guide is attached to one SR stage; expected a single SR stage input"
        )
    folder = find_stage_folder(guide)
    guide_pipe, main = load_stage(folder), pipes[0]
    if not isinstance(guide_pipe, SR3Pipeline):
        raise UserError(f"--guide {guide}: a {type(guide_pipe).__name__}, expected an SR stage")
    keys = ("residual", "residual_scale", "low_res_size")
    same = [guide_pipe.config[k] == main.config[k] for k in keys] + [
        guide_pipe.scale_factor == main.scale_factor,
        guide_pipe.scheduler.config.prediction_type == main.scheduler.config.prediction_type,
    ]
    if not all(same):
        raise UserError(
            f"--guide {guide}: not the same task as the stage (expected the same scale, residual target and "
            "prediction type)"
        )
    try:
        check_guide(main.unet, guide_pipe.unet)
    except ValueError as err:
        raise UserError(f"--guide {guide}: {err}") from None
    main.register_modules(guide_unet=guide_pipe.unet)
    return folder


def attach_guide(folder: Path, target: Path, half: bool) -> None:
    """Copy the guide stage's UNet into `target/guide_unet/` and name it in model_index.json."""
    staging = target / ".guide"
    copy_stage(folder, staging, half)
    shutil.rmtree(target / "guide_unet", ignore_errors=True)  # a guide the stage already had
    shutil.move(str(staging / "unet"), str(target / "guide_unet"))
    shutil.rmtree(staging)
    index_path = target / "model_index.json"
    index = json.loads(index_path.read_text())
    index["guide_unet"] = ["diffusers", "UNet2DConditionModel"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def load_inputs(inputs: list[Path], overrides: list[str]):
    """Each input's stage folder, training record, pipeline, name and checked sampling settings."""
    folders = [find_stage_folder(p) for p in inputs]
    infos = [stage_info(f) for f in folders]
    pipes = [load_stage(f) for f in folders]
    names = [
        (i or {}).get("stage", {}).get("name") or f.parent.name if f.name == "export" else f.name
        for f, i in zip(folders, infos)
    ]
    for name in names:  # a name becomes a folder of the export: a plain name, never a path
        if not isinstance(name, str) or not STAGE_NAME.fullmatch(name):
            raise UserError(
                f"stage name {name!r}: expected a plain folder name (letters, digits, '.', '_', '-'; at most 64)"
            )
    if len(set(names)) != len(names):
        raise UserError(f"stage names repeat: {names}")
    settings = [stage_settings(i) for i in infos]
    for name, s in zip(names, settings):
        if name.endswith("1024") or s.max_batch > 8:
            s.max_batch = 1  # whole 1024 px images, one at a time, keep memory bounded
    apply_overrides(names, settings, overrides)
    for name, pipe, s in zip(names, pipes, settings):  # the checks cdm-generate applies when reading
        check_settings(name, pipe, s)
    if len(pipes) > 1:  # the chain, the samplers, truncation
        Cascade([Stage(*stage) for stage in zip(names, pipes, settings)]).with_overrides()
    return folders, infos, pipes, names, settings


def add_card_arguments(p: argparse.ArgumentParser) -> None:
    """What goes into the model card besides the measured results."""
    p.add_argument(
        "--repo-id",
        default=None,
        help="the Hub repo id the card's snippets name (default: --push-to-hub's, else the folder's name)",
    )
    p.add_argument("--samples", type=Path, default=None, help="a sample grid image to show in the card")
    p.add_argument(
        "--notes",
        type=Path,
        default=None,
        metavar="FILE",
        help="markdown to add to the card after the method sections (e.g. how the defaults were chosen)",
    )
    p.add_argument(
        "--license", default=None, help="license id for the card (default: from the training config)"
    )


GUIDE_HELP = "attach this smaller SR stage's UNet as the guide for autoguidance (a single SR stage only)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cdm-export", description="Assemble a cascade or stage folder with a card."
    )
    p.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="STAGE_RUN_OR_FOLDER",
        help="training runs or stage folders in cascade order; or one assembled folder to push",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="folder to write (required unless pushing a folder)"
    )
    p.add_argument(
        "--eval",
        dest="evals",
        type=Path,
        action="append",
        default=[],
        help="cdm-eval results.json to put in the card (repeatable)",
    )
    add_card_arguments(p)
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None)
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in token)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="change a stage's sampling default in cascade.json, e.g. base64.steps=50",
    )
    p.add_argument(
        "--half", action="store_true", help="store weights as fp16 (half the size; loaded as fp32)"
    )
    p.add_argument(
        "--space",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write a Gradio Space for the cascade here (app.py, requirements.txt, README.md)",
    )
    p.add_argument("--guide", type=Path, metavar="STAGE_RUN_OR_FOLDER", help=GUIDE_HELP)
    p.add_argument("--overwrite", action="store_true")
    return p


def rename_repo_in_card(folder: Path, repo: str) -> None:
    """Point an assembled folder's card at `repo`: every snippet names the repo the card was written
    for (recorded when cdm-export wrote the folder)."""
    marker, card = folder / EXPORT_MARKER, folder / "README.md"
    try:
        old = json.loads(marker.read_text()).get("repo") if marker.is_file() else None
    except (OSError, json.JSONDecodeError):
        old = None
    if not old or old == repo or not card.is_file():
        return
    text = re.sub(rf'(?<=["\s/]){re.escape(old)}(?=["\s)])', repo, card.read_text())
    card.write_text(text)
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "repo": repo}, indent=1) + "\n")


def read_notes(path: Path | None) -> str | None:
    """The text of `--notes FILE`, checked before any work."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"--notes {path}: expected a readable UTF-8 markdown file ({e.__class__.__name__})"
        ) from None


@cli
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    repo = args.push_to_hub or args.repo_id or (args.out.name if args.out else args.inputs[0].name)
    assembled = (
        len(args.inputs) == 1
        and args.out is None
        and ((args.inputs[0] / "cascade.json").is_file() or (args.inputs[0] / "README.md").is_file())
    )
    if args.space is not None:
        check_space(args.space, args.overwrite)
    if assembled:
        folder = args.inputs[0]
    else:
        if args.out is None:
            raise UserError("--out is required to assemble a cascade or stage folder")
        folder = assemble(
            args.inputs,
            args.out,
            load_results(args.evals),
            repo,
            args.license,
            args.samples,
            args.overwrite,
            args.half,
            args.overrides,
            read_notes(args.notes),
            args.guide,
        )
        print(f"wrote {folder}/ ({', '.join(sorted(p.name for p in folder.iterdir()))})")
    if args.space is not None:
        written = write_space(args.space, repo, args.overwrite)
        print(f"wrote a Gradio Space to {args.space}/ ({', '.join(p.name for p in written)})")
    if args.push_to_hub:
        if assembled:  # the card was written for another repo id: its snippets must name this one
            rename_repo_in_card(folder, args.push_to_hub)
        url = push_to_hub(folder, args.push_to_hub, args.private, args.token)
        print(f"pushed {folder}/ to {args.push_to_hub}: {url}")


if __name__ == "__main__":
    sys.exit(main())
