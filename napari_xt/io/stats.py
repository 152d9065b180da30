"""Image statistics: non-finite values and display contrast limits.

NaN and infinite values are never replaced by the readers or the converter: the data stay as
the file holds them. `image_stats` counts them (chunk by chunk, bounded memory) and
`check_finite` turns their presence into an `ImageIOError` for callers that need finite data
(a model, for instance). `contrast_limits` is computed on the smallest pyramid level only,
ignoring non-finite values.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

from .errors import ImageIOError
from .image import MultiscaleImage


@dataclass(frozen=True)
class ImageStats:
    """Counts and finite range of one level; `minimum`/`maximum` are None when nothing is
    finite."""

    level: int
    size: int
    nan: int
    posinf: int
    neginf: int
    minimum: float | None
    maximum: float | None

    @property
    def nonfinite(self) -> int:
        """Number of NaN and infinite values."""
        return self.nan + self.posinf + self.neginf

    @property
    def all_finite(self) -> bool:
        """Whether every value of the level is finite."""
        return self.nonfinite == 0


def image_stats(image: MultiscaleImage, level: int = -1) -> ImageStats:
    """Counts of NaN/+inf/-inf and the finite min/max of a level (default: the smallest)."""
    arr = image.levels[level]
    index = level % image.num_levels
    if arr.dtype.kind != "f":
        lo, hi = dask.compute(arr.min(), arr.max())
        return ImageStats(index, int(arr.size), 0, 0, 0, float(lo), float(hi))
    finite = da.isfinite(arr)
    masked = da.where(finite, arr, np.nan)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        nan, pos, neg, nfinite, lo, hi = dask.compute(
            da.isnan(arr).sum(), (arr == np.inf).sum(), (arr == -np.inf).sum(), finite.sum(),
            da.nanmin(masked), da.nanmax(masked),
        )
    if int(nfinite) == 0:
        lo = hi = None
    return ImageStats(
        index, int(arr.size), int(nan), int(pos), int(neg),
        None if lo is None else float(lo), None if hi is None else float(hi),
    )


def check_finite(image: MultiscaleImage, level: int = 0) -> ImageStats:
    """Raise `ImageIOError` if a level (default: full resolution) holds NaN or inf values."""
    stats = image_stats(image, level)
    if not stats.all_finite:
        raise ImageIOError(
            f"{image.source}: level {stats.level} holds non-finite values: {stats.nan} NaN, "
            f"{stats.posinf} +inf, {stats.neginf} -inf of {stats.size} samples; mask or fill "
            "them before use (the readers never change them)"
        )
    return stats


def contrast_limits(image: MultiscaleImage) -> tuple[tuple[float, float], ...]:
    """Display range per channel (one pair for YX and RGB images).

    The file's windows when it has them; 8-bit RGB is (0, 255); otherwise the finite min/max
    of the smallest level. A single-level image larger than `SAMPLE_ABOVE` pixels is not
    scanned: its range comes from up to 16 of its chunks spread over the image.
    """
    if image.contrast_limits is not None:
        return image.contrast_limits
    if image.is_rgb:
        return ((0.0, 255.0),)
    small = image.to_cyx(-1)
    if image.num_levels == 1 and max(small.shape[1:]) > SAMPLE_ABOVE:
        small = _sample_chunks(small)
    data = np.asarray(small.compute(scheduler="threads") if hasattr(small, "compute") else small)
    return channel_ranges(data)


SAMPLE_ABOVE = 2048


def channel_ranges(cyx: np.ndarray) -> tuple[tuple[float, float], ...]:
    """Finite (min, max) per channel of a `(C, Y, X)` array; (0, 1) when nothing is finite,
    (v, v + 1) when constant."""
    out = []
    for channel in cyx.reshape(cyx.shape[0], -1):
        if channel.dtype.kind == "f":
            channel = channel[np.isfinite(channel)]
        if channel.size == 0:
            out.append((0.0, 1.0))
            continue
        lo, hi = float(channel.min()), float(channel.max())
        out.append((lo, hi if hi > lo else lo + 1.0))
    return tuple(out)


def _sample_chunks(cyx: da.Array, per_side: int = 4) -> da.Array:
    """Up to per_side**2 whole chunks on a regular grid over the chunk grid, side by side."""
    rows = np.unique(np.linspace(0, len(cyx.chunks[1]) - 1, per_side).round().astype(int))
    cols = np.unique(np.linspace(0, len(cyx.chunks[2]) - 1, per_side).round().astype(int))
    ys, xs = np.cumsum((0, *cyx.chunks[1])), np.cumsum((0, *cyx.chunks[2]))
    pieces = [
        cyx[:, ys[r] : ys[r + 1], xs[c] : xs[c + 1]].reshape(cyx.shape[0], -1)
        for r in rows
        for c in cols
    ]
    return da.concatenate(pieces, axis=1)[:, None, :]
