"""Saving and loading stage folders: safetensors + JSON, never code from the folder.

A saved stage is a diffusers pipeline folder plus a copy of its pipeline file, with
`model_index.json` naming it as `[module, class]`. Plain diffusers can then load it with
`DiffusionPipeline.from_pretrained(folder, ...)` with `trust_remote_code` switched on, an explicit opt-in.
cdm itself never runs that copy: `load_stage` builds each component from stock diffusers
classes and uses the pipeline class installed with cdm.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import diffusers
import torch
from cdm_pipelines import CDMBasePipeline, SR3Pipeline
from safetensors import SafetensorError

from cdm.errors import UserError

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
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None


def pipeline_class_name(index: dict) -> str:
    name = index.get("_class_name")
    return name[1] if isinstance(name, list) else name


def load_stage(folder: str | Path, torch_dtype=torch.float32):
    """Load a stage folder with cdm's own pipeline classes and stock diffusers components.

    Weights stored as fp16 are upcast to `torch_dtype` (fp32 by default, which CPUs need).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist")
    index = read_model_index(folder)
    name = pipeline_class_name(index)
    cls = PIPELINES.get(name)
    if cls is None:
        raise UserError(
            f"{folder}: pipeline class {name!r} is not a cdm stage: expected one of {sorted(PIPELINES)}"
        )
    params = inspect.signature(cls.__init__).parameters
    components = {}
    for key, value in index.items():
        if not key.startswith("_") and key in params and isinstance(value, list) and len(value) == 2:
            components[key] = _check_component(folder, key, value)
    missing = [
        p for p in params if p != "self" and params[p].default is inspect.Parameter.empty and p not in index
    ]
    if missing:
        raise UserError(f"{folder}/model_index.json lacks components {missing} for {name}")
    try:
        return cls.from_pretrained(folder, torch_dtype=torch_dtype)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{folder}: the stage could not be loaded ({first[:200]})") from None


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
    return class_name
