"""cdm-export: assemble a cascade (or a single stage) folder with its model card, and push it.

cdm-export runs/base64 runs/sr64to256 runs/sr256to1024 --out my-cascade --eval results.json
cdm-export my-cascade --push-to-hub user/my-cascade
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from cdm.errors import UserError, cli
from cdm.files import check_replaceable, mark_export, replace_folder

UPLOAD_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.png", "*.py"]
NEVER_UPLOAD = [
    ".cdm-export.json",
    "*.pkl",
    "*.pickle",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "checkpoints/*",
    "**/checkpoints/*",
    "logs/*",
    "**/.tmp-*",
]
STAGE_FILES = ("*.json", "*/*.json", "*/*.safetensors")  # pipeline files: the installed ones


def find_stage_folder(path: Path) -> Path:
    """A training run folder (its export/) or a stage folder itself."""
    if not path.exists():
        raise UserError(f"{path}: no such folder")
    if (path / "model_index.json").is_file():
        return path
    if (path / "config.json").is_file() or (path / "checkpoints").is_dir():
        if not (path / "export" / "model_index.json").is_file():
            raise UserError(
                f"{path} is an incomplete run: it has no export/ (train it to train.max_steps first)"
            )
        return path / "export"
    raise UserError(f"{path}: neither a training run nor a pipeline folder (expected model_index.json)")


def stage_info(folder: Path) -> dict | None:
    f = folder / "cdm_stage.json"
    return json.loads(f.read_text()) if f.is_file() else None


def stage_settings(info: dict | None):
    """Sampling defaults recorded at training time (conf stage.sample), or the library defaults."""
    from cdm.cascade import StageSettings

    sample = ((info or {}).get("stage") or {}).get("sample") or {}
    known = StageSettings.__dataclass_fields__
    return StageSettings(**{k: v for k, v in sample.items() if k in known})


def copy_stage(src: Path, dst: Path, half: bool = False) -> None:
    """Copy only what a stage needs: JSON configs, safetensors weights (fp16 if `half`), the pipeline file."""
    from safetensors.torch import load_file, save_file

    for pattern in STAGE_FILES:
        for f in src.glob(pattern):
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            if half and f.suffix == ".safetensors":
                tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(f).items()}
                save_file(tensors, target)
            else:
                shutil.copyfile(f, target)


def write_sampler(pipe, settings, folder: Path) -> None:
    """Store the stage's sampling scheduler as its `scheduler/`, so plain diffusers samples as cdm does."""
    from cdm.models import sampling_scheduler

    try:
        scheduler = sampling_scheduler(settings.scheduler, pipe.scheduler.config, settings.steps)
    except ValueError as err:
        raise UserError(str(err)) from None
    scheduler.save_pretrained(folder / "scheduler")
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def apply_overrides(names: list[str], settings: list, overrides: list[str]) -> None:
    """`STAGE.KEY=VALUE` edits of the per-stage sampling defaults, typed like StageSettings."""
    from cdm.cascade import StageSettings

    fields = StageSettings.__dataclass_fields__
    for item in overrides:
        key, sep, value = item.partition("=")
        stage, _, field = key.partition(".")
        if not sep or stage not in names or field not in fields:
            raise UserError(
                f"--set {item}: expected STAGE.KEY=VALUE with STAGE in {names} and KEY in {list(fields)}"
            )
        kind = type(getattr(StageSettings(), field))
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
) -> Path:
    """Build the folder under a temporary name and move it into place only when complete."""
    from cdm.cards import make_card
    from cdm.cascade import Cascade, check_settings, write_cascade_json
    from cdm.stage_io import load_stage, write_pipeline_file

    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists: pass --overwrite or choose another --out")
    check_replaceable(out, inputs)
    if grid is not None and not grid.is_file():
        raise UserError(f"--samples {grid}: no such image")
    folders = [find_stage_folder(p) for p in inputs]
    infos = [stage_info(f) for f in folders]
    pipes = [load_stage(f) for f in folders]
    names = [
        (i or {}).get("stage", {}).get("name") or f.parent.name if f.name == "export" else f.name
        for f, i in zip(folders, infos)
    ]
    if len(set(names)) != len(names):
        raise UserError(f"stage names repeat: {names}")
    settings = [stage_settings(i) for i in infos]
    for name, s in zip(names, settings):
        if name.endswith("1024") or s.max_batch > 8:
            s.max_batch = 1  # whole 1024 px images, one at a time, keep memory bounded
    apply_overrides(names, settings, list(overrides))
    for name, pipe, s in zip(names, pipes, settings):  # the checks cdm-generate applies when reading
        check_settings(name, pipe, s)
    licenses = {(i or {}).get("train", {}).get("license") for i in infos} - {None}
    license = license or (licenses.pop() if len(licenses) == 1 else "apache-2.0")
    single = len(pipes) == 1
    if not single:
        Cascade(names, pipes, settings).with_overrides()  # the chain, the samplers, truncation
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        targets = [tmp] if single else [tmp / name for name in names]
        for folder, target, pipe, s in zip(folders, targets, pipes, settings):
            copy_stage(folder, target, half)
            write_pipeline_file(pipe, target)
            write_sampler(pipe, s, target)
        if not single:
            imagenet = any("imagenet" in str((i or {}).get("data", {})).lower() for i in infos)
            write_cascade_json(tmp, names, settings, {"label_set": "imagenet"} if imagenet else None)
        if grid is not None:  # a card image, not an archive: at most 2048 px on a side
            import PIL.Image

            with PIL.Image.open(grid) as image:
                image.thumbnail((2048, 2048), PIL.Image.LANCZOS)
                image.convert("RGB").save(tmp / "samples.png", optimize=True)
        card = make_card(names, pipes, settings, infos, results, repo, license, has_samples=grid is not None)
        card.save(tmp / "README.md")
        mark_export(tmp, {"written_by": "cdm-export", "inputs": [str(p) for p in inputs]})
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def push_to_hub(folder: Path, repo_id: str, private: bool = False, token: str | None = None, api=None) -> str:
    """Create the repo if needed and upload the folder: safetensors, JSON, the card, images, pipeline files."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        allow_patterns=UPLOAD_PATTERNS,
        ignore_patterns=NEVER_UPLOAD,
        commit_message="Upload cascade with cdm",
    )
    return str(getattr(info, "commit_url", info))


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
    p.add_argument("--samples", type=Path, default=None, help="a sample grid image to show in the card")
    p.add_argument(
        "--license", default=None, help="license id for the card (default: from the training config)"
    )
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
    p.add_argument("--overwrite", action="store_true")
    return p


@cli
def main(argv: list[str] | None = None) -> None:
    from cdm.cards import load_results

    args = build_parser().parse_args(argv)
    repo = args.push_to_hub or (args.out.name if args.out else args.inputs[0].name)
    assembled = (
        len(args.inputs) == 1
        and args.out is None
        and ((args.inputs[0] / "cascade.json").is_file() or (args.inputs[0] / "README.md").is_file())
    )
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
        )
        print(f"wrote {folder}/ ({', '.join(sorted(p.name for p in folder.iterdir()))})")
    if args.push_to_hub:
        url = push_to_hub(folder, args.push_to_hub, args.private, args.token)
        print(f"pushed {folder}/ to {args.push_to_hub}: {url}")


if __name__ == "__main__":
    sys.exit(main())
