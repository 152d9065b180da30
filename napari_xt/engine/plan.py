"""`RegionPlan`: the region grid of one image level, the crops the model runs on, their order.

Regions are `S x S` squares (S = the model's region size) on a `rows x cols` grid, padded at
the right/bottom edge. A crop is a block of up to `k x k` regions (k = the model's
`crop_regions`, the context it was trained with); with fewer than k regions along an axis one
crop spans that axis. Crops start every `stride` regions (default `max(1, k // 2)`: every
interior region boundary lies strictly inside some crop while each region is in at most 4
crops; `stride=1` gives the densest overlap, `stride=k` none) and the last start along each
axis is pulled back so the crops end on the grid edge.

Overlapping crops are blended (their context tokens, averaged over each token's pixels, or
their outputs; see `engine.crops`) with a separable window: sin^2 over pixel centres,
peaking at the crop centre and falling to nearly 0 at crop edges inside the image, so a
crop's contribution fades out before it ends; on a side where the crop touches the image
border the window stays at 1 from the peak to the border (only that crop covers those
pixels). A floor `WINDOW_FLOOR` keeps every weight positive. Weights are normalised per
pixel, so there are no seams where crops end.

Orders: ``raster`` and ``zigzag`` walk vertical strips of `strip_width` crop columns, row by
row inside a strip (zigzag reverses every other row), so the regions alive in memory stay
bounded by about (strip_width + k) x k whatever the image size; ``viewport`` visits crops by
distance of their centre to a (y, x) pixel point, nearest first (`ViewportOrder` re-sorts
the rest when the point moves).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from napari_xt.io.box import Box

ORDERS = ("raster", "zigzag", "viewport")
WINDOW_FLOOR = 1e-3


@dataclass(frozen=True)
class Crop:
    """Regions [row0, row0 + rows) x [col0, col0 + cols) of the grid."""

    index: int
    row0: int
    col0: int
    rows: int
    cols: int

    def regions(self) -> list[tuple[int, int]]:
        """(row, col) of the crop's regions, raster order."""
        return [(self.row0 + i, self.col0 + j) for i in range(self.rows) for j in range(self.cols)]

    def contains(self, row: int, col: int) -> bool:
        """Whether region (row, col) is one of the crop's."""
        return self.row0 <= row < self.row0 + self.rows and self.col0 <= col < self.col0 + self.cols


