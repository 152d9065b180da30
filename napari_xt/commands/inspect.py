"""``napari-xt inspect STORE IMAGE --model MODEL --region ROW,COL``: which regions made a
region's answer.

Reopens the run of STORE (a result store of `napari-xt predict` or of the Run xT widget) on
IMAGE, the image it read, with MODEL, the model it used (both are checked against what the
store recorded), and computes the contribution map of one region (or one `--pixel` of it)
with the run's crops: `--method attention | rollout | gradient | occlusion` (see
`napari_xt.inspect`). Prints the region's own share and the regions that mattered most;
`--out map.png | map.npy | map.json` keeps the map.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from napari_xt.commands.inputs import add_image_options

METHODS = ("attention", "rollout", "gradient", "occlusion")


def _pair(text: str) -> tuple[int, int]:
    parts = text.replace(" ", "").split(",")
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected two numbers as ROW,COL, not {text!r}")
    return int(parts[0]), int(parts[1])


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="which regions made a region's answer "
                              "(contribution maps)", description=__doc__)
    p.add_argument("store", help="the run's result store (*.zarr)")
    p.add_argument("image", help="the image the run was made on")
    p.add_argument("--model", required=True,
                   help="the model the run used: 'demo', a zoo name or a checkpoint file")
    p.add_argument("--weights", default=None, help="weights for a zoo --model (as predict)")
    p.add_argument("--region", type=_pair, required=True, metavar="ROW,COL",
                   help="the region to explain (row and column of the region grid)")
    p.add_argument("--pixel", type=_pair, default=None, metavar="Y,X",
                   help="explain one pixel of the region (pixels from its top-left corner)")
    p.add_argument("--method", choices=METHODS, default="occlusion",
                   help="attention (one layer), rollout (all layers), gradient or occlusion "
                        "(any encoder; default)")
    p.add_argument("--layer", type=int, default=None, help="attention: the layer (default last)")
    p.add_argument("--head", type=int, default=None, help="attention: one head (default mean)")
    p.add_argument("--output", default=None,
                   help="the model output explained: its classes (default) or a head map "
                        "such as centre (detections)")
    p.add_argument("--out", default=None, help="write the map: .png, .npy or .json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_image_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_xt.cli import EXIT_OK, EXIT_USAGE, bad_input_line
    from napari_xt.commands.inputs import image_request, load_cli_model
    from napari_xt.inspect.stored import InspectError, check_out, inspect_store, save_map

    try:
        if args.out is not None:  # refused before the work, never after it
            check_out(args.out, args.overwrite)
        image = image_request(args.image, args)
        model, what, _ = load_cli_model(args.model, args.weights, None)
    except (InspectError, KeyError, FileNotFoundError) as err:  # an unknown model name, ...
        print(bad_input_line("inspect", err), file=sys.stderr)
        return EXIT_USAGE
    model.eval()
    try:
        cm = inspect_store(args.store, image, model, args.region, args.method,
                           layer=args.layer, head=args.head, pixel=args.pixel,
                           output=args.output)
    except InspectError as err:
        print(f"napari-xt inspect: {err}", file=sys.stderr)
        return EXIT_USAGE
    r, c = cm.region
    where = f"region ({r}, {c})" + (f", pixel {cm.pixel}" if cm.pixel else "")
    others = int(np.isfinite(cm.values).sum()) - 1
    print(f"{where} under {what}, {cm.method}: {100 * cm.self_share:.1f}% from the region "
          f"itself, {100 * (1 - cm.self_share):.1f}% from {others} other regions of "
          f"{len(cm.spans)} crop(s); {cm.seconds:.2f} s"
          + (f" ({cm.note})" if cm.note else ""))
    for (i, j), share in cm.top(6):
        print(f"  ({i}, {j}) {100 * share:5.1f}%" + ("  <- itself" if (i, j) == (r, c) else ""))
    if args.out:
        try:
            print(f"map written to {save_map(cm, args.out)}")
        except InspectError as err:
            print(f"napari-xt inspect: {err}", file=sys.stderr)
            return EXIT_USAGE
    return EXIT_OK
