"""Run CDM's claims in miniature on the shipped demo cascade and rewrite docs/experiments.md.

python -m cdm.cli.experiments                 # every missing point, then the report (make experiments)
python -m cdm.cli.experiments guidance        # one experiment
python -m cdm.cli.experiments sampler --stored   # the sampler budget from its stored points alone
"""

from __future__ import annotations

from cdm.cli.arguments import OneLineParser
from cdm.errors import cli
from cdm.experiments.suite import EXPERIMENTS, run


@cli
def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(prog="python -m cdm.cli.experiments", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"experiments to run, of {', '.join(EXPERIMENTS)} (default: all)")
    p.add_argument(
        "--stored",
        action="store_true",
        help="sampler only: report the stages whose points are all stored, measuring nothing",
    )
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in EXPERIMENTS]
    if unknown:
        p.error(f"unknown experiment {unknown[0]!r}: expected one of {', '.join(EXPERIMENTS)}")
    if args.stored and args.names != ["sampler"]:
        p.error("--stored reports the sampler budget alone: expected `sampler --stored`")
    print(f"wrote {run(args.names, args.stored)}")


if __name__ == "__main__":
    main()
