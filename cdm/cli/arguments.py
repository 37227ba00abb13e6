"""Command-line pieces that several commands share (the commands never import each other)."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (exit code 2, as for every other bad input)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


def add_autoguidance_argument(parser) -> None:
    parser.add_argument(
        "--autoguidance",
        type=float,
        metavar="W",
        help="for a stage that carries a guide UNet: extrapolate each step away from the guide's prediction "
        "by W > 1, for more detail (default: the stage's setting, 1: the UNet alone)",
    )
