"""Command line: ``napari-xt predict | convert | train | export-pairs | bench | demo``.

Each subcommand lives in its own module under :mod:`napari_xt.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int`` as the
handler. This file only dispatches, so ``napari-xt --help`` stays fast: heavy imports
(torch, napari) happen inside the handlers.

Exit codes: 0 success, 1 failure of the work itself, 2 bad usage or bad input,
130 cancelled by the user (Ctrl-C; finished work is kept and a rerun resumes).
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("predict", "convert", "train", "export_pairs", "bench", "demo")  # modules

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 130


def build_parser() -> argparse.ArgumentParser:
    from napari_xt import __version__

    parser = argparse.ArgumentParser(
        prog="napari-xt",
        description="xT nested tokenization for extremely large images.",
    )
    parser.add_argument("--version", action="version", version=f"napari-xt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"napari_xt.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("cancelled; finished work is kept, run the same command again to resume",
              file=sys.stderr)
        return EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
