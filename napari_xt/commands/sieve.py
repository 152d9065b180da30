"""``napari-xt sieve STORE --min-size N``: remove specks from a label result of a store.

Pieces (4-connected pixels of one label) smaller than N pixels take the label most of their
surroundings carry (`napari_xt.io.sieve`); larger pieces are never changed. The sieved
labels are written beside the model's own as a separate label image,
``labels/<name>_sieve<N>`` unless ``--out-name`` says otherwise, with the same classes and
colours, block by block with bounded memory, under a temporary name renamed when complete.
The model's labels are only read: nothing else in the store changes; ``--overwrite``
replaces an earlier sieved copy of the output name and nothing else.
The same command again keeps a copy that is already the sieve of the result as it is now.
``napari-xt predict ... --sieve N`` does the same when a run finishes.
"""

from __future__ import annotations

import argparse
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sieve",
        help="relabel specks smaller than N px in a store's label result (a separate result)",
        description=__doc__,
    )
    p.add_argument("store", help="a result store (OME-Zarr) with a label result")
    p.add_argument("--min-size", type=int, required=True, metavar="N",
                   help="pieces smaller than N pixels (2-256) take the label most of their "
                        "surroundings carry, in two passes (64 suits the built-in models)")
    p.add_argument("--name", default="prediction", help="the label result to sieve")
    p.add_argument("--out-name", default=None,
                   help="name of the sieved label result (default: NAME_sieveN)")
    p.add_argument("--chunk", type=int, default=1024, help="block edge in pixels (256-4096)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier sieved copy of the output name (never another "
                        "result)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def sieved_name(name: str, min_size: int) -> str:
    """The default name of the sieved copy of label result `name`."""
    return f"{name}_sieve{int(min_size)}"


def _provenance(name: str, min_size: int, ours) -> dict:
    created = ours.get("created") if isinstance(ours, dict) else None
    return {"labels": name, "min_size": int(min_size), "created": created}


def recorded_sieve(path) -> dict | None:
    """The sieve record a label group at `path` carries (what a sieve wrote in it), or None:
    no group, no record, or metadata that does not read (never trusted)."""
    from napari_xt.io.result_store import group_attrs, zarr_format

    fmt = zarr_format(path)
    try:
        ours = group_attrs(path, fmt).get("napari-xt") if fmt else None
        record = ours.get("sieve") if isinstance(ours, dict) else None
    except (OSError, ValueError, AttributeError):
        return None
    return record if isinstance(record, dict) else None


def is_sieved(path) -> bool:
    """True when the label group at `path` was written by a sieve (it records one)."""
    return recorded_sieve(path) is not None


def up_to_date(store, out_name: str, name: str, min_size: int) -> bool:
    """True when label result `out_name` of `store` is the sieve of `name` with `min_size`
    as `name` is now (same run, by the store's creation time; a store not of napari-xt
    has none: then the recorded result and size must match). Names that are not result
    names are never up to date."""
    from pathlib import Path

    from napari_xt.io.result_store import NAME_PATTERN, group_attrs, zarr_format

    root = Path(store)
    fmt = zarr_format(root)
    if fmt is None or not all(NAME_PATTERN.match(str(n)) for n in (out_name, name)):
        return False
    recorded = recorded_sieve(root / "labels" / out_name)
    try:
        ours = group_attrs(root, fmt).get("napari-xt")
    except (OSError, ValueError, AttributeError):
        return False
    return recorded is not None and recorded == _provenance(name, min_size, ours)


MAX_MIN_SIZE = 256  # a block is read with a margin of 4 x min_size px (`halo`)


def sieve_result(store, name: str, min_size: int, out_name: str | None = None, *,
                 chunk: int = 1024, overwrite: bool = False, progress=None):
    """Write the sieved copy of label result `name` of `store` as `labels/<out_name>`;
    returns its path. `overwrite` replaces only an earlier sieved copy, never another
    result. Raises `ImageIOError` for a store, result or option it must refuse."""
    import os
    from pathlib import Path

    from napari_xt.io import ImageIOError
    from napari_xt.io.result_store import (
        check_name,
        check_new_name,
        group_attrs,
        store_lock,
        zarr_format,
    )
    from napari_xt.io.results import read_labels, write_labels
    from napari_xt.io.sieve import check_min_size, sieve_lazy

    root = Path(store)
    try:
        min_size = check_min_size(min_size)
    except ValueError as err:
        raise ImageIOError(f"--min-size: {err}") from None
    if min_size < 2:
        raise ImageIOError("--min-size 1 would change nothing; pass the smallest piece size "
                           "to keep, e.g. --min-size 64")
    if min_size > MAX_MIN_SIZE:
        raise ImageIOError(f"--min-size {min_size} is more than {MAX_MIN_SIZE} px: the "
                           "sieve removes specks, not regions; pass a smaller --min-size")
    if not 256 <= chunk <= 4096:
        raise ImageIOError(f"--chunk must be 256-4096 pixels, got {chunk}")
    try:
        check_name(name)
    except ImageIOError as err:
        raise ImageIOError(f"--name: {err}") from None
    try:
        out_name = check_new_name(out_name or sieved_name(name, min_size))
    except ImageIOError as err:
        raise ImageIOError(f"--out-name: {err}") from None
    if out_name.lower() == name.lower():
        raise ImageIOError(f"--out-name {out_name!r} is the result being sieved; it is never "
                           "replaced: choose another --out-name")
    fmt = zarr_format(root)
    if fmt is None:
        raise ImageIOError(f"{root}: not a zarr store (pass a result store of napari-xt "
                           "predict, or an OME-Zarr with labels)")
    if not os.access(root, os.W_OK):
        raise ImageIOError(f"{root}: the store is read-only; copy it somewhere writable and "
                           "sieve the copy")
    target = root / "labels" / out_name
    if target.is_symlink() or (target.exists() and not is_sieved(target)):
        raise ImageIOError(f"{target}: a result that is not a sieved copy; it is never "
                           "replaced: choose another --out-name")
    with store_lock(root):  # no run writes into the store meanwhile
        ours = group_attrs(root, fmt).get("napari-xt")
        if isinstance(ours, dict) and "complete" in ours and ours["complete"] is not True:
            raise ImageIOError(f"{root}: its run is not finished; run the same napari-xt "
                               "predict command again to finish it, then sieve")
        try:
            source = read_labels(root, name)
        except ImageIOError:
            raise
        except Exception as err:  # garbled metadata, a level that is not there
            raise ImageIOError(f"{root / 'labels' / name}: cannot read the label result "
                               f"({type(err).__name__}: {err})") from err
        labels = source.levels[0]
        if labels.ndim != 2:
            raise ImageIOError(f"{source.path}: labels of shape {labels.shape} are not (Y, X)")
        sieved = sieve_lazy(labels, min_size, chunk=chunk)
        return write_labels(
            root, out_name, sieved, colors=source.colors or None,
            properties=source.properties or None,
            source_image=(source.source or {}).get("image", "../../"),
            pixel_size=source.pixel_size, unit=source.unit, overwrite=overwrite,
            chunk=chunk, progress=progress, match_image=False,
            extra={"sieve": _provenance(name, min_size, ours)},
        )


def stale_copies(store, name: str) -> list[tuple[str, int]]:
    """(name, min_size) of the sieved copies of label result `name` in `store` that were
    not made from it as it is now (an earlier run's labels)."""
    from pathlib import Path

    folder = Path(store) / "labels"
    out = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        recorded = recorded_sieve(path) if path.name != name else None
        if recorded is None or recorded.get("labels") != name:
            continue
        size = recorded.get("min_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 2:
            continue  # not a copy this command wrote
        if not up_to_date(store, path.name, name, size):
            out.append((path.name, size))
    return out


def sieve_or_keep(store, name: str, min_size: int, out_name: str | None = None, *,
                  rewrite: bool = False, **options) -> tuple[str, bool]:
    """(path, kept): the sieved copy of `name` kept as it is when it is already the sieve of
    `name` as it is now (unless `rewrite`), else written by `sieve_result` with `options`."""
    from pathlib import Path

    out = out_name or sieved_name(name, min_size)
    if not rewrite and up_to_date(store, out, name, min_size):
        return str(Path(store) / "labels" / out), True
    return str(sieve_result(store, name, min_size, out_name, **options)), False


def sieve_after_run(store, name: str, min_size: int, *, overwrite: bool = False) -> str:
    """After a finished `predict`: `sieve_or_keep` of its labels; the line to show."""
    _, kept = sieve_or_keep(store, name, min_size, overwrite=overwrite)
    out = sieved_name(name, min_size)
    if kept:
        return f"kept labels/{out} (sieved from these labels)"
    return f"wrote labels/{out} (pieces under {min_size} px take the label around them)"


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    state = {"last": 0.0, "shown": False}

    def progress(event) -> None:
        now = time.perf_counter()
        if args.quiet or (now - state["last"] < 0.2 and event.done != event.total):
            return
        state["last"], state["shown"] = now, True
        bar = "#" * int(30 * event.fraction)
        print(f"\r[{bar:<30}] {event.done}/{event.total} blocks, level "
              f"{event.level + 1}/{event.num_levels}", end="", file=sys.stderr)

    try:
        path, kept = sieve_or_keep(args.store, args.name, args.min_size, args.out_name,
                                   rewrite=args.overwrite, chunk=args.chunk,
                                   overwrite=args.overwrite, progress=progress)
    except KeyboardInterrupt:
        if state["shown"]:
            print(file=sys.stderr)
            state["shown"] = False
        print("napari-xt sieve: cancelled; nothing was written (a partial copy is never "
              "listed), run it again to sieve", file=sys.stderr)
        return 130
    finally:
        if state["shown"]:
            print(file=sys.stderr)
            state["shown"] = False
    if kept:
        print(f"kept {path}: already the sieve of {args.name!r} with {args.min_size} px")
    else:
        print(f"wrote {path} in {time.perf_counter() - start:.1f} s")
    return 0
