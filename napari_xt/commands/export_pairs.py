"""``napari-xt export-pairs STORE IMAGE --out DIR``: training pairs from saved corrections.

Every group of corrected windows in STORE (`labels/<name>-corrected`, made with the Correct
results widget or `napari_xt.io.corrections`) becomes one training pair store in DIR: the
image around the windows (plus `--margin` pixels of context), the corrected labels inside
the windows (255 = ignored elsewhere) and the corrected detections inside them. IMAGE is the
image the run read; it is checked against the run's recorded fingerprint. Fine-tune with
`napari-xt train` and `model: {checkpoint: ...}` (see docs/training.md).
"""

from __future__ import annotations

import argparse
import sys

from napari_xt.commands.inputs import add_image_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-pairs",
        help="turn saved corrections into training pairs for fine-tuning",
        description=__doc__,
    )
    p.add_argument("store", help="result store holding the corrections")
    p.add_argument("image", help="the image the run was made on")
    p.add_argument("--out", required=True, help="folder for the pair stores (*.zarr)")
    p.add_argument("--name", default="prediction", help="the corrected label result")
    p.add_argument("--margin", type=int, default=256,
                   help="pixels of context around the corrected windows (default 256)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the pairs exported earlier from this store")
    add_image_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_xt.cli import EXIT_OK, EXIT_USAGE, bad_input_line
    from napari_xt.commands.inputs import image_request
    from napari_xt.io import ImageIOError
    from napari_xt.train.from_corrections import ExportError, export_pairs

    if args.margin < 0:
        print("napari-xt export-pairs: --margin must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    try:
        pairs = export_pairs(args.store, image_request(args.image, args), args.out,
                             name=args.name, margin=args.margin, overwrite=args.overwrite)
    except (ExportError, ImageIOError, FileNotFoundError) as err:
        print(bad_input_line("export-pairs", err), file=sys.stderr)
        return EXIT_USAGE
    for p in pairs:
        y0, x0, y1, x1 = p.box
        print(f"{p.path}: rows {y0}:{y1}, columns {x0}:{x1}, {p.edits} edit(s), "
              f"{p.labelled:,} labelled pixels, {p.points} points")
    print(f"{len(pairs)} training pair(s) in {args.out}")
    return EXIT_OK
