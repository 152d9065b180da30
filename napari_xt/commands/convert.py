"""``napari-xt convert IN OUT.zarr``: any supported image -> OME-Zarr 0.5 with a 2x pyramid.

Streams block by block with bounded memory; the store is written under a temporary name and
renamed when complete, so an interrupted conversion leaves nothing at OUT.
"""

from __future__ import annotations

import argparse
import sys
import time

from napari_xt.commands.inputs import add_image_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert an image (OME-Zarr, TIFF/SVS/NDPI, zarr, npy) to an OME-Zarr 0.5 pyramid",
        description=__doc__,
    )
    p.add_argument("src", help="input image: file, zarr directory or URL")
    p.add_argument("dst", help="output OME-Zarr store (a directory ending in .zarr)")
    p.add_argument("--level", type=int, default=None, help="source level to convert from")
    add_image_options(p)
    p.add_argument("--chunk", type=int, default=1024, help="chunk edge in pixels (256-4096)")
    p.add_argument("--method", choices=("mean", "nearest", "mode"), default="mean",
                   help="downsampling for the pyramid (mode for label images)")
    p.add_argument("--compressor", choices=("zstd", "blosc"), default="zstd")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_xt.cli import bad_input_line
    from napari_xt.commands.inputs import image_request
    from napari_xt.io import ImageIOError, iter_convert

    start = time.perf_counter()
    last = 0.0
    request = image_request(args.src, args)
    shown = False  # a progress bar is on the line
    try:
        for event in iter_convert(
            args.src, args.dst, level=args.level, series=request.series,
            plane=dict(request.plane) if request.plane else None, axes=request.axes,
            chunk=args.chunk, method=args.method, compressor=args.compressor,
            overwrite=args.overwrite,
        ):
            now = time.perf_counter()
            if not args.quiet and (now - last > 0.2 or event.done == event.total):
                last, shown = now, True
                bar = "#" * int(30 * event.fraction)
                print(f"\r[{bar:<30}] {event.done}/{event.total} blocks, level "
                      f"{event.level + 1}/{event.num_levels}", end="", file=sys.stderr)
    except ImageIOError as err:
        print(("\n" if shown else "") + bad_input_line("convert", err), file=sys.stderr)
        return 2
    if shown:
        print(file=sys.stderr)
    print(f"wrote {args.dst} in {time.perf_counter() - start:.1f} s")
    return 0
