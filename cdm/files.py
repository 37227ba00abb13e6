"""Writing outputs without losing anything: no silent replacement, no deletion of what cdm did not write."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from cdm.errors import UserError

EXPORT_MARKER = ".cdm-export.json"  # written into every folder cdm-export creates


def check_new(paths: Iterable[Path], overwrite: bool) -> None:
    """Refuse, before any work, outputs that exist (unless `overwrite`) or that two inputs would share."""
    paths = list(paths)
    seen: dict[Path, int] = {}
    for p in paths:
        key = Path(os.path.abspath(p))
        if key in seen:
            raise UserError(
                f"{p}: two inputs would write the same output file; rename one or use another --out"
            )
        seen[key] = 1
        if p.is_dir():
            raise UserError(f"{p} is a folder: expected a file path")
        if p.exists() and not overwrite:
            raise UserError(f"{p} already exists: pass --overwrite or choose another --out")


def write_file(path: Path, save: Callable[[Path], None], overwrite: bool) -> Path:
    """Write through `save(tmp)` to a temporary name, then move into place in one step.

    Without `overwrite` the final name is claimed with a hard link, which fails if another process
    created it meanwhile: two runs on one folder can never silently replace each other's files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        try:
            save(Path(tmp))
        except OSError as err:  # name the file the user asked for, not its temporary name
            raise OSError(err.errno, err.strerror, str(path)) from err
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise UserError(
                    f"{path} already exists (written by another run): nothing was replaced"
                ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def is_within(child: Path, parent: Path) -> bool:
    child, parent = Path(os.path.realpath(child)), Path(os.path.realpath(parent))
    return child == parent or parent in child.parents


def check_replaceable(out: Path, inputs: Iterable[Path]) -> None:
    """A folder may be replaced only if cdm-export wrote it and it holds none of the inputs."""
    for src in inputs:
        if is_within(src, out):
            raise UserError(f"--out {out} holds the input {src}: choose an output folder outside the inputs")
        if is_within(out, src):
            raise UserError(
                f"--out {out} is inside the input {src}: choose an output folder outside the inputs"
            )
    if out.exists() and not (out / EXPORT_MARKER).is_file():
        raise UserError(
            f"--out {out} exists and was not written by cdm-export (no {EXPORT_MARKER}): "
            "nothing was replaced; choose another --out"
        )


def mark_export(folder: Path, info: dict) -> None:
    (folder / EXPORT_MARKER).write_text(json.dumps(info, indent=1) + "\n")


def replace_folder(tmp: Path, out: Path) -> None:
    """Move a completed folder into place; an older export at `out` is removed only after the check above."""
    if out.exists():
        old = out.with_name(f".{out.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """The output folder may exist, but not as a file."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file: expected a folder (existing or new)")
