"""``napari-xt bench [scaling|store|context]``: CPU benchmarks, each against a baseline measured in
the same run.

- scaling (default): seconds per megapixel and peak RSS against image size, each size in its
  own subprocess, with ratios against the smallest size and against a naive whole-image
  forward of the same model (`napari_xt.bench.scaling`);
- store: how much of a run is the engine and its result store rather than the model: a run
  into a store, in memory, the model's own compute, and the engine with the model's stages
  replaced by cached tensors (`napari_xt.bench.store`);
- context: how far context reaches: the region-only, crop and whole-image models on held-out
  synthetic scenes of growing size, with accuracy on water whose class is set far away
  (`napari_xt.bench.context`).
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="CPU benchmarks of the engine and its store",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    from napari_xt.bench.scaling import add_arguments

    suites = p.add_subparsers(dest="suite")
    scaling = suites.add_parser("scaling", help="time and memory against image size")
    add_arguments(scaling)
    store = suites.add_parser("store", help="the engine and store's own share of a run")
    from napari_xt.bench.store import add_arguments as store_arguments

    store_arguments(store)
    context = suites.add_parser("context", help="accuracy against scene size, per context "
                                "mode (region-only, crop, whole image)")
    from napari_xt.bench.context import add_arguments as context_arguments

    context_arguments(context)
    add_arguments(p)
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    if args.suite == "context":
        from napari_xt.bench.context import run_benchmark as context_benchmark

        return context_benchmark(args)
    if args.suite == "store":
        from napari_xt.bench.store import run_benchmark as store_benchmark

        return store_benchmark(args)
    from napari_xt.bench.scaling import run_benchmark

    return run_benchmark(args)
