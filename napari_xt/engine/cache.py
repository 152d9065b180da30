"""`EmbeddingCache`: region features saved in zarr so later runs skip the region encoder.

The expensive stage of xT is the region encoder; the context encoder and the heads are cheap.
The cache keeps every region's multi-level features (fp16, one chunk per region and level:
`level_<l>` arrays of shape (rows, cols, C_l, h_l, w_l)) plus a `done` (rows, cols) bool
array. It is valid only for the exact inputs of the encoder, recorded as its signature:
image identity (path, shape, dtype, level, content fingerprint), normalisation, model hash,
region size and package version. Changing context settings, thresholds or outputs reuses
it. A cache with another signature is never used silently: `CacheMismatchError` names what
differs, or with `rebuild=True` it is emptied and the caller reports a notice.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class CacheMismatchError(ValueError):
    """The embedding cache at a path was made for another image or model."""


class EmbeddingCache:
    def __init__(self, path: str | os.PathLike, signature: dict[str, Any],
                 grid: tuple[int, int], rebuild: bool = False) -> None:
        import zarr

        self.path = Path(path)
        self.signature = json.loads(json.dumps(signature))
        self.grid = (int(grid[0]), int(grid[1]))
        self.rebuilt = False
        old = _read_signature(self.path)
        if old is not None and old != self.signature:
            diff = sorted(k for k in set(old) | set(self.signature)
                          if old.get(k) != self.signature.get(k))
            if not rebuild:
                raise CacheMismatchError(
                    f"embedding cache {self.path} was made for another input (differs in: "
                    f"{', '.join(diff)}); use cache='rebuild' to replace it or cache=False")
            shutil.rmtree(self.path)
            self.rebuilt = True
        elif old is None and self.path.exists() and any(self.path.iterdir()):
            if not rebuild:
                raise CacheMismatchError(f"{self.path} exists and is not an embedding cache")
            shutil.rmtree(self.path)
            self.rebuilt = True
        self.group = zarr.open_group(str(self.path), mode="a", zarr_format=3)
        if old is None or self.rebuilt:
            self.group.attrs["napari-xt-cache"] = {"signature": self.signature}
        done = self._get("done")
        if done is None or tuple(done.shape) != self.grid:
            done = self.group.create_array("done", shape=self.grid, dtype=bool, fill_value=False,
                                           chunks=self.grid, overwrite=True)
        self._done_array = done
        self.done = np.asarray(done[...], dtype=bool)  # (rows, cols) in memory
        self.levels: list[Any] | None = None
        if self.done.any():
            self.levels = self._level_arrays()

    def _get(self, name: str) -> Any:
        try:
            return self.group[name]
        except KeyError:
            return None

    def _level_arrays(self) -> list[Any]:
        out, i = [], 0
        while (a := self._get(f"level_{i}")) is not None:
            out.append(a)
            i += 1
        return out

    def has(self, row: int, col: int) -> bool:
        return bool(self.done[row, col])

    def get(self, indices: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Features of `indices`: per level (n, C_l, h_l, w_l) float16."""
        assert self.levels is not None
        return [np.stack([np.asarray(a[r, c]) for r, c in indices]) for a in self.levels]

    def put(self, indices: Sequence[tuple[int, int]], features: Sequence[np.ndarray]) -> None:
        """features: per level (n, C_l, h_l, w_l) (any float dtype; stored fp16)."""
        if self.levels is None or len(self.levels) != len(features):
            self.levels = [
                self.group.create_array(
                    f"level_{i}", shape=(*self.grid, *f.shape[1:]), dtype=np.float16,
                    chunks=(1, 1, *f.shape[1:]), fill_value=0.0, compressors=None,
                    overwrite=True)
                for i, f in enumerate(features)
            ]
        for n, (r, c) in enumerate(indices):
            for a, f in zip(self.levels, features):
                a[r, c] = f[n].astype(np.float16)
            self.done[r, c] = True
        self._done_array[...] = self.done


    def bytes_per_region(self) -> int:
        """Disk bytes one region's features take (fp16, uncompressed); 0 before the first
        `put` of a new cache."""
        if not self.levels:
            return 0
        return sum(2 * int(np.prod(a.shape[2:])) for a in self.levels)

    def size_notice(self) -> tuple[str, bool]:
        """(message, fits): the disk the rest of the cache will take against the free space
        where it lives."""
        missing = int(self.done.size - self.done.sum())
        each = self.bytes_per_region()
        need = missing * each
        free = shutil.disk_usage(self.path).free
        fits = need < free
        msg = (f"embedding cache {self.path}: about {_size(need)} more for {missing} regions "
               f"({_size(each)} each), {_size(free)} free")
        if not fits:
            msg += ("; it will NOT fit: the run stops with an error when the disk is full "
                    "(finished regions are kept); predict with cache=False (--no-cache) or "
                    "free some space")
        return msg, fits


def _size(n: float) -> str:
    """Bytes as B / KB / MB / GB (1024-based)."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            break
    return f"{n:.1f} {unit}"


def _read_signature(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("attributes", {}).get("napari-xt-cache", {}).get("signature")
