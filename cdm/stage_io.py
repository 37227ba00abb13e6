"""The folder formats, in one place: stage folders, cdm_stage.json and cascade.json.

Safetensors and JSON only, never code from the folder.

A saved stage is a diffusers pipeline folder plus a copy of its pipeline file, with
`model_index.json` naming it as `[module, class]`. Plain diffusers can then load it with
`DiffusionPipeline.from_pretrained(folder, ...)` with `trust_remote_code` switched on, an explicit opt-in.
cdm itself never runs that copy: `load_stage` builds each component from stock diffusers
classes and uses the pipeline class installed with cdm.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import diffusers
import torch
from cdm_pipelines import CDMBasePipeline, SR3Pipeline, pipeline_cdm_cascade
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cdm.config import SamplingConfig, sampling_fields
from cdm.errors import UserError
from cdm.models import call_defaults, sampling_scheduler

PIPELINES = {cls.__name__: cls for cls in (CDMBasePipeline, SR3Pipeline)}


def save_stage(pipe, folder: str | Path) -> Path:
    """`save_pretrained` (safetensors) plus the pipeline source, so the folder is Hub-loadable."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    write_pipeline_file(pipe, folder)
    return folder


def write_pipeline_file(pipe, folder: Path) -> None:
    """Put the installed pipeline file beside the weights and name it in model_index.json's `_class_name`."""
    source = Path(inspect.getfile(type(pipe)))
    for stray in folder.glob("*.py"):  # only cdm's own pipeline file travels with the weights
        stray.unlink()
    shutil.copyfile(source, folder / source.name)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = [source.stem, type(pipe).__name__]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def read_model_index(folder: str | Path) -> dict:
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        raise UserError(f"{folder} is not a pipeline folder: expected {path.name} inside it")
    return read_json(path, "a diffusers model_index.json (a JSON object)")


def pipeline_class_name(index: dict) -> str | None:
    """The pipeline class a model_index.json names: `"Name"` or `["module", "Name"]`; None for anything else."""
    name = index.get("_class_name")
    if isinstance(name, list) and len(name) == 2:
        name = name[1]
    return name if isinstance(name, str) else None


def load_stage(folder: str | Path, torch_dtype=torch.float32):
    """Load a stage folder with cdm's own pipeline classes and stock diffusers components.

    Weights stored as fp16 are upcast to `torch_dtype` (fp32 by default, which CPUs need).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist")
    check_links(folder)
    index = read_model_index(folder)
    name = pipeline_class_name(index)
    cls = PIPELINES.get(name)
    if cls is None:
        raise UserError(
            f"{folder}: pipeline class {name!r} is not a cdm stage: expected one of {sorted(PIPELINES)}"
        )
    check_index(folder, index, cls)
    try:
        pipe = cls.from_pretrained(folder, torch_dtype=torch_dtype)
    except LOAD_ERRORS as err:
        # the folder's JSON builds the modules: a value of a wrong kind fails inside diffusers or torch
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{folder}: the stage could not be loaded ({first[:200]})") from None
    check_finite_weights(pipe, folder)
    return pipe


# what building modules from a folder's JSON raises when a value is of a wrong kind (diffusers, torch)
LOAD_ERRORS = (
    SafetensorError,
    OSError,
    RuntimeError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
)


def check_index(folder: Path, index: dict, cls) -> None:
    """model_index.json against the pipeline class: components are `[library, class]` of stock diffusers
    models and schedulers with safetensors weights, settings have their types, none is missing."""
    params = inspect.signature(cls.__init__).parameters
    for key, value in index.items():
        if key.startswith("_") or key not in params or value == [None, None]:  # [null, null]: absent
            continue
        if key in COMPONENTS:
            if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
                raise UserError(
                    f"{folder}/model_index.json: {key}={json.dumps(value)[:60]}: expected [library, class name]"
                )
            _check_component(folder, key, value)
        elif key in SETTING_TYPES:
            kind = SETTING_TYPES[key]
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise UserError(
                    f"{folder}/model_index.json: {key}={json.dumps(value)[:60]}: expected {SETTING_NAMES[key]}"
                )
    missing = [
        p for p in params if p != "self" and params[p].default is inspect.Parameter.empty and p not in index
    ]
    if missing:
        raise UserError(f"{folder}/model_index.json lacks components {missing} for {cls.__name__}")


def check_finite_weights(pipe, folder: Path) -> None:
    """NaN or infinite weights would sample black images without a word: refuse them when loading."""
    for key, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise UserError(
                    f"{folder}/{key}: weight {name} holds NaN or infinite values: the weights are corrupt"
                )


COMPONENTS = ("unet", "scheduler", "image_noising_scheduler", "guide_unet")
SETTING_TYPES = {  # a stage pipeline's stored settings, by type (their ranges are the pipeline's to check)
    "low_res_size": int,
    "id2label": dict,
    "residual": bool,
    "residual_scale": (int, float),
    "noise_at_low_res": bool,
    "call_defaults": dict,
}
SETTING_NAMES = {
    "low_res_size": "an integer",
    "id2label": "an object of class id -> name",
    "residual": "true or false",
    "residual_scale": "a number",
    "noise_at_low_res": "true or false",
    "call_defaults": "an object of call argument -> value",
}


def _check_component(folder: Path, key: str, entry: list) -> str:
    """A component must be a stock diffusers class; a model's folder must hold safetensors weights."""
    library, class_name = entry
    cls = getattr(diffusers, class_name, None) if library == "diffusers" else None
    if cls is None or not (class_name.endswith("Scheduler") or class_name.endswith("Model")):
        raise UserError(f"{folder}/{key}: {class_name!r} is not a diffusers model or scheduler class")
    sub = folder / key
    if not sub.is_dir():
        raise UserError(f"{folder}: component folder {key}/ is missing")
    if class_name.endswith("Model") and not list(sub.glob("*.safetensors")):
        raise UserError(f"{sub}: no .safetensors weights found (cdm never loads pickled weights)")
    if class_name.endswith("Model"):
        check_model_config(sub / "config.json")
    return class_name


