"""Command-line pieces that several commands share (the commands never import each other)."""

from __future__ import annotations

import argparse

from cdm.devices import PRECISIONS, Speed


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (exit code 2, as for every other bad input)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


def add_detail_arguments(parser) -> None:
    """The sharp end's settings: autoguidance, and the input contrast below which detail fades out."""
    parser.add_argument(
        "--autoguidance",
        type=float,
        metavar="W",
        help="for a stage that carries a guide UNet: extrapolate each step away from the guide's prediction "
        "by W > 1, for more detail (default: the stage's setting, 1: the UNet alone)",
    )
    parser.add_argument(
        "--detail-threshold",
        type=float,
        metavar="C",
        help="where the input's local contrast is below C (0..1; 0.04 for the photo stage's sharp end), fade the sample's detail to "
        "the one-step estimate, so flat regions get no invented texture (default: the stage's setting, "
        "0: off)",
    )


def add_speed_arguments(parser) -> None:
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto (default): bf16 autocast where the device has bf16 units (AMX or AVX512-BF16 CPUs, "
        "recent GPUs), fp32 elsewhere",
    )
    parser.add_argument(
        "--exact",
        action="store_true",
        help="fp32 in the default memory layout: the pixels plain diffusers makes from the same folder "
        "(the default uses channels-last on a CPU, which rounds about 0.3%% of pixels differently by 1/255)",
    )


def speed_from(args, device) -> Speed:
    return Speed.resolve(args.precision, device, exact=args.exact)
