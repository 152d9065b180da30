"""Writing helpers shared by the converter and the results writer.

- `atomic_directory`: build a directory under a temporary sibling name and rename it into
  place only when everything succeeded; an existing target is kept unless `overwrite=True`.
- `write_blocks`: fill a zarr array from a lazily read source one output block at a time
  (a few blocks in flight), so memory stays bounded whatever the image size.
- `write_pyramid_level`: the same for a downsampled level, read from the level above it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .box import Box
from .errors import ImageIOError
from .pyramid import downsample_block


@contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool, what: str) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `dst`; rename it to `dst` on success.

    On any error the temporary directory is removed and `dst` is untouched. With
    `overwrite=False` an existing `dst` is an `ImageIOError` (checked before and after).
    Temporary names carry the host and process id (`.<name>.tmp-<host>-<pid>-<id>`), so
    leftovers of a process that died (killed while writing) are recognised and removed by
    the next write of the same target, and those of a live process are left alone.
    """
    dst = Path(dst)
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise ImageIOError(f"{dst}: is not a folder (a file or a link), never replaced by "
                           f"a {what}; choose another name")
    if dst.exists() and not overwrite:
        raise ImageIOError(f"{dst}: {what} already exists", remedy="overwrite_it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dst)
    tag = f"{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = dst.parent / f".{dst.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            if not overwrite:
                raise ImageIOError(f"{dst}: {what} appeared while writing",
                                   remedy="overwrite_it")
            trash = dst.parent / f".{dst.name}.old-{tag}"
            os.replace(dst, trash)
            os.replace(tmp, dst)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _host() -> str:
    import socket

    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_leftovers(dst: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders that `atomic_directory` left beside `dst` in processes
    on this host that no longer run (a kill mid-write); returns what was removed. Names of
    other hosts or of live processes are kept (they may still be writing)."""
    dst = Path(dst)
    removed = []
    if not dst.parent.is_dir():
        return removed
    host = _host()
    for kind in ("tmp", "old"):
        for p in dst.parent.glob(f".{glob_escape(dst.name)}.{kind}-*"):
            parts = p.name.rsplit(f".{kind}-", 1)[1].split("-")
            if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
                continue
            if not _alive(int(parts[1])) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def glob_escape(name: str) -> str:
    """`name` with the glob wildcards `*`, `?` and `[` escaped, to match it literally."""
    import glob

    return glob.escape(name)


def block_grid(shape: tuple[int, int], block: tuple[int, int]) -> list[Box]:
    """The box of every output block, raster order."""
    h, w = shape
    bh, bw = block
    return [
        Box(y0, x0, min(y0 + bh, h), min(x0 + bw, w))
        for y0 in range(0, h, bh)
        for x0 in range(0, w, bw)
    ]


def _run_blocks(
    boxes: list[Box],
    job: Callable[[Box], None],
    workers: int,
) -> Iterator[int]:
    """Run `job(box)` for every box with at most 2*workers in flight; yield after each."""
    if workers <= 1:
        for box in boxes:
            job(box)
            yield 1
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: set = set()
        it = iter(boxes)
        try:
            for box in it:
                pending.add(pool.submit(job, box))
                if len(pending) >= 2 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        fut.result()
                        yield 1
            for fut in list(pending):
                fut.result()
                pending.discard(fut)
                yield 1
        finally:
            for fut in pending:
                fut.cancel()


def write_blocks(
    source: Any, target: zarr.Array, axes: str, *, block: tuple[int, int], workers: int = 2
) -> Iterator[int]:
    """Copy `source` (dask/numpy/zarr-like, same shape) into `target` block by block."""
    iy, ix = axes.index("Y"), axes.index("X")
    shape = (target.shape[iy], target.shape[ix])

    def job(box: Box) -> None:
        index = [slice(None)] * len(axes)
        index[iy], index[ix] = box.slices
        region = source[tuple(index)]
        if hasattr(region, "compute"):
            region = region.compute(scheduler="synchronous")
        target[tuple(index)] = np.asarray(region)

    yield from _run_blocks(block_grid(shape, block), job, workers)


def write_pyramid_level(
    above: zarr.Array,
    target: zarr.Array,
    axes: str,
    *,
    block: tuple[int, int],
    factor: int = 2,
    method: str = "mean",
    workers: int = 2,
) -> Iterator[int]:
    """Fill `target` (level k+1) by downsampling the already written `above` (level k)."""
    iy, ix = axes.index("Y"), axes.index("X")
    shape = (target.shape[iy], target.shape[ix])

    def job(box: Box) -> None:
        y0, x0, y1, x1 = box
        src = [slice(None)] * len(axes)
        src[iy], src[ix] = slice(y0 * factor, y1 * factor), slice(x0 * factor, x1 * factor)
        region = downsample_block(np.asarray(above[tuple(src)]), iy, ix, factor, method)
        dst = [slice(None)] * len(axes)
        dst[iy], dst[ix] = box.slices
        target[tuple(dst)] = region

    yield from _run_blocks(block_grid(shape, block), job, workers)


def codec(name: str, level: int = 3):
    """A zarr v3 compressor: `zstd` (default) or `blosc` (blosc-zstd with shuffle)."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "zstd":
        return ZstdCodec(level=level)
    if name == "blosc":
        return BloscCodec(cname="zstd", clevel=level, shuffle="shuffle")
    raise ImageIOError(f"unknown compressor {name!r}; use 'zstd' or 'blosc'")