MAX_SAMPLE_SIZE = 4096  # pixels on a side: a larger UNet input would not fit any device's memory
MAX_CHANNELS = 8192
MODEL_INTS = {  # a diffusers UNet config's sizes: null where the model has none
    "in_channels": (1, 64),
    "out_channels": (1, 64),
    "layers_per_block": (1, 16),
    "norm_num_groups": (1, 1024),
    "num_class_embeds": (2, 1_000_000),
    "time_cond_proj_dim": (1, 8192),
    "cross_attention_dim": (1, 8192),
}


def check_model_config(path: Path) -> None:
    """Sane bounds before anything is allocated; quantized configs are refused (cdm loads plain safetensors)."""
    config = read_json(path, "the model's config.json (a JSON object)")
    if "quantization_config" in config:
        raise UserError(f"{path}: quantization_config is not supported: cdm loads full-precision safetensors")
    size = config.get("sample_size")
    sizes = size if isinstance(size, list) else [size]
    if not all(s is None or (isinstance(s, int) and 1 <= s <= MAX_SAMPLE_SIZE) for s in sizes):
        raise UserError(f"{path}: sample_size={size}: expected an integer in 1..{MAX_SAMPLE_SIZE}")
    channels = config.get("block_out_channels")
    if not isinstance(channels, list) or not 1 <= len(channels) <= 8:
        raise UserError(f"{path}: block_out_channels={channels!r}: expected a list of 1 to 8 channel counts")
    if not all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= MAX_CHANNELS for c in channels):
        raise UserError(f"{path}: block_out_channels={channels}: expected integers in 1..{MAX_CHANNELS}")
    for key, (lo, hi) in MODEL_INTS.items():  # sizes the constructor allocates from, checked first
        value = config.get(key)
        if value is not None and not (
            isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
        ):
            raise UserError(f"{path}: {key}={json.dumps(value)[:40]}: expected an integer in {lo}..{hi}")


HUB_FILES = ["*.json", "*.safetensors", "*.md", "*.png", "*.py"]  # what a cascade repo holds
STAGE_FILES = ("*.json", "*/*.json", "*/*.safetensors")  # pipeline files: the installed ones


def find_stage_folder(path: Path) -> Path:
    """A training run folder (its export/) or a stage folder itself."""
    if not path.exists():
        raise UserError(f"{path}: no such folder")
    if (path / CASCADE_FILE).is_file():
        raise UserError(f"{path} is a cascade folder: expected a stage folder or a training run")
    if (path / "model_index.json").is_file():
        return path
    if (path / "config.json").is_file() or (path / "checkpoints").is_dir():
        if not (path / "export" / "model_index.json").is_file():
            raise UserError(
                f"{path} is an incomplete run: it has no export/ (train it to train.max_steps first)"
            )
        return path / "export"
    raise UserError(f"{path}: neither a training run nor a pipeline folder (expected model_index.json)")


