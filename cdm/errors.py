"""User-facing errors: one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import argparse
import functools
import os
import sys


class UserError(ValueError):
    """Bad input from the user: a path, a value, a file. The message names it and what was expected."""


def cli(fn):
    """Run a console entry point; bad input exits 2 with one line (CDM_DEBUG=1 shows the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, ValueError, FileNotFoundError, FileExistsError) as err:
            if os.environ.get("CDM_DEBUG"):
                raise
            message = " ".join(str(err).split()) or type(err).__name__
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (exit code 2, as for every other bad input)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")
