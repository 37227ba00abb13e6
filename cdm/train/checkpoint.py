"""Checkpoints as safetensors + JSON, written atomically and rotated.

accelerate's `save_state` pickles the optimizer, scheduler and RNG states; these files hold the
same information without pickle. No RNG state is needed: every random draw in training is a
function of (seed, step, rank), so the step count alone restores the data position and noise.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cdm.errors import UserError

PREFIX = "checkpoint-"


def optimizer_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and the rest (for JSON)."""
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    folder: Path, step: int, model, ema, optimizer, lr_scheduler, extra: dict, keep: int
) -> Path:
    """Write checkpoint-{step} under a temporary name, rename it into place, then drop old ones."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:07d}"
    tmp = folder / f".tmp-{PREFIX}{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors"
    )
    ema_state = ema.state_dict()
    save_file(
        {f"{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema_state.pop("shadow_params"))},
        tmp / "ema.safetensors",
    )
    tensors, meta = optimizer_to_flat(optimizer.state_dict())
    save_file(tensors, tmp / "optimizer.safetensors")
    trainer = {
        "step": step,
        "ema": ema_state,
        "optimizer": meta,
        "lr_scheduler": lr_scheduler.state_dict(),
        **extra,
    }
    (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
    for f in tmp.iterdir():  # the data must be on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are ignored)."""
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit() and (p / "trainer.json").is_file()
    ]  # other names (checkpoint-0000004.bak, a copy) are not checkpoints
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be read (truncated, not safetensors, not JSON)."""


def load_checkpoint(path: Path, model, ema, optimizer, lr_scheduler) -> dict:
    """Restore the states saved by `save_checkpoint`; returns trainer.json.

    Raises CorruptCheckpoint naming the unreadable file, and UserError when the tensors do not fit the
    model (a checkpoint of another model configuration).
    """
    from safetensors import SafetensorError

    def read(name):
        try:
            return json.loads((path / name).read_text()) if name.endswith(".json") else load_file(path / name)
        except (SafetensorError, OSError, ValueError) as err:
            raise CorruptCheckpoint(f"{path / name} ({str(err).splitlines()[0][:120]})") from None

    trainer = read("trainer.json")
    model_state, shadow, optim = (
        read("model.safetensors"),
        read("ema.safetensors"),
        read("optimizer.safetensors"),
    )
    try:
        model.load_state_dict(model_state)
        ema.load_state_dict({**trainer["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
        optimizer.load_state_dict(optimizer_from_flat(optim, trainer["optimizer"]))
        lr_scheduler.load_state_dict(trainer["lr_scheduler"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise UserError(
            f"{path} was made with a different model configuration than this run's "
            f"({type(err).__name__}: {str(err).splitlines()[0][:100]}): resume with the run's own settings"
        ) from None
    return trainer


def load_latest(candidates: list[Path], model, ema, optimizer, lr_scheduler) -> dict:
    """Load the newest readable checkpoint of `candidates` (oldest first), saying which ones were skipped."""
    import sys

    for path in reversed(candidates):
        try:
            return load_checkpoint(path, model, ema, optimizer, lr_scheduler)
        except CorruptCheckpoint as err:
            if len(candidates) == 1:
                raise UserError(f"checkpoint file {err} is unreadable") from None
            print(f"warning: checkpoint file {err} is unreadable; trying the one before", file=sys.stderr)
    raise UserError(f"no readable checkpoint among {', '.join(p.name for p in candidates)}: start a new run")