def default_stride(k: int) -> int:
    """The default crop stride of k-region crops: max(1, k // 2) regions (every interior
    region boundary lies inside some crop, away from its edges)."""
    return max(1, int(k) // 2)


def crop_starts(n: int, k: int, stride: int) -> list[int]:
    """First region of every crop along an axis of `n` regions: every `stride` regions,
    the last one ending at the far border (one crop at 0 when the axis fits one)."""
    if n <= k:
        return [0]
    starts = list(range(0, n - k + 1, stride))
    if starts[-1] != n - k:
        starts.append(n - k)
    return starts


def window_1d(length: int, flat_start: bool = False, flat_end: bool = False,
              floor: float = WINDOW_FLOOR) -> np.ndarray:
    """(length,) float32 sin^2 window over pixel centres, max 1 at the middle, min >= floor;
    `flat_start` / `flat_end`: 1 from the middle to that end (a side on the image border)."""
    t = (np.arange(length, dtype=np.float64) + 0.5) / length
    w = floor + (1.0 - floor) * np.sin(np.pi * t) ** 2
    if flat_start:
        w[t < 0.5] = 1.0
    if flat_end:
        w[t >= 0.5] = 1.0
    return w.astype(np.float32)


class RegionPlan:
    """Grid, crops and crop windows for an image level of `height x width` pixels."""

    def __init__(
        self,
        height: int,
        width: int,
        region_size: int,
        crop_regions: int | None = 1,
        stride: int | None = None,
        strip_width: int = 16,
    ) -> None:
        if min(height, width, region_size) <= 0:
            raise ValueError(f"bad plan: image {height}x{width}, region size {region_size}")
        from napari_xt.model.tokenizer import RegionGrid

        self.regions = RegionGrid(int(height), int(width), int(region_size))  # rows, boxes
        self.height, self.width, self.region_size = int(height), int(width), int(region_size)
        self.k = max(1, int(crop_regions or 1))
        self.stride = default_stride(self.k) if stride is None else int(stride)
        if not 1 <= self.stride <= self.k:
            raise ValueError(f"crop stride must be in [1, {self.k}] regions, got {stride}")
        if strip_width < 1:
            raise ValueError(f"strip_width must be >= 1, got {strip_width}")
        self.strip_width = int(strip_width)
        self.rows, self.cols = self.regions.rows, self.regions.cols
        row_starts = crop_starts(self.rows, self.k, self.stride)
        col_starts = crop_starts(self.cols, self.k, self.stride)
        kr, kc = min(self.k, self.rows), min(self.k, self.cols)
        self.crop_grid = (len(row_starts), len(col_starts))
        self.crops = [
            Crop(i * len(col_starts) + j, r0, c0, kr, kc)
            for i, r0 in enumerate(row_starts)
            for j, c0 in enumerate(col_starts)
        ]
        cover = np.zeros((self.rows, self.cols), np.int32)
        for c in self.crops:
            cover[c.row0:c.row0 + c.rows, c.col0:c.col0 + c.cols] += 1
        self.coverage = cover  # (rows, cols) number of crops covering each region
        self._windows: dict[tuple[int, bool, bool], np.ndarray] = {}

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the region grid."""
        return self.rows, self.cols

    @property
    def num_regions(self) -> int:
        """The number of regions of the grid, rows * cols."""
        return self.rows * self.cols

    def position_in_crop(self, row: int, col: int) -> tuple[int, int]:
        """The position the model is given for region (row, col): relative to the corner of
        the first crop that covers it (the engine passes crop-relative positions)."""
        crop = next(c for c in self.crops if c.contains(row, col))
        return row - crop.row0, col - crop.col0

    def box(self, row: int, col: int) -> Box:
        """Pixel box of a region, clipped to the image."""
        return Box(*self.regions.box(row, col))

    def _axis_window(self, n: int, start: int, total: int) -> np.ndarray:
        key = (n, start == 0, start + n == total)
        if key not in self._windows:
            self._windows[key] = window_1d(n * self.region_size, key[1], key[2])
        return self._windows[key]

    def window_key(self, crop: Crop, row: int, col: int) -> tuple:
        """Regions with equal keys have equal windows."""
        return (crop.rows, crop.row0 == 0, crop.row0 + crop.rows == self.rows,
                crop.cols, crop.col0 == 0, crop.col0 + crop.cols == self.cols,
                row - crop.row0, col - crop.col0)

    def region_window(self, crop: Crop, row: int, col: int) -> np.ndarray:
        """(S, S) float32 blending weight of `crop` over region (row, col)."""
        s = self.region_size
        i, j = row - crop.row0, col - crop.col0
        wy = self._axis_window(crop.rows, crop.row0, self.rows)
        wx = self._axis_window(crop.cols, crop.col0, self.cols)
        return np.outer(wy[i * s:(i + 1) * s], wx[j * s:(j + 1) * s])

    # ------------------------------------------------------------------ orders
    def _strip_order(self, zigzag: bool) -> list[int]:
        n_rows, n_cols = self.crop_grid
        out: list[int] = []
        for s0 in range(0, n_cols, self.strip_width):
            cols = list(range(s0, min(s0 + self.strip_width, n_cols)))
            for i in range(n_rows):
                seq = cols[::-1] if zigzag and i % 2 else cols
                out.extend(i * n_cols + j for j in seq)
        return out

    def order(self, kind: str = "raster", point: tuple[float, float] | None = None) -> list[int]:
        """Crop indices in visiting order."""
        if kind == "raster":
            return self._strip_order(False)
        if kind == "zigzag":
            return self._strip_order(True)
        if kind == "viewport":
            return self.nearest_first(range(len(self.crops)), point)
        raise ValueError(f"unknown order {kind!r}; expected one of {ORDERS}")

    def crop_centre(self, crop: Crop) -> tuple[float, float]:
        """(y, x) pixels of the crop's centre (of its regions, padding at the edge included)."""
        s = self.region_size
        return (crop.row0 + crop.rows / 2) * s, (crop.col0 + crop.cols / 2) * s

    def nearest_first(
        self, indices: Iterable[int], point: tuple[float, float] | None
    ) -> list[int]:
        """`indices` sorted by the distance of their crop centre to `point` (y, x) pixels
        (default: the image centre); ties keep raster order."""
        py, px = point if point is not None else (self.height / 2, self.width / 2)
        idx = list(indices)
        centres = np.array([self.crop_centre(self.crops[i]) for i in idx]).reshape(-1, 2)
        dist = (centres[:, 0] - py) ** 2 + (centres[:, 1] - px) ** 2
        return [idx[i] for i in np.argsort(dist, kind="stable")]


class ViewportOrder:
    """Iterates crop indices nearest-first; re-sorts the remaining crops whenever
    `priority()` returns a point different from the last one (checked between crops)."""

    def __init__(
        self,
        plan: RegionPlan,
        indices: Iterable[int],
        point: tuple[float, float] | None = None,
        priority: Callable[[], tuple[float, float] | None] | None = None,
    ) -> None:
        self.plan, self.priority = plan, priority
        self.point = point
        self.pending = plan.nearest_first(indices, point)

    def __iter__(self) -> ViewportOrder:
        return self

    def __next__(self) -> int:
        if self.priority is not None:
            new = self.priority()
            if new is not None and tuple(new) != self.point:
                self.point = (float(new[0]), float(new[1]))
                self.pending = self.plan.nearest_first(self.pending, self.point)
        if not self.pending:
            raise StopIteration
        return self.pending.pop(0)
