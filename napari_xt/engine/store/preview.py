"""The store's own image: a preview of the input, so the store is an OME-Zarr image that
NGFF tools and napari open with the results under `labels/`.

It has as many levels as the label pyramid (NGFF validators compare them), the first at
most `PREVIEW_SIDE` pixels a side (block means of `factor` x `factor` input pixels, the
factor a power of two). The engine sums the pixels it reads anyway into a `PreviewSums` as
the run goes, so the preview costs no second pass over the input; when the run did not read
every region (a resumed run, cached features, unreadable regions) the preview is read from
the coarsest input level that gives it exactly, band by band, unreadable parts left blank.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

PREVIEW_SIDE = 1024


def preview_factor(height: int, width: int) -> int:
    """The block size of the preview's first level: the smallest power of two that brings the
    larger side of a `height x width` image to at most `PREVIEW_SIDE` pixels."""
    f = 1
    while max(height, width) / f > PREVIEW_SIDE:
        f *= 2
    return f


def _groups(start: int, stop: int, f: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels start..stop-1 of an axis go to output pixel p // f (when < n_out): the
    offsets (from `start`) where each output pixel's run begins, and those output pixels."""
    p = np.arange(start, stop)
    out = p // f
    keep = out < n_out
    p, out = p[keep], out[keep]
    if len(p) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    first = np.flatnonzero(np.r_[True, out[1:] != out[:-1]])
    return p[first] - start, out[first]


