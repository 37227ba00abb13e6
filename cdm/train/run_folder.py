"""A training run's folder: where a launch may start or resume, one writer at a time, and when it is done.

A new run goes only into a new or empty folder; `train.resume=latest` continues the newest readable
checkpoint when only the settings in `RESUMABLE` changed; a lock names the process that holds the folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cdm.errors import UserError
from cdm.train.checkpoint import list_checkpoints

LAUNCH_FILES = {".hydra", ".lock", "train.log"}  # what a launch writes before it knows it may run


# settings a resumed run may change: when it stops, how often it logs, samples and saves
RESUMABLE = (
    "train.max_steps",
    "train.stop_after",
    "train.resume",
    "train.log_every",
    "train.sample_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.num_samples",
    "train.tracker",
    "train.output_dir",
    "data.num_workers",
)


def flat_config(tree: dict, prefix: str = "") -> dict:
    """A nested config as one level of dotted keys (`train.seed`), as Hydra overrides name them."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(run_dir: Path, cfg: DictConfig) -> None:
    """A resumed run continues the same run: a changed seed, batch size, learning rate or model is refused
    with the keys that differ; steps, logging and checkpoint settings may change."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    try:
        before = flat_config(json.loads(path.read_text()))
    except (OSError, ValueError):
        raise UserError(f"{path} is not readable JSON: the run's config is needed to resume it") from None
    now = flat_config(OmegaConf.to_container(cfg, enum_to_str=True))
    changed = sorted(
        k for k in set(before) | set(now) if before.get(k) != now.get(k) and not k.startswith(RESUMABLE)
    )
    if changed:
        shown = ", ".join(f"{k}={before.get(k)!r} -> {now.get(k)!r}" for k in changed[:3])
        raise UserError(
            f"train.resume=latest: the run was started with other settings ({shown}"
            f"{', ...' if len(changed) > 3 else ''}); only {', '.join(RESUMABLE[:2])} and the logging and "
            "checkpoint settings may change; start a new run in another train.output_dir"
        )


def resolve_run_dir(cfg: DictConfig, locked: bool = True) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from; never reuse a finished or running folder silently."""
    run_dir = Path(cfg.train.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    resume = cfg.train.resume
    if resume is None:
        if list_checkpoints(ckpt_dir) or (run_dir / "export").exists():
            raise UserError(
                f"train.output_dir={run_dir} already holds a run: pass train.resume=latest to continue it, "
                "or choose another train.output_dir"
            )
        foreign = (
            sorted(p.name for p in run_dir.iterdir() if p.name not in LAUNCH_FILES)
            if run_dir.is_dir()
            else []
        )
        if foreign and (run_dir / ".lock").is_file() and (run_dir / "config.yaml").is_file():
            if not locked:  # it may be running: taking the lock tells, with the holder's PID
                return run_dir, None
            raise UserError(  # a run another launch started (lock_run names its PID while it runs)
                f"train.output_dir={run_dir} holds a run that has no checkpoint yet: pass train.resume=latest "
                "once it has one, or choose another train.output_dir"
            )
        if foreign:
            raise UserError(
                f"train.output_dir={run_dir} holds {foreign[0]!r} and is not a cdm run: a new run starts in a new "
                "or empty folder, and nothing there was changed; choose another train.output_dir"
            )
        return run_dir, None
    if resume == "latest":
        found = list_checkpoints(ckpt_dir)
        if not found:
            raise UserError(f"train.resume=latest: no checkpoint in {ckpt_dir}")
        check_resumable(run_dir, cfg)
        return run_dir, found[-1]
    path = Path(resume)
    if not (path / "trainer.json").is_file():
        raise UserError(f"train.resume={resume}: not a checkpoint folder (expected trainer.json inside)")
    return run_dir, path


def lock_run(run_dir: Path):
    """An exclusive lock on the run folder (fcntl.flock); a second writer stops with the holder's PID."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a+")  # noqa: SIM115 - held for the life of the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UserError(
            f"train.output_dir={run_dir} is in use by another cdm-train (PID {holder}): "
            "wait for it to finish or choose another train.output_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def finished(checkpoint: Path, max_steps: int, run_dir: Path) -> bool:
    """The checkpoint is the run's last step and the export exists: resuming would only rewrite records."""
    try:
        step = json.loads((checkpoint / "trainer.json").read_text()).get("step", 0)
    except (OSError, ValueError):
        return False  # unreadable: the loader falls back to an earlier checkpoint and says so
    return step >= max_steps and (run_dir / "export" / "model_index.json").is_file()
