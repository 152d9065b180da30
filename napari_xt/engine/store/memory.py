"""`MemoryStore`: a run's results in numpy arrays (`store=None`): nothing persisted, nothing
to resume, no zarr or dask needed. Same interface as `DiskStore` for the engine; detections
are found once, over the whole centre map, when asked for."""

from __future__ import annotations

from typing import Any

import numpy as np

from .layout import Index
from .spec import DONE, FAILED, PENDING, RegionTiles, StoreSpec


class InMemory:
    """What a store that persists nothing does: no path, nothing to resume, nothing to wait
    for; `put` and the arrays are the subclass's."""

    path = None
    resumed = False
    complete = False
    changed = True

    def start(self) -> None:
        """Nothing to start: there is no writer thread."""
        pass

    def check(self) -> None:
        """Nothing can fail in the background: never raises."""
        pass

    def drain(self) -> list[tuple[tuple[Index, ...], float]]:
        """The (indices, seconds) batches put since the last call (readable since they were put)."""
        out, self._written = self._written, []
        return out

    def flush(self) -> None:
        """Nothing to commit."""
        pass

    def stop_writer(self) -> None:
        """Nothing to stop: there is no writer thread."""
        pass

    def attrs(self) -> dict[str, Any]:
        """No attributes are kept: always {}."""
        return {}

    def set_attrs(self, values: dict[str, Any]) -> None:
        """Does nothing: no attributes are kept."""
        pass

    def close(self) -> None:
        """Nothing to release."""
        pass


class MemoryStore(InMemory):
    """A run's results in numpy arrays, the outputs `spec` asks for: `arrays` "labels" (H, W),
    "probabilities" (K, H, W) float16, "heat" (K_h [+ 1 size], H, W) float32; `done` and `failed`
    (rows, cols) masks; `crop_logits` of a classifier's crops."""

    def __init__(self, spec: StoreSpec) -> None:
        self.spec = spec
        self.grid = spec.grid
        self.notices: list[str] = []
        h, w = spec.height, spec.width
        self.arrays: dict[str, np.ndarray] = {}
        if spec.writes_labels:
            self.arrays["labels"] = np.zeros((h, w), spec.label_dtype)
        if spec.writes_probabilities:
            self.arrays["probabilities"] = np.zeros((spec.prob_channels, h, w), np.float16)
        if spec.writes_detections:
            k = spec.heat_channels + int(spec.has_size)
            self.arrays["heat"] = np.zeros((k, h, w), np.float32)
        self.done = np.zeros(self.grid, bool)
        self.failed = np.zeros(self.grid, bool)
        self.crop_logits: dict[int, list[float]] = {}
        self._written: list[tuple[tuple[Index, ...], float]] = []

    def put(self, tiles: RegionTiles) -> None:
        """Copies the final tiles of a batch of regions into the arrays (cropped to the image);
        the regions are done and readable at once."""
        for n, idx in enumerate(tiles.indices):
            y0, x0, y1, x1 = self.spec.box(*idx)
            for name, batch in tiles.arrays.items():
                if name in self.arrays:
                    self.arrays[name][..., y0:y1, x0:x1] = batch[n][..., : y1 - y0, : x1 - x0]
            self.done[idx] = True
            self.failed[idx] = False
        self._written.append((tuple(tiles.indices), tiles.seconds))

    def put_failed(self, indices: list[Index], reason: str) -> None:
        """Marks regions `indices` failed (the reason is not kept)."""
        for idx in indices:
            self.failed[idx] = True

    def put_crop(self, index: int, logits: np.ndarray) -> None:
        """Keeps the logits (K,) of a classifier's crop `index` in `crop_logits`."""
        self.crop_logits[int(index)] = [float(v) for v in np.asarray(logits).ravel()]

    def region_status(self) -> np.ndarray:
        """(rows, cols) uint8 status of every region: DONE, FAILED or PENDING."""
        out = np.full(self.grid, PENDING, np.uint8)
        out[self.failed] = FAILED
        out[self.done] = DONE
        return out

    def read_region(self, name: str, idx: Index) -> np.ndarray | None:
        """A copy of the `name` output ("labels" | "probabilities") of region `idx`, or None when
        the region is not done or the output is not written."""
        if name not in self.arrays or name == "heat" or not self.done[idx]:
            return None
        y0, x0, y1, x1 = self.spec.box(*idx)
        return self.arrays[name][..., y0:y1, x0:x1].copy()

    def points(self) -> np.ndarray:
        """Max-pool NMS over the whole centre map (regions not done are zeros)."""
        from napari_xt.model.heads import POINT_DTYPE

        from .peaks import sort_points, sparse_points

        heat = self.arrays.get("heat")
        if heat is None:
            return np.empty(0, POINT_DTYPE)
        return sort_points(sparse_points(heat, self.spec.heat_channels, self.spec.has_size,
                                         self.spec.threshold, self.spec.min_distance))

    def points_since(self, cursor: int) -> tuple[np.ndarray | None, int]:
        """No live detections in memory (`points` finds them at the end): always (None,
        `cursor`)."""
        return None, cursor