class PreviewSums:
    """Per-pixel sums of the input over the preview's blocks, filled region by region."""

    def __init__(self, height: int, width: int, channels: int, factor: int) -> None:
        self.height, self.width, self.channels, self.factor = height, width, channels, factor
        self.h0, self.w0 = max(1, height // factor), max(1, width // factor)
        self.fy = factor if height >= factor else height  # rows per preview pixel
        self.fx = factor if width >= factor else width
        self.sums = np.zeros((channels, self.h0, self.w0), np.float64)
        self.seen: set[tuple[int, int]] = set()
        self.covered = 0  # input pixels summed so far
        self._lock = threading.Lock()

    def add(self, y0: int, x0: int, block: np.ndarray) -> None:
        """Raw input pixels (C, h, w) at (y0, x0): a region or a tile of the input (boxes
        that do not overlap); each box is counted once."""
        h, w = block.shape[1:]
        with self._lock:
            if (y0, x0) in self.seen:
                return
            self.seen.add((y0, x0))
            self.covered += h * w
        fy, fx = self.fy, self.fx
        if y0 % fy == 0 and x0 % fx == 0:  # aligned (regions are): one reshape-sum
            hy = min(h, self.h0 * fy - y0) // fy * fy
            wx = min(w, self.w0 * fx - x0) // fx * fx
            if hy == min(h, self.h0 * fy - y0) and wx == min(w, self.w0 * fx - x0):
                if hy <= 0 or wx <= 0:
                    return
                part = block[:, :hy, :wx]
                if not part.strides[0] >= part.strides[1] >= part.strides[2]:
                    part = np.ascontiguousarray(part)  # channel-last: sums in C order
                c = part.shape[0]
                acc = np.float32 if part.dtype == np.float32 else np.float64
                # whole rows first (contiguous adds), then the fx columns of the smaller sum:
                # several times faster than the other order for small factors
                s = part.reshape(c, hy // fy, fy, wx).sum(axis=2, dtype=acc)
                s = s.reshape(c, hy // fy, wx // fx, fx).sum(axis=3)
                oy, ox = y0 // fy, x0 // fx
                with self._lock:
                    self.sums[:, oy:oy + s.shape[1], ox:ox + s.shape[2]] += s
                return
        ry, oy = _groups(y0, y0 + h, self.fy, self.h0)
        rx, ox = _groups(x0, x0 + w, self.fx, self.w0)
        if len(ry) == 0 or len(rx) == 0:
            return
        # only the rows / columns that fall in a preview pixel (the floor crop)
        y_end = min(h, self.h0 * self.fy - y0)
        x_end = min(w, self.w0 * self.fx - x0)
        part = block[:, ry[0]:y_end, rx[0]:x_end].astype(np.float64)
        s = np.add.reduceat(np.add.reduceat(part, ry - ry[0], axis=1), rx - rx[0], axis=2)
        with self._lock:
            self.sums[:, oy[:, None], ox[None, :]] += s

    def complete(self) -> bool:
        """Every input pixel was summed."""
        return self.covered >= self.height * self.width

    def mean(self, dtype: np.dtype) -> np.ndarray:
        """The preview's first level (C, h0, w0): the block sums divided by the block size, cast
        to `dtype` (integers rounded and clipped to its range). Meaningful once `complete`."""
        out = self.sums / float(self.fy * self.fx)
        return _cast(out, dtype)


def _cast(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(dtype)
    return x.astype(dtype)


def block_mean(x: np.ndarray, f: int) -> np.ndarray:
    """(C, h, w) -> (C, max(1, h // f), max(1, w // f)) block means (float64 sums, integers
    rounded)."""
    if f == 1:
        return x
    c, h, w = x.shape
    ho, wo = max(1, h // f), max(1, w // f)
    fy, fx = (f if h >= f else h), (f if w >= f else w)
    acc = x[:, : ho * fy, : wo * fx].astype(np.float64)
    return _cast(acc.reshape(c, ho, fy, wo, fx).sum(axis=(2, 4)) / (fy * fx), x.dtype)


def _read_first_level(store: Any, source: Any, factor: int) -> np.ndarray:
    arr, left, (hs, ws) = source.coarser(factor)
    spec = store.spec
    h0, w0 = max(1, spec.height // factor), max(1, spec.width // factor)
    c = source.channels
    first = np.zeros((c, h0, w0), source.dtype)
    rows_in = min(hs, h0 * left) if hs >= left else hs
    cols_in = min(ws, w0 * left) if ws >= left else ws
    band = max(left, (64 * 2**20 // max(1, ws * c * source.dtype.itemsize)) // left * left)
    unreadable = 0
    for y in range(0, rows_in, band):
        y1 = min(y + band, rows_in)
        try:
            tiles = [(0, source.read_level_box(arr, y, 0, y1, cols_in))]
        except Exception:  # a damaged part of the input: read what can be read, tile by tile
            step = max(left, 256 // left * left)
            tiles = []
            for x in range(0, cols_in, step):
                try:
                    tiles.append((x, source.read_level_box(arr, y, x, y1,
                                                           min(x + step, cols_in))))
                except Exception:
                    unreadable += 1
        for x, block in tiles:
            part = block_mean(np.asarray(block), left)
            oy, ox = y // left, x // left
            h = min(part.shape[1], h0 - oy)
            w = min(part.shape[2], w0 - ox)
            first[:, oy:oy + h, ox:ox + w] = part[:, :h, :w]
    if unreadable:
        store.notices.append(f"the preview image of {store.path} leaves {unreadable} "
                             "unreadable part(s) of the input blank")
    return first


def write_preview(store: Any, source: Any, sums: PreviewSums | None = None) -> None:
    """The root image: the input, block-averaged, as many levels as the label pyramid."""
    import zarr

    from . import layout

    spec = store.spec
    n = len(layout.level_shapes(spec.height, spec.width))
    factor = preview_factor(spec.height, spec.width)
    if sums is not None and sums.factor == factor and sums.complete():
        first = sums.mean(source.dtype)
    else:
        first = _read_first_level(store, source, factor)
    c = source.channels
    levels = [first]
    for _ in range(1, n):
        levels.append(block_mean(levels[-1], 2))
    for level, data in enumerate(levels):
        data = data[0] if c == 1 else data
        dims = ("y", "x") if c == 1 else ("c", "y", "x")
        chunks = tuple(min(s, 1024) for s in data.shape)
        a = zarr.create_array(store=store.zstore, name=str(level), shape=data.shape,
                              chunks=chunks, dtype=data.dtype, fill_value=0,
                              dimension_names=dims, overwrite=True)
        a[...] = data
    files = {}
    for level in range(len(levels)):  # only the preview's own digests: others stay recorded
        files.update({k: (list(v) if v else None)
                      for k, v in store.zstore.take(f"{level}/").items()})
    store.record_published("preview", files)
    last = levels[-1]
    ranges = []
    for i in range(c):
        finite = last[i][np.isfinite(last[i])] if last.dtype.kind == "f" else last[i]
        ranges.append([float(finite.min()), float(finite.max())] if finite.size else [0.0, 1.0])
    store.preview = {"levels": n, "first_factor": factor, "channels": c, "ranges": ranges}
    store.set_attrs({"preview": store.preview})
