"""Dask arrays over chunked stores, chunked like the store, with errors that name the chunk.

`lazy_array(arr, where)` wraps any array-like with `shape`, `dtype`, `chunks` and
`__getitem__` (a zarr array, tifffile's zarr view of a TIFF level) as a dask array whose
chunks are the store's own chunks (TIFF tiles), so a region read decodes only the tiles it
covers. A chunk that fails to decode raises `ImageIOError` naming the level and chunk index.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from .errors import ImageIOError


class ChunkReader:
    """Array-like view of a store array whose reads report the failing chunk by index."""

    def __init__(self, array: Any, where: str, chunks: Sequence[int]):
        self.array = array
        self.where = where
        self.chunk_shape = tuple(int(c) for c in chunks)
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return np.asarray(self.array[key])
        except ImageIOError:
            raise
        except Exception as err:  # decoding failures come in many types
            raise ImageIOError(
                f"{self.where}: cannot read chunk {self._chunk_index(key)} "
                f"(chunk shape {self.chunk_shape}): {type(err).__name__}: {err}"
            ) from err

    def _chunk_index(self, key: Any) -> tuple[int, ...]:
        if not isinstance(key, tuple):
            key = (key,)
        index = []
        for k, c in zip(key, self.chunk_shape):
            start = (k.start or 0) if isinstance(k, slice) else int(k)
            index.append(int(start) // max(c, 1))
        return tuple(index)


# the reader under each dask array made by lazy_array, by the array's name (its graph holds
# the reader, so the entry lives exactly as long as some array of that name)
_READERS: weakref.WeakValueDictionary[str, ChunkReader] = weakref.WeakValueDictionary()


def direct_reader(array: Any) -> ChunkReader | None:
    """The reader under `array` when `array` is exactly what `lazy_array` made (no operation
    on top: any would give it another name), so that a box can be read without building and
    running a dask graph (about 3 ms a 512^2 tile, as much as decoding it); else None."""
    name = getattr(array, "name", None)
    reader = _READERS.get(name) if isinstance(name, str) else None
    if reader is None or tuple(array.shape) != reader.shape:
        return None
    return reader


def lazy_array(array: Any, where: str, chunks: Sequence[int] | None = None) -> da.Array:
    """A dask array reading `array` chunk by chunk (chunks default to `array.chunks`)."""
    if 0 in tuple(array.shape):
        raise ImageIOError(f"{where}: array has zero size (shape {tuple(array.shape)})")
    chunk_shape = tuple(chunks) if chunks is not None else tuple(array.chunks)
    reader = ChunkReader(array, where, chunk_shape)
    name = "xt-read-" + tokenize(where, id(array), reader.shape, reader.dtype.str, chunk_shape)
    _READERS[name] = reader
    return da.from_array(
        reader,
        chunks=chunk_shape,
        name=name,
        lock=False,
        asarray=False,
        fancy=False,
        meta=np.empty((0,) * reader.ndim, dtype=reader.dtype),
    )


def window_of(key: Any, shape: Sequence[int]) -> tuple[int, int, int, int, tuple[Any, ...]]:
    """(y0, y1, x0, x1, rest) of an index on a (Y, X, ...) array-like: the Y and X slices
    (or integers) clipped as numpy clips them; `rest` indexes the window read there, (Y, X)
    steps and integer picks included, then the other axes."""
    key = key if isinstance(key, tuple) else (key,)
    key = key + (slice(None),) * (len(shape) - len(key))
    bounds, rest = [], []
    for k, n in zip(key[:2], shape[:2]):
        if isinstance(k, slice):
            start, stop, step = k.indices(int(n))
            if step < 1:
                raise IndexError("slide levels are read with positive steps only")
            stop = max(start, stop)
            bounds += [start, stop]
            rest.append(slice(None, None, step))
        else:
            i = int(k) + (int(n) if int(k) < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {k} is out of bounds for size {n}")
            bounds += [i, i + 1]
            rest.append(0)
    return bounds[0], bounds[1], bounds[2], bounds[3], tuple(rest) + tuple(key[2:])


def default_chunks(shape: Sequence[int], axes: str, size: int = 1024) -> tuple[int, ...]:
    """Chunks for arrays with no native tiling: `size` along Y and X, whole other axes."""
    return tuple(min(int(s), size) if a in "YX" else int(s) for s, a in zip(shape, axes))
