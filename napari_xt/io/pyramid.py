"""Image pyramids: lazy 2x (or fx) downsampling along Y and X.

Methods: `mean` (images; integer results are rounded back to the input dtype), `nearest`
(top-left sample of each block) and `mode` (the most frequent value of each block, ties to
the top-left one: for label images, which must not be averaged). Odd trailing rows/columns
are dropped, as NGFF pyramids do, so level i has `floor(shape / factor**i)` pixels.
NaN values propagate through `mean` (a block with a NaN averages to NaN); they are never
replaced.
"""

from __future__ import annotations

import dask.array as da
import numpy as np

from .axes import guess_axes
from .errors import ImageIOError

METHODS = ("mean", "nearest", "mode")


def pyramid_shapes(
    height: int, width: int, *, factor: int = 2, min_size: int = 1024, max_levels: int = 32
) -> list[tuple[int, int]]:
    """(height, width) of every level: divide by `factor` until the larger side is
    <= `min_size` (or a side would reach 0)."""
    shapes = [(int(height), int(width))]
    while max(shapes[-1]) > min_size and len(shapes) < max_levels:
        h, w = shapes[-1][0] // factor, shapes[-1][1] // factor
        if h == 0 or w == 0:
            break
        shapes.append((h, w))
    return shapes


def downsample_block(
    x: np.ndarray, iy: int, ix: int, factor: int = 2, method: str = "mean"
) -> np.ndarray:
    """Downsample a numpy block along axes `iy`, `ix` (trailing remainders dropped)."""
    if method not in METHODS:
        raise ImageIOError(f"unknown downsampling method {method!r}; use one of {METHODS}")
    f = int(factor)
    h, w = x.shape[iy] // f, x.shape[ix] // f
    parts = []  # the f*f samples of every block, each an array of the output shape
    for dy in range(f):
        for dx in range(f):
            index = [slice(None)] * x.ndim
            index[iy], index[ix] = slice(dy, h * f, f), slice(dx, w * f, f)
            parts.append(x[tuple(index)])
            if method == "nearest":
                return np.ascontiguousarray(parts[0])
    if method == "mean":
        small_int = x.dtype.kind in "iu" and x.dtype.itemsize <= 2
        acc_dtype = np.float32 if small_int or x.dtype == np.float32 else np.float64
        acc = np.zeros(parts[0].shape, dtype=acc_dtype)
        for part in parts:
            acc += part
        acc /= f * f
        if x.dtype.kind in "iu":
            info = np.iinfo(x.dtype)
            return np.clip(np.rint(acc), info.min, info.max).astype(x.dtype)
        return acc.astype(x.dtype, copy=False)
    if len(parts) == 4:  # 2 x 2: six comparisons instead of sixteen
        return _mode4(*parts)
    counts = np.zeros((len(parts), *parts[0].shape), dtype=np.int16)
    for k, ref in enumerate(parts):
        for other in parts:
            counts[k] += other == ref
    best = counts.argmax(axis=0)  # first of the most frequent: ties go to the top-left
    return np.choose(best, parts) if len(parts) <= 32 else np.stack(parts)[best]


def _mode4(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Most frequent of four samples, ties to the first (a, then b, c, d). Of four samples
    a value seen twice is never beaten (3 + 2 > 4), so: a when it repeats, else b when it
    repeats, else c when c == d, else a."""
    out = a.copy()
    lone = (a != b) & (a != c) & (a != d)
    if lone.any():
        take_b = lone & ((b == c) | (b == d))
        out[take_b] = b[take_b]
        take_c = lone & ~take_b & (c == d)
        out[take_c] = c[take_c]
    return out


def downsample(arr: da.Array, axes: str, *, factor: int = 2, method: str = "mean") -> da.Array:
    """One lazy pyramid step of a dask array with the given axes (`YX`, `YXC`, `CYX`)."""
    iy, ix = axes.index("Y"), axes.index("X")
    f = int(factor)
    h, w = arr.shape[iy] // f, arr.shape[ix] // f
    if h == 0 or w == 0:
        raise ImageIOError(f"cannot downsample shape {arr.shape} by {f}")
    index = [slice(None)] * arr.ndim
    index[iy], index[ix] = slice(0, h * f), slice(0, w * f)
    arr = arr[tuple(index)]
    rechunk = {ax: max(f, (arr.chunksize[ax] // f) * f) for ax in (iy, ix)}
    arr = arr.rechunk(rechunk)
    out_chunks = tuple(
        tuple(c // f for c in ch) if ax in (iy, ix) else ch for ax, ch in enumerate(arr.chunks)
    )
    return arr.map_blocks(
        downsample_block, iy=iy, ix=ix, factor=f, method=method, chunks=out_chunks,
        dtype=arr.dtype, meta=np.empty((0,) * arr.ndim, dtype=arr.dtype),
    )


def build_pyramid(
    array: np.ndarray | da.Array,
    axes: str | None = None,
    *,
    factor: int = 2,
    min_size: int = 1024,
    method: str = "mean",
    chunks: int = 1024,
    max_levels: int = 32,
) -> list[da.Array]:
    """Lazy pyramid of `array` (level 0 first) down to a larger side <= `min_size`.

    Level 0 is `array` itself (numpy input is wrapped with `chunks`-sized chunks); each next
    level is computed from the previous one on demand, block by block.
    """
    if method not in METHODS:
        raise ImageIOError(f"unknown downsampling method {method!r}; use one of {METHODS}")
    if int(factor) < 2:
        raise ImageIOError(f"pyramid factor must be >= 2, not {factor}")
    axes = axes or guess_axes(array.shape, "build_pyramid")
    if isinstance(array, np.ndarray):
        array = da.from_array(
            array,
            chunks=tuple(min(s, chunks) if a in "YX" else s for s, a in zip(array.shape, axes)),
            name=False,
        )
    iy, ix = axes.index("Y"), axes.index("X")
    shapes = pyramid_shapes(
        array.shape[iy], array.shape[ix], factor=factor, min_size=min_size,
        max_levels=max_levels,
    )
    levels = [array]
    for _ in shapes[1:]:
        levels.append(downsample(levels[-1], axes, factor=factor, method=method))
    return levels