def read_json(path: Path, what: str = "a JSON object", max_bytes: int = 4 << 20):
    """The one reader of cdm's folder JSON: a regular file inside its folder, small, valid JSON with
    finite numbers, and an object; anything else is one line naming the file and what was expected."""
    if path.is_symlink():
        raise UserError(
            f"{path} is a link: expected a regular file (cdm does not follow links in model folders)"
        )
    if not path.is_file():
        raise UserError(f"{path} is missing: expected {what}")
    if path.stat().st_size > max_bytes:
        raise UserError(f"{path} has {path.stat().st_size} bytes: expected {what} of at most {max_bytes}")

    def no_constant(name):
        raise ValueError(f"{name} is not a finite number")

    def finite(text):
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"{text} is not a finite number")
        return value

    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constant, parse_float=finite)
    except (UnicodeDecodeError, ValueError) as err:
        raise UserError(
            f"{path} is not valid JSON ({str(err).splitlines()[0][:120]}): expected {what}"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}: expected {what}")
    return data


def check_links(folder: Path, max_files: int = 10_000) -> None:
    """Refuse a model folder with links that leave it (or too many files) before anything in it is read."""
    root, count = Path(os.path.realpath(folder)), 0
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            count += 1
            path = Path(dirpath) / name
            if path.is_symlink() and root not in Path(os.path.realpath(path)).parents:
                raise UserError(
                    f"{path} is a link that leaves the folder {folder}: cdm reads only files inside it"
                )
        if count > max_files:
            raise UserError(f"{folder} holds more than {max_files} files: expected a model folder")


def stage_info(folder: Path) -> dict | None:
    """The stage's training record (cdm_stage.json), when it has one."""
    f = folder / STAGE_INFO_FILE
    if not f.exists() and not f.is_symlink():
        return None
    info = read_json(f, "a cdm stage record (a JSON object)")
    for key in ("stage", "unet", "data", "train", "run"):
        if key in info and not isinstance(info[key], (dict, type(None))):
            raise UserError(f"{f}: {key} is a {type(info[key]).__name__}: expected an object")
    return info


def stage_settings(info: dict | None):
    """Sampling defaults recorded at training time (conf stage.sample), or the library defaults."""
    stage = (info or {}).get("stage") if isinstance(info, dict) else None
    sample = stage.get("sample") if isinstance(stage, dict) else None
    return sampling_from_json(sample if isinstance(sample, dict) else {}, STAGE_INFO_FILE + ": stage.sample")


def sampling_from_json(sampling: dict, where: str) -> SamplingConfig:
    """Typed sampling settings from a folder's JSON; `aug_level`, the old name of `noise_level`, is read too."""
    if "aug_level" in sampling and "noise_level" not in sampling:
        sampling = {**sampling, "noise_level": sampling["aug_level"]}
    fields, values = sampling_fields(), {}
    for key, value in sampling.items():
        if key not in fields:
            continue
        kind = fields[key]
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if not ok and not (kind is float and isinstance(value, int) and not isinstance(value, bool)):
            raise UserError(f"{where}: {key}={json.dumps(value)[:80]}: expected a {kind.__name__}")
        values[key] = kind(value)
    return SamplingConfig(**values)


def copy_stage(src: Path, dst: Path, half: bool = False) -> None:
    """Copy only what a stage needs: JSON configs, safetensors weights (fp16 if `half`), the pipeline file."""
    for pattern in STAGE_FILES:
        for f in src.glob(pattern):
            if f.name.startswith("."):  # a marker such as .cdm-export.json speaks for its own folder only
                continue
            if f.is_symlink() or f.parent.is_symlink():
                raise UserError(f"{f} is a link: cdm copies only the regular files of a stage folder")
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            if half and f.suffix == ".safetensors":
                tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(f).items()}
                save_file(tensors, target)
            else:
                shutil.copyfile(f, target)


