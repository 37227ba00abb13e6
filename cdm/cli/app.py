"""cdm-app: a browser app to generate through a cascade, stage by stage, and to upscale photos."""

from __future__ import annotations

import argparse
import sys

from cdm.errors import UserError, cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cdm-app", description=__doc__)
    p.add_argument("--model", help="cascade folder or Hub repo id (default: the shipped demo cascade)")
    p.add_argument("--sr-model", help="SR stage for the Upscale tab (default: the shipped photo stage)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--concurrency", type=int, default=1, help="requests run at once; others wait in a queue")
    p.add_argument("--share", action="store_true", help="ask Gradio for a public link")
    return p


@cli
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port={args.port}: expected 1..65535")
    if args.concurrency < 1:
        raise UserError(f"--concurrency={args.concurrency}: expected an integer >= 1")
    try:
        from cdm.app import build_app
    except ImportError as err:
        raise UserError(
            f"cdm-app needs Gradio ({err.name} is missing): pip install 'cdm-diffusion[app]'"
        ) from None
    demo = build_app(args.model, args.sr_model)
    demo.queue(default_concurrency_limit=args.concurrency)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    sys.exit(main())
