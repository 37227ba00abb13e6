"""User-facing errors: one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import errno
import functools
import os
import sys

# faults of the machine that a user fixes (space, permissions), reported in one line like bad input
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class UserError(ValueError):
    """Bad input from the user: a path, a value, a file. The message names it and what was expected."""


def cli(fn):
    """Run a console entry point; bad input exits 2 with one line (CDM_DEBUG=1 shows the traceback).

    Only `UserError` is bad input, and a full disk or a refused permission (`DISK_ERRORS`) is told the
    same way. Any other exception is a bug and keeps its traceback: code that passes a user's value on
    converts the library's ValueError where it calls it.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            if os.environ.get("CDM_DEBUG"):
                raise
            message = " ".join(str(err).split()) or type(err).__name__
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
        except OSError as err:
            if err.errno not in DISK_ERRORS or os.environ.get("CDM_DEBUG"):
                raise
            where = f"{err.filename}: " if err.filename else ""
            print(f"error: {where}{err.strerror or err}: nothing more was written", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper


def flag_error(err: ValueError, flags: dict[str, str]) -> UserError:
    """A library rule's one line (`noise_level=5000: expected ...`) in the words of the command line that
    passed the value (`--noise-level=5000: expected ...`)."""
    message = str(err)
    for name, flag in flags.items():
        if message.startswith(f"{name}="):
            return UserError(flag + message[len(name) :])
    return UserError(message)


def one_line(err: Exception) -> str:
    """Hydra and OmegaConf errors span lines and chained causes; keep the informative lines."""
    skip = (
        "full_key:",
        "object_type",
        "reference_type",
        "Set the environment",
        "Use --",
        "Available options",
        "To append to your config",
    )
    lines = []
    while err is not None:
        lines += [
            ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.strip().startswith(skip)
        ]
        err = err.__cause__
    return ": ".join(dict.fromkeys(lines))
