"""What several subcommands take alike: how an image is read (`--axes`, `--plane`,
`--series`) and which model runs (`--model`, `--weights`).

An image read as asked is an `ImagePath`: the engine and the stores still know it by its
path (a rerun resumes, export-pairs finds it), and it is opened with these options.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_image_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--axes", default=None,
                   help="the image's own axes when they cannot be read or guessed, e.g. YX, "
                        "YXC, CYX or TCZYX (with --plane for T and Z)")
    p.add_argument("--plane", default=None, metavar="AXIS=INDEX[,...]",
                   help="the index to take along axes other than Y, X and channels, e.g. "
                        "z=0,t=3 (or c=1 for one channel)")
    p.add_argument("--series", type=int, default=None,
                   help="TIFF series to read (default: the file's only image series; a "
                        "file with several is refused; a slide's label and macro images "
                        "and a pyramid's levels do not count)")


def parse_plane(text: str | None) -> dict[str, int] | None:
    """`z=0,t=3` -> {"z": 0, "t": 3}; an `ImageIOError` naming the option when malformed."""
    if not text:
        return None
    from napari_xt.io import ImageIOError

    out: dict[str, int] = {}
    for part in text.split(","):
        axis, sep, index = part.strip().partition("=")
        axis = axis.strip().lower()
        index = index.strip()
        if not sep or len(axis) != 1 or not axis.isascii() or not axis.isalpha() \
                or not (index.isascii() and index.isdigit()):
            raise ImageIOError(f"--plane {text!r}: expected AXIS=INDEX pairs separated by "
                               "commas, such as z=0,t=3")
        if axis in out:
            raise ImageIOError(f"--plane {text!r}: axis {axis} is given twice")
        out[axis] = int(index)
    return out


def image_request(path: str, args: argparse.Namespace):
    """The `ImagePath` for `path` read with the command's --axes, --plane and --series."""
    from napari_xt.io import ImageIOError, ImagePath

    if args.series is not None and args.series < 0:
        raise ImageIOError(f"--series {args.series}: series are numbered from 0")
    from napari_xt.io.tiff_reader import is_tiff_path

    if args.series is not None and not is_tiff_path(Path(path)):
        raise ImageIOError(f"--series {args.series}: {path} is not a TIFF file; only TIFF "
                           "files (.tif, .tiff, .svs, ...) hold several image series")
    plane = parse_plane(args.plane)
    return ImagePath(str(path), series=args.series,
                     plane=tuple(plane.items()) if plane else None,
                     axes=args.axes.upper() if args.axes else None)


def load_cli_model(choice: str, weights: str | None, channels: int | None):
    """(model, description, normalization) for `--model CHOICE [--weights FILE]`.

    With --weights, CHOICE is the zoo architecture the weights belong to (built with the
    image's `channels`): an official xT trainer checkpoint (a torch.save file, read with
    `torch.load(weights_only=True)`, nothing else is unpickled) or a napari-xt safetensors
    file of that architecture."""
    from napari_xt.model.choice import (
        DEMO_ALIASES,
        checkpoint_normalization,
        is_checkpoint,
        load_model,
        seeded_zoo_model,
    )

    if weights is None:
        return load_model(choice)
    from napari_xt.model.checkpoint import (
        CheckpointError,
        import_official_checkpoint,
        load_weights,
        read_metadata,
    )

    if choice in DEMO_ALIASES or is_checkpoint(choice) or Path(choice).is_file():
        raise CheckpointError(f"--weights {weights} needs a zoo name as --model (the "
                              f"architecture the weights belong to), not {choice!r}")
    path = Path(weights)
    if not path.is_file():
        raise CheckpointError(f"--weights {weights}: no such file")
    from napari_xt.model.zoo import list_models

    if choice not in list_models():
        seeded_zoo_model(choice, channels)  # the zoo's KeyError, listing close names
    try:
        read_metadata(path)
        safetensors = True
    except CheckpointError as err:
        if getattr(err, "remedy", None) != "official":
            raise
        safetensors = False
    if safetensors:
        model = load_weights(seeded_zoo_model(choice, channels), path)
        normalize = checkpoint_normalization(path)
        what = f"{choice} with the weights of {path.name}"
    else:
        overrides = {} if channels is None else {"in_chans": channels}
        model = import_official_checkpoint(path, choice, **overrides)
        normalize = None
        what = f"{choice} with the official xT weights of {path.name}"
    return model.eval(), what, normalize
