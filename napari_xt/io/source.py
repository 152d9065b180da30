"""`ImageSource`: one level of an image as (C, H, W) float32 region reads, plus its identity.

Accepts a `MultiscaleImage` (any axes; `level` picks the pyramid level), a path (opened with
`napari_xt.io.open_image`, with `axes` when given; a TIFF holding several image series is
refused unless an `ImagePath` chooses one), or a bare numpy / np.memmap / dask array laid
out `YX`, `YXC` or `CYX` (`axes` when it cannot be guessed: a 3-D array whose last axis is
<= 4 is `YXC`). Bare numpy arrays need neither zarr nor dask.

`read(box, size)` returns the region padded with zeros to `S x S` (layout (C, S, S) float32,
normalised `(x - mean) / std` when given) and a (S, S) bool mask of non-finite pixels, which
are replaced by 0 before the model sees them.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from .chunks import direct_reader
from .errors import ImageIOError


class ImageSource:
    """One pyramid level of an image, read region by region for the model.

    `image` is a `MultiscaleImage`, a path (opened with `open_image`, `axes` passed on) or a
    bare array (`axes` or a guess); `level` picks the pyramid level (only 0 for a bare array).
    `normalize` is a per-channel `(mean, std)` pair applied to the regions `read` returns
    (repeated to the number of channels). Raises `ValueError` for a level that does not exist,
    axes that are not `YX`, `YXC` or `CYX`, or a non-numeric dtype."""

    def __init__(
        self,
        image: Any,
        level: int = 0,
        axes: str | None = None,
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        self.path: str | None = None
        self.inputs: tuple[str, ...] = ()  # local files / folders the pixels come from
        if isinstance(image, (str, os.PathLike)):
            from napari_xt.io import open_image

            self.path = os.path.abspath(os.fspath(image))
            image = open_image(image, series=None, axes=axes)  # an ImagePath: its own
        levels = getattr(image, "levels", None)
        self.channel_names: tuple[str, ...] | None = None
        if levels is not None:  # a MultiscaleImage
            if not 0 <= level < len(levels):
                raise ValueError(f"level {level} does not exist ({len(levels)} levels)")
            self.array, self.axes = levels[level], image.axes
            self.path = self.path or str(getattr(image, "source", "array"))
            self.pixel_size = getattr(image, "pixel_size", None)
            self.unit = getattr(image, "unit", None)
            self.channel_names = getattr(image, "channel_names", None)
            self.inputs = tuple(getattr(image, "paths", ()))
            self.pyramid = list(levels[level:])  # this level and the coarser ones
            base = levels[0].shape
        else:
            if level != 0:
                raise ValueError("a bare array has only level 0")
            self.array = image
            self.axes = axes or _guess_axes(tuple(image.shape))
            self.pixel_size = self.unit = None
            self.pyramid = [image]
            filename = getattr(image, "filename", None)  # np.memmap
            if filename:
                self.inputs = (os.path.abspath(filename),)
            base = image.shape
        if self.path is not None and os.path.exists(self.path):
            self.inputs = tuple(dict.fromkeys((*self.inputs, self.path)))
        self.level = int(level)
        if self.axes not in ("YX", "YXC", "CYX") or len(self.axes) != len(self.array.shape):
            raise ValueError(f"image of shape {tuple(self.array.shape)} with axes {self.axes!r}: "
                             "expected YX, YXC or CYX")
        shape = tuple(int(n) for n in self.array.shape)
        self.height, self.width = shape[self.axes.index("Y")], shape[self.axes.index("X")]
        self.channels = shape[self.axes.index("C")] if "C" in self.axes else 1
        self.dtype = np.dtype(self.array.dtype)
        iy, ix = self.axes.index("Y"), self.axes.index("X")
        # level-0 pixels per pixel of this level, (y, x)
        self.scale = (base[iy] / self.height, base[ix] / self.width)
        if self.dtype.kind not in "uif":
            raise ValueError(f"image dtype {self.dtype} is not numeric")
        self.mean = self.std = None
        self.observer: Any = None  # gets every region's raw pixels (the store's preview)
        self.tile_cache_bytes = 256 * 2**20
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        # tiles are views of the band read with them: a band's memory counts until its
        # last tile leaves the cache (id(band) -> [tiles still cached, bytes])
        self._band_of: dict[tuple[int, int], int] = {}
        self._bands: dict[int, list[int]] = {}
        self._tile_bytes = 0
        self._lock = threading.Lock()
        self._reading: dict[tuple[int, int], threading.Event] = {}  # tiles being read
        self._span = 1  # tiles read at once along a row (set by `fit_tile_cache`)
        self._tile = _regular_tile(self.array, self.axes)
        if normalize is not None:
            mean, std = normalize
            self.mean = np.resize(np.asarray(mean, np.float32), self.channels)[:, None, None]
            self.std = np.resize(np.asarray(std, np.float32), self.channels)[:, None, None]

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of this level in pixels."""
        return self.height, self.width

    def fit_tile_cache(self, width: int, height: int, floor: int = 16 * 2**20,
                       ceiling: int = 2**30) -> int:
        """Size the tile cache to a `height` x `width` px working set (what the read order
        touches at once: a strip's width, a few crop rows), so that it no longer grows
        with the image up to a fixed cap. Returns the new size in bytes."""
        if self._tile is not None:
            ty, tx = self._tile
            tiles = (-(-min(width, self.width) // tx) + 1) * (-(-min(height, self.height) // ty)
                                                             + 1)
            need = tiles * ty * tx * self.channels * self.dtype.itemsize
            self.tile_cache_bytes = int(min(max(need, floor), ceiling))
            self._span = -(-min(width, self.width) // tx) + 1
        return self.tile_cache_bytes

    def _tiled(self, h: int, w: int) -> bool:
        """Boxes of h x w pixels are read through the tile cache."""
        return self._tile is not None and not (h >= self._tile[0] and w >= self._tile[1])

    def read_box(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] as (C, h, w) in the source dtype (through the tile cache
        when the source is chunked in tiles larger than the box)."""
        if not self._tiled(y1 - y0, x1 - x0):
            return self._read_raw(y0, x0, y1, x1)
        out = np.empty((self.channels, y1 - y0, x1 - x0), self.dtype)
        self._copy_tiles(y0, x0, y1, x1, out)
        return out

    def _copy_tiles(self, y0: int, x0: int, y1: int, x1: int, out: np.ndarray) -> None:
        """Copy (casting to out's dtype) pixels [y0:y1, x0:x1] from the tile cache."""
        ty, tx = self._tile
        for by in range(y0 // ty, (y1 - 1) // ty + 1):
            for bx in range(x0 // tx, (x1 - 1) // tx + 1):
                tile = self._tile_block(by, bx)
                ya, yb = max(y0, by * ty), min(y1, (by + 1) * ty)
                xa, xb = max(x0, bx * tx), min(x1, (bx + 1) * tx)
                out[:, ya - y0:yb - y0, xa - x0:xb - x0] = \
                    tile[:, ya - by * ty:yb - by * ty, xa - bx * tx:xb - bx * tx]

    def _tile_block(self, by: int, bx: int) -> np.ndarray:
        """Tile (by, bx) from the LRU tile cache. A tile another thread is already reading
        is waited for, not read again (the reader thread and a direct read of the compute
        thread often want the same tile at the same moment). A missing tile is read together
        with the missing tiles to its right in the same tile row, up to the strip's width
        (`fit_tile_cache`): one read of a band of tiles lets the store decode its chunks
        concurrently (about twice as fast as tile by tile on 2 cores)."""
        key = (by, bx)
        while True:
            with self._lock:
                tile = self._tiles.get(key)
                if tile is not None:
                    self._tiles.move_to_end(key)
                else:
                    pending = self._reading.get(key)
                    if pending is None:
                        run = self._claim_run(by, bx)
                        break  # this thread reads them
            if tile is not None:
                if self.observer is not None:  # (it may have been read before watching)
                    self.observer.add(by * self._tile[0], bx * self._tile[1], tile)
                return tile
            pending.wait()  # then take it from the cache (or read it, if already evicted)
        claimed = run
        try:
            ty, tx = self._tile
            y1 = min((by + 1) * ty, self.height)
            try:
                band = self._read_raw(by * ty, bx * tx, y1, min((bx + run) * tx, self.width))
            except Exception:
                if run == 1:
                    raise
                # one bad tile must fail only the regions on it (and be the one named)
                run = 1
                band = self._read_raw(by * ty, bx * tx, y1, min((bx + 1) * tx, self.width))
            tiles = [band[:, :, j * tx:(j + 1) * tx] for j in range(run)]
            if self.observer is not None:
                for j, t in enumerate(tiles):
                    self.observer.add(by * ty, (bx + j) * tx, t)
            with self._lock:
                band_id = id(band)
                self._bands[band_id] = [run, band.nbytes]
                self._tile_bytes += band.nbytes
                for j, t in enumerate(tiles):
                    self._tiles[(by, bx + j)] = t
                    self._band_of[(by, bx + j)] = band_id
                while self._tile_bytes > self.tile_cache_bytes and len(self._tiles) > run:
                    old, _ = self._tiles.popitem(last=False)
                    old_band = self._band_of.pop(old)
                    entry = self._bands[old_band]
                    entry[0] -= 1
                    if entry[0] == 0:  # the band's last tile: its memory is free
                        self._tile_bytes -= entry[1]
                        del self._bands[old_band]
        finally:
            with self._lock:
                for j in range(claimed):
                    self._reading.pop((by, bx + j)).set()
        return tiles[0]

    def _claim_run(self, by: int, bx: int) -> int:
        """(under the lock) Mark tile (by, bx) and the uncached, unclaimed tiles right of it
        in its row, up to the read span and a quarter of the cache, as being read by this
        thread; returns how many."""
        ty, tx = self._tile
        cols = -(-self.width // tx)
        tile_bytes = ty * tx * self.channels * self.dtype.itemsize
        most = max(1, min(self._span, self.tile_cache_bytes // 4 // max(tile_bytes, 1)))
        run = 1
        while (run < most and bx + run < cols and (by, bx + run) not in self._tiles
               and (by, bx + run) not in self._reading):
            run += 1
        for j in range(run):
            self._reading[(by, bx + j)] = threading.Event()
        return run

    def _read_raw(self, y0: int, x0: int, y1: int, x1: int, array: Any = None) -> np.ndarray:
        array = self.array if array is None else array
        direct = direct_reader(array)  # a store's own array: read it without a dask graph
        if direct is not None:
            array = direct
        if self.axes == "YX":
            block = array[y0:y1, x0:x1][None]
        elif self.axes == "YXC":
            block = np.moveaxis(np.asarray(array[y0:y1, x0:x1, :]), -1, 0)
        else:
            block = array[:, y0:y1, x0:x1]
        if hasattr(block, "compute"):
            block = block.compute(scheduler="synchronous")  # in this thread: no pool hand-off
        return np.asarray(block)

    def coarser(self, factor: int) -> tuple[Any, int, tuple[int, int]]:
        """(array, factor left, (height, width)): the coarsest pyramid level of this image
        that is an exact power-of-two `f` <= `factor` times smaller than this level (this
        level itself when none is), and `factor // f`, for reading an overview cheaply."""
        iy, ix = self.axes.index("Y"), self.axes.index("X")
        best, best_f = (self.array, (self.height, self.width)), 1
        for arr in self.pyramid[1:]:
            h, w = int(arr.shape[iy]), int(arr.shape[ix])
            f = self.height // max(h, 1)
            exact = f >= 2 and f & (f - 1) == 0 and self.height // f == h and self.width // f == w
            if exact and factor % f == 0 and f > best_f:
                best, best_f = (arr, (h, w)), f
        return best[0], factor // best_f, best[1]

    def read_level_box(self, array: Any, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] of another level `array` of this image as (C, h, w)."""
        return self._read_raw(y0, x0, y1, x1, array)

    def read(self, box: tuple[int, int, int, int], size: int) -> tuple[np.ndarray, np.ndarray]:
        """A region box (y0, x0, y1, x1) -> ((C, S, S) float32 zero-padded, (S, S) bool
        mask of non-finite pixels)."""
        out = np.empty((self.channels, size, size), np.float32)
        bad = self.read_into(box, out)
        return out, np.zeros((size, size), bool) if bad is None else bad

    def read_into(self, box: tuple[int, int, int, int], out: np.ndarray) -> np.ndarray | None:
        """Read a region box (y0, x0, y1, x1) into `out` (C, S, S) float32: normalised,
        zero-padded, non-finite pixels set to 0. Returns their (S, S) mask, or None when
        every pixel is finite (the usual case: no mask is made)."""
        return self.finish(out[None], [self.fill(box, out)])[0]

    def fill(self, box: tuple[int, int, int, int], out: np.ndarray) -> tuple[int, int]:
        """The raw pixels of a region box into `out` (C, S, S) (cast to its dtype), the rest
        zero; `finish` then normalises. Returns the box's (h, w)."""
        y0, x0, y1, x1 = box
        h, w = y1 - y0, x1 - x0
        size = out.shape[-1]
        if h < size or w < size:
            out[...] = 0.0
        inner = out[:, :h, :w]
        if self._tiled(h, w):  # straight from the cached tiles (the observer saw them)
            self._copy_tiles(y0, x0, y1, x1, inner)
        else:
            block = self._read_raw(y0, x0, y1, x1)
            if self.observer is not None:
                self.observer.add(y0, x0, block)
            inner[...] = block  # cast to float32 in the copy
        return h, w

    def finish(self, out: np.ndarray, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray | None]:
        """Regions filled by `fill` (n, C, S, S), of `sizes` (h, w) each, made what the model
        sees: non-finite pixels set to 0, normalised, the padding beyond (h, w) kept 0 - in
        whole-batch operations. Returns per region the (S, S) mask of its non-finite pixels,
        or None when every pixel is finite (the usual case: no mask is made)."""
        masks: list[np.ndarray | None] = [None] * len(sizes)
        # a finite sum means every pixel is finite (NaN and inf propagate); only when it is
        # not (or it overflowed) are the regions looked at one by one
        if self.dtype.kind == "f" and not np.isfinite(out.sum()):
            for n in range(len(sizes)):
                if not np.isfinite(out[n]).all():
                    finite = np.isfinite(out[n])
                    masks[n] = ~finite.all(axis=0)
                    out[n][~finite] = 0.0
        if self.mean is not None:
            out -= self.mean
            out /= self.std
            size = out.shape[-1]
            for n, (h, w) in enumerate(sizes):
                if h < size:
                    out[n, :, h:, :] = 0.0
                if w < size:
                    out[n, :, :, w:] = 0.0
                if masks[n] is not None:
                    out[n][:, masks[n]] = 0.0
        return masks

    def identity(self, samples: int = 4, size: int = 64) -> dict[str, Any]:
        """Path, shape, dtype, level and a SHA-256 fingerprint of a few sampled patches
        (corners and centre, `size` px), so a changed file is not mistaken for the old one."""
        h = hashlib.sha256()
        s = min(size, self.height, self.width)
        ys = [0, self.height - s, (self.height - s) // 2, 0][:samples]
        xs = [0, self.width - s, (self.width - s) // 2, self.width - s][:samples]
        for y, x in zip(ys, xs):
            h.update(np.ascontiguousarray(self.read_box(y, x, y + s, x + s)).tobytes())
        return {"path": self.path or "array", "shape": [self.height, self.width, self.channels],
                "dtype": self.dtype.str, "level": self.level, "fingerprint": h.hexdigest()[:32]}


def _regular_tile(array: Any, axes: str) -> tuple[int, int] | None:
    """(ty, tx) of a dask array's chunks when regular, else None (read boxes directly)."""
    chunks = getattr(array, "chunks", None)
    if not isinstance(chunks, tuple) or not chunks or not isinstance(chunks[0], tuple):
        return None
    cy, cx = chunks[axes.index("Y")], chunks[axes.index("X")]
    if len(cy) < 1 or len(cx) < 1 or len(set(cy[:-1])) > 1 or len(set(cx[:-1])) > 1:
        return None
    return int(cy[0]), int(cx[0])


def _guess_axes(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        return "YXC" if shape[-1] <= 4 else "CYX"
    raise ImageIOError(f"cannot guess the axes of an array of shape {shape}", remedy="axes")