def write_sampler(pipe, settings, folder: Path) -> None:
    """Store the stage's sampling scheduler as its `scheduler/` and its sampling defaults as the pipeline's
    `call_defaults` in model_index.json, so that plain diffusers samples as cdm does; cdm_stage.json's
    record of them follows."""
    try:
        scheduler = sampling_scheduler(settings.scheduler, pipe.scheduler.config, settings.steps)
    except ValueError as err:
        raise UserError(str(err)) from None
    scheduler.save_pretrained(folder / "scheduler")
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    stored = index.get("call_defaults") if isinstance(index.get("call_defaults"), dict) else {}
    tiles = {k: stored[k] for k in ("tile_size", "tile_overlap") if k in stored}  # the folder's own tuning
    index["call_defaults"] = {
        **call_defaults(settings, pipe.unet.config.sample_size, isinstance(pipe, SR3Pipeline)),
        **tiles,
    }
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    info_path = folder / STAGE_INFO_FILE
    info = stage_info(folder)
    if info is not None and isinstance(info.get("stage"), dict):
        info["stage"]["sample"] = {**(info["stage"].get("sample") or {}), **asdict(settings)}
        info_path.write_text(json.dumps(info, indent=1))


CASCADE_FILE = "cascade.json"


def resolve_model(model: str | Path, revision: str | None = None) -> Path:
    """A local folder, or a Hub repo id fetched with snapshot_download (safetensors and JSON only)."""
    path = Path(model)
    if path.exists():
        return path
    if str(model).count("/") == 1 and not str(model).startswith((".", "/", "~")):
        try:
            return Path(
                snapshot_download(
                    str(model),
                    revision=revision,
                    allow_patterns=HUB_FILES,
                )
            )
        except (RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
            raise UserError(
                f"model {model}: not a local folder, and the Hub repo could not be fetched "
                f"({str(err).splitlines()[0][:160]})"
            ) from None
    raise UserError(f"model {model}: no such folder (expected a cascade folder or a Hub repo id)")


def parse_stage_entry(spec_path: Path, k: int, entry) -> tuple[str, Path, SamplingConfig]:
    """One `stages` entry of cascade.json: a name, a folder inside the cascade, typed sampling settings."""
    where = f"{spec_path}: stages[{k}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise UserError(f'{where} is {json.dumps(entry)[:80]}: expected an object with a "name" string')
    rel = entry.get("path", entry["name"])
    root = spec_path.parent.resolve()
    folder = (root / str(rel)).resolve()
    if not isinstance(rel, str) or Path(rel).is_absolute() or root not in folder.parents:
        raise UserError(f"{where}: path {rel!r} is outside the cascade folder: expected a sub-folder name")
    sampling = entry.get("sampling", {})
    if not isinstance(sampling, dict):
        raise UserError(f"{where}: sampling is {json.dumps(sampling)[:80]}: expected an object")
    return entry["name"], folder, sampling_from_json(sampling, f"{where}: sampling")


def write_cascade_json(
    root: Path, names: list[str], settings: list[SamplingConfig], extra: dict | None = None
):
    """cascade.json: stage order, each stage's folder and sampling defaults."""
    spec = {
        "format": "cdm-cascade",
        "version": 1,
        "stages": [{"name": n, "path": n, "sampling": asdict(s)} for n, s in zip(names, settings)],
        **(extra or {}),
    }
    (Path(root) / CASCADE_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    write_root_pipeline(Path(root), names, settings)


def write_root_pipeline(root: Path, names: list[str], settings: list[SamplingConfig]) -> None:
    """The cascade root as one diffusers pipeline: model_index.json names each stage folder as a component
    (its own pipeline class), and the installed root pipeline file, with this cascade's stage names."""
    source = Path(inspect.getfile(pipeline_cdm_cascade)).read_text()
    line = next(x for x in source.splitlines() if x.startswith("STAGES = "))
    stages = f"STAGES = {tuple(names)!r}"
    (root / "pipeline_cdm_cascade.py").write_text(
        source.replace(line, stages + "  # this cascade's stages", 1)
    )
    index = {
        "_class_name": ["pipeline_cdm_cascade", "CDMCascadePipeline"],
        "_diffusers_version": diffusers.__version__,
        **{n: read_model_index(root / n)["_class_name"] for n in names},
        "settings": {n: asdict(s) for n, s in zip(names, settings)},
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


STAGE_INFO_FILE = "cdm_stage.json"


def export_stage(pipe, folder: Path, info: dict) -> None:
    """Write a trained stage folder with its training record, atomically (a temporary name, then rename)."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_stage(pipe, tmp)
    (tmp / STAGE_INFO_FILE).write_text(json.dumps(info, indent=1))
    write_sampler(pipe, stage_settings(info), tmp)  # the folder samples as its config's stage.sample says
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
