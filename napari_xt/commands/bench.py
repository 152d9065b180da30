"""``napari-xt bench``: the engine's CPU benchmark (seconds per megapixel, peak RSS).

Runs each image size in its own subprocess on a lazily generated synthetic slide and prints
ratios against the smallest size and against a naive whole-image forward of the same model
(at sizes up to --naive-max). See `napari_xt.engine.benchmark`.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="CPU benchmark of the streaming engine",
                              description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run_command)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """Options shared by `napari-xt bench` and `benchmarks/cpu_engine.py`."""
    ap.add_argument("--sizes", default="4096,8192")
    ap.add_argument("--naive-max", type=int, default=4096)
    ap.add_argument("--model", default="xt_tiny_demo_seg")
    ap.add_argument("--decoder", default="32,16,16,8,8",
                    help="decoder widths, deepest first ('' keeps the zoo default)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--timeout", type=int, default=6 * 3600)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)


def run_command(args: argparse.Namespace) -> int:
    from napari_xt.engine.benchmark import run_benchmark

    return run_benchmark(args)
