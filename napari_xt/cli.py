"""Command line: ``napari-xt predict | sieve | convert | train | export-pairs | inspect | bench |
demo``.

Each subcommand lives in its own module under :mod:`napari_xt.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int`` as the
handler. This file only dispatches, so ``napari-xt --help`` stays fast: heavy imports
(torch, napari) happen inside the handlers.

Exit codes: 0 success, 1 failure of the work itself, 2 bad usage or bad input,
130 cancelled by the user (Ctrl-C; finished work is kept and a rerun resumes).

Bad input is refused before anything is written, with one line on stderr and no traceback
(`bad_input_line`): whatever a subcommand raises of the package's bad-input errors (an
unreadable or unfitting checkpoint, an image that cannot be read as asked, options the engine
refuses, an output store or cache it must not touch, ...) ends there with exit code 2, its
remedy worded for the command line. Anything else is a failure of the work (exit 1, with
its traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("predict", "sieve", "convert", "train", "export_pairs", "inspect", "bench",
               "demo")  # modules

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


# (module, error type): the package's errors that mean bad input (a module that was never
# imported cannot have raised its error)
BAD_INPUT = (
    ("napari_xt.io.errors", "ImageIOError"),
    ("napari_xt.model.checkpoint", "CheckpointError"),
    ("napari_xt.engine.run", "EngineInputError"),
    ("napari_xt.engine.cache", "CacheMismatchError"),
    ("napari_xt.engine.store.spec", "StoreError"),
    ("napari_xt.train.from_corrections", "ExportError"),
    ("napari_xt.inspect.stored", "InspectError"),
)


def is_bad_input(err: BaseException) -> bool:
    types = tuple(getattr(sys.modules[m], name) for m, name in BAD_INPUT if m in sys.modules)
    return isinstance(err, types)


def bad_input_line(command: str, err: BaseException) -> str:
    """`napari-xt COMMAND: message` on one line, the remedy in command-line words."""
    from napari_xt.engine.spelling import CLI, spell_error

    return f"napari-xt {command}: " + " ".join(spell_error(err, CLI).split())


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
    except Exception as err:
        if not is_bad_input(err):
            raise
        print(bad_input_line(args.command, err), file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
