"""`open_result(path)`: read a result store written earlier, or being written, by any run.

For widgets, tools and tests: the persisted region status (from the journal: regions whose
commit is recorded are done, without re-verifying their files, which only a writer does),
the level-0 tiles of done regions and the level-0 arrays. Nothing is written and no
lock is taken; the published results themselves are read with `napari_xt.io` (`read_labels`,
`read_detections`, ...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .layout import PRIVATE, Index, Tiling, root_attrs, store_kind
from .spec import DONE, FAILED, PENDING, StoreError


class ResultReader:
    """A read-only view of the result store at `path`: `attrs` (the root's "napari-xt" attributes
    as they were when opened), `tiling`, the region `grid` and `outputs` (output name ->
    store-relative path of its level-0 array). Raises StoreError when `path` is not a result
    store of this format."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        kind = store_kind(self.path)
        if kind != "store":
            raise StoreError(f"{self.path} is not a napari-xt result store"
                             + (" (it was written by an older napari-xt)" if kind == "legacy"
                                else ""))
        self.attrs: dict[str, Any] = root_attrs(self.path) or {}
        t = self.attrs["tiling"]
        self.tiling = Tiling(int(t["height"]), int(t["width"]), int(t["region_size"]),
                             tuple(t["chunk"]), tuple(t["shard"]))
        s = self.tiling.region_size
        self.grid = (-(-self.tiling.height // s), -(-self.tiling.width // s))
        self.outputs: dict[str, str] = dict(self.attrs.get("outputs", {}))

    @property
    def default_cache(self) -> Path:
        """Where runs into this store keep their embedding cache (by default)."""
        from .layout import default_cache

        return default_cache(self.path)

    @property
    def complete(self) -> bool:
        """Whether the store holds the finished, published results of every region (its
        "complete" attribute when it was opened)."""
        return bool(self.attrs.get("complete"))

    @property
    def signature(self) -> dict[str, Any]:
        """The run signature of the run that wrote the store."""
        return dict(self.attrs.get("run_signature", {}))

    def _records(self) -> list[dict[str, Any]]:
        from napari_xt.io.journal import Journal

        return Journal(self.path / PRIVATE / "journal").records()

    def region_status(self) -> np.ndarray:
        """(rows, cols) uint8: DONE, FAILED or PENDING, as the journal records them."""
        out = np.full(self.grid, PENDING, np.uint8)
        for rec in self._records():
            if rec.get("t") == "shard":
                if rec.get("complete"):
                    regions = self.tiling.regions_of(int(rec["k"][0]), int(rec["k"][1]))
                else:
                    regions = [(int(r), int(c)) for r, c in rec.get("regions", [])]
                for idx in regions:
                    out[idx] = DONE
                for r, c in rec.get("tainted", []):  # decoded beside a failed region:
                    out[int(r), int(c)] = PENDING  # the next run computes them again
            elif rec.get("t") == "failed":
                for r, c in rec.get("regions", []):
                    if out[int(r), int(c)] != DONE:
                        out[int(r), int(c)] = FAILED
        return out

    def done_regions(self) -> list[Index]:
        """(row, col) of every region the journal records as done."""
        return [(int(r), int(c)) for r, c in np.argwhere(self.region_status() == DONE)]

    def read_region(self, name: str, idx: Index) -> np.ndarray | None:
        """Level-0 tile of output `name` ("labels" | "probabilities") of a region; None
        when the store has no such output or the region is not done (as the journal read at
        the first call records it): a region not done has no tile, never zeros."""
        import zarr

        if name not in self.outputs:
            return None
        if getattr(self, "_status", None) is None:
            self._status = self.region_status()
        if self._status[tuple(idx)] != DONE:
            return None
        s = self.tiling.region_size
        y0, x0 = idx[0] * s, idx[1] * s
        y1, x1 = min(y0 + s, self.tiling.height), min(x0 + s, self.tiling.width)
        arr = zarr.open_array(str(self.path / self.outputs[name]), mode="r")
        return np.asarray(arr[..., y0:y1, x0:x1])

    def level0(self, name: str):
        """The level-0 zarr array of output `name` (read-only), or None."""
        import zarr

        if name not in self.outputs:
            return None
        return zarr.open_array(str(self.path / self.outputs[name]), mode="r")


def open_result(path: str | os.PathLike) -> ResultReader:
    """A `ResultReader` of the store at `path`; raises StoreError when it is not a napari-xt
    result store."""
    return ResultReader(path)
