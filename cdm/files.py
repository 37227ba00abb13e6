"""Writing outputs without losing anything: no silent replacement, no deletion of what cdm did not write."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from cdm.errors import UserError

EXPORT_MARKER = ".cdm-export.json"  # written into every folder cdm-export creates


MANIFEST = ".cdm-outputs.json"  # the files cdm wrote into an output folder, with their checksums
LOCK = ".cdm-lock"  # held by the one cdm process writing into the folder


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = current_umask()  # read once: os.umask is process-wide, and files are written from worker threads


class OutputFolder:
    """The one way a command writes its files: each inside `root`, planned and checked before any work,
    written atomically with the user's umask, under a lock, and recorded in a manifest.

    - `plan(paths)` refuses a path outside the folder, a path that is an input, a folder, two outputs
      with one name, and an existing file, unless `overwrite` is set and cdm wrote that very file
      there (the manifest holds its checksum): a file cdm did not write is never replaced.
    - A second process writing to the same folder stops with one line naming the first one's PID.
    - If the command fails, the files this run created are removed again; nothing else is touched.
    """

    def __init__(self, root: Path, overwrite: bool, flag: str = "--out", inputs=(), lock: bool = True):
        self.root, self.overwrite, self.flag, self.lock = Path(root), overwrite, flag, lock
        self.inputs = {Path(os.path.realpath(p)) for p in inputs}
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"{flag} {self.root} is a file: expected a folder (existing or new)")
        if not str(self.root).strip():
            raise UserError(f"{flag} is empty: expected a folder")
        self.created: list[Path] = []
        self.manifest = self.read_manifest()
        self.locked = self.made_root = False

    def read_manifest(self) -> dict:
        try:
            data = json.loads((self.root / MANIFEST).read_text())
            files = data.get("files") if isinstance(data, dict) else None
            return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}
        except (OSError, ValueError):
            return {}

    def relative(self, path: Path) -> str:
        """`path` as a name inside the folder; anything that leaves it (.., an absolute path, a link) is refused."""
        root = Path(os.path.realpath(self.root))
        target = Path(os.path.realpath(self.root / path if not Path(path).is_absolute() else path))
        if target == root or root not in target.parents:
            raise UserError(f"{path}: outside the output folder {self.root}: expected a file inside it")
        return target.relative_to(root).as_posix()

    def written_by_cdm(self, path: Path) -> bool:
        name = self.relative(path)
        return name in self.manifest and path.is_file() and file_digest(path) == self.manifest[name]

    def plan(self, paths: Iterable[Path]) -> list[Path]:
        """Check every output before any work (see the class docstring); returns the paths."""
        paths, seen = [Path(p) for p in paths], set()
        for p in paths:
            name = self.relative(p)
            if name in seen:
                raise UserError(
                    f"{p}: two inputs would write the same output file; rename one or use another {self.flag}"
                )
            seen.add(name)
            if Path(os.path.realpath(p)) in self.inputs:
                raise UserError(
                    f"{p} is one of the inputs: cdm never writes over its inputs; use another {self.flag}"
                )
            if p.is_dir() or p.is_symlink():
                raise UserError(f"{p} is a folder or a link: expected a new file path")
            if p.exists() and not self.overwrite:
                raise UserError(f"{p} already exists: pass --overwrite or choose another {self.flag}")
            if p.exists() and not self.written_by_cdm(p):
                raise UserError(
                    f"{p} exists and was not written by cdm: nothing was replaced; choose another {self.flag}"
                )
        return paths

    def __enter__(self) -> OutputFolder:
        self.made_root = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        if self.lock:
            self.take_lock()
        return self

    def take_lock(self) -> None:
        path = self.root / LOCK
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid == os.getpid():  # this process already writes here (a second output of one command)
                    return
                if pid and process_alive(pid):
                    raise UserError(
                        f"{self.flag} {self.root} is being written by another cdm process (PID {pid}): "
                        "wait for it to finish or choose another folder"
                    ) from None
                path.unlink(missing_ok=True)  # left by a process that no longer runs
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.locked = True
            return

    def write(self, path: Path, save: Callable[[Path], None]) -> Path:
        """Write through `save(tmp)` to a temporary name in the folder, then move into place in one step."""
        path = Path(path)
        name = self.relative(path)
        existed = path.exists()
        if existed and not (self.overwrite and self.written_by_cdm(path)):
            raise UserError(f"{path} already exists (written by another run): nothing was replaced")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, save, replace=existed)
        if not existed:
            self.created.append(path)
        self.manifest[name] = file_digest(path)
        return path

    def adopt(self, paths: Iterable[Path]) -> None:
        """Record files of this run that other processes wrote (data-parallel sampling)."""
        for path in paths:
            if Path(path).is_file():
                self.manifest[self.relative(path)] = file_digest(path)

    def __exit__(self, kind, error, trace) -> None:
        try:
            if kind is not None:  # the run failed: take back what it created, and only that
                for path in self.created:
                    path.unlink(missing_ok=True)
                    self.manifest.pop(self.relative(path), None)
            if self.lock and self.manifest != self.read_manifest():
                text = json.dumps({"written_by": "cdm", "files": self.manifest}, indent=1) + "\n"
                atomic_write(self.root / MANIFEST, lambda tmp: tmp.write_text(text))
        finally:
            if self.locked:
                (self.root / LOCK).unlink(missing_ok=True)
                self.locked = False
            if self.made_root and kind is not None:
                try:
                    self.root.rmdir()  # this run made the folder, and left nothing in it
                except OSError:
                    pass


def atomic_write(path: Path, save: Callable[[Path], None], replace: bool = True) -> None:
    """Write through `save(tmp)` to a temporary name beside `path`, then move it into place in one step,
    readable as the user's umask says (a temporary file is private). Used directly only for a file the
    user asked cdm to update (a cascade's defaults); outputs go through `OutputFolder`. With `replace`
    false the file must still be new when it is moved into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        try:
            save(Path(tmp))
        except OSError as err:  # name the file the user asked for, not its temporary name
            raise OSError(err.errno, err.strerror, str(path)) from err
        os.chmod(tmp, 0o666 & ~UMASK)
        if replace:
            os.replace(tmp, path)
        else:  # claim the new name with a hard link: it fails if another process created it meanwhile
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise UserError(
                    f"{path} already exists (written by another run): nothing was replaced"
                ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_file(path: Path, save: Callable[[Path], None], overwrite: bool) -> Path:
    """One file through an `OutputFolder` of its parent folder."""
    path = Path(path)
    with OutputFolder(path.parent, overwrite, flag=str(path.parent)) as out:
        out.plan([path])
        return out.write(path, save)


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


def staging_folder(out: Path) -> Path:
    """A new temporary folder beside `out`, readable as the user's umask says (not mkdtemp's private mode),
    to be moved into place by `replace_folder` once complete."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o777 & ~UMASK)
    return tmp


def replace_folder(tmp: Path, out: Path) -> None:
    """Move a completed folder into place; an older export at `out` is removed only after the check above,
    through a fresh temporary name of its own (never a name that may already hold someone's folder)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
        os.rmdir(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
