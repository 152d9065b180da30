"""Detection peaks of a centre map written shard by shard, equal to max-pool NMS over the
whole image (`napari_xt.model.heads.points_from_heatmap`), without reading anything back.

Whether a pixel is a peak depends on the pixels within `B = 2 * min_distance` of it (the
maximum over its window, then the plateau rule over the windows of its neighbours). So:

- the peaks of a shard that lie at least B pixels from every side it shares with another
  shard follow from the shard alone (`interior`), as soon as the shard is complete;
- the others (`border`) need the strips of the neighbouring shards: a shard keeps its
  `frames`, the 2B-pixel strips along its four sides, and its border peaks are found on a
  small canvas (the shard plus B pixels around it) assembled from its own and its eight
  neighbours' frames, once all of them are committed.

Layouts: heat (K [+ 1 size], h, w) float32 of the shard's box; points POINT_DTYPE in level
pixels; frames {"top": (C, F, w), "bottom": (C, F, w), "left": (C, h, F), "right": (C, h, F)}.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from .layout import Index, Tiling

SIDES = ("top", "bottom", "left", "right")


class ShardPeaks:
    """The detection peaks of a centre map committed shard by shard (see the module docstring):
    `interior` once a shard is complete, `border` once the shard and its neighbours all are.
    `classes` (K), `has_size`, `threshold` and `min_distance` are those of `points_from_heatmap`;
    `margin` is B (2 * `min_distance`), `frame` the width of the kept strips (2B pixels)."""

    def __init__(self, tiling: Tiling, classes: int, has_size: bool, threshold: float,
                 min_distance: int) -> None:
        self.tiling = tiling
        self.k = int(classes)
        self.has_size = bool(has_size)
        self.threshold = float(threshold)
        self.md = int(min_distance)
        self.margin = 2 * self.md
        self.frame = 2 * self.margin

    def _points(self, heat: np.ndarray, y0: int, x0: int) -> np.ndarray:
        pts = sparse_points(heat, self.k, self.has_size, self.threshold, self.md)
        pts["y"] += y0
        pts["x"] += x0
        return pts

    def _margins(self, key: Index) -> tuple[int, int, int, int]:
        i, j = key
        rows, cols = self.tiling.shard_grid
        m = self.margin
        return (m if i > 0 else 0, m if i < rows - 1 else 0,
                m if j > 0 else 0, m if j < cols - 1 else 0)

    def _interior_mask(self, key: Index, pts: np.ndarray) -> np.ndarray:
        y0, x0, y1, x1 = self.tiling.shard_box(*key)
        mt, mb, ml, mr = self._margins(key)
        y, x = pts["y"].astype(np.int64), pts["x"].astype(np.int64)
        return ((y - y0 >= mt) & (y1 - 1 - y >= mb) & (x - x0 >= ml) & (x1 - 1 - x >= mr))

    def interior(self, key: Index, heat: np.ndarray, cold: bool = False
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(peaks that follow from the shard alone, the shard's frames). `cold`: the
        caller knows no value reaches the threshold (no search)."""
        from napari_xt.model.heads import POINT_DTYPE

        y0, x0, y1, x1 = self.tiling.shard_box(*key)
        heat = heat[:, : y1 - y0, : x1 - x0]
        pts = np.empty(0, POINT_DTYPE) if cold else self._points(heat, y0, x0)
        f = self.frame
        sides = {"top": heat[:, :f], "bottom": heat[:, -f:], "left": heat[:, :, :f],
                 "right": heat[:, :, -f:]}
        frames = {k: np.zeros(v.shape, v.dtype) if cold else v.copy() for k, v in sides.items()}
        return pts[self._interior_mask(key, pts)], frames

    def needs(self, key: Index) -> list[Index]:
        """The shards whose frames the border peaks of `key` need (itself included)."""
        return [key, *self.tiling.neighbours(*key)]

    def border(self, key: Index, frames: dict[Index, dict[str, np.ndarray]]) -> np.ndarray:
        """The peaks of shard `key` that `interior` left out, from the frames of `key` and
        its neighbours: one thin canvas per side shared with a neighbour (the side's B-pixel
        band where those peaks lie, B pixels beyond it and 2B inside it)."""
        t = self.tiling
        y0, x0, y1, x1 = t.shard_box(*key)
        b = self.margin
        mt, mb, ml, mr = self._margins(key)
        # (canvas box, kept box) per side; the left/right bands leave the corners to top/bottom
        ky0, ky1 = y0 + mt, y1 - mb
        bands = []
        if mt:
            bands.append(((y0 - b, x0 - b, y0 + 2 * b, x1 + b), (y0, x0, min(y1, y0 + b), x1)))
        if mb:
            bands.append(((y1 - 2 * b, x0 - b, y1 + b, x1 + b), (max(y0, y1 - b), x0, y1, x1)))
        if ml:
            bands.append(((y0 - b, x0 - b, y1 + b, x0 + 2 * b), (ky0, x0, ky1, min(x1, x0 + b))))
        if mr:
            bands.append(((y0 - b, x1 - 2 * b, y1 + b, x1 + b), (ky0, max(x0, x1 - b), ky1, x1)))
        channels = next(iter(frames.values()))["top"].shape[0]
        found = []
        seen: set[tuple[int, int, int]] = set()
        for (cy0, cx0, cy1, cx1), (ka, kb, kc, kd) in bands:
            cy0, cx0 = max(0, cy0), max(0, cx0)
            cy1, cx1 = min(t.height, cy1), min(t.width, cx1)
            canvas = np.full((channels, cy1 - cy0, cx1 - cx0), -np.inf, np.float32)
            for n in self.needs(key):
                ny0, nx0, ny1, nx1 = t.shard_box(*n)
                fr = frames[n]
                at = {"top": (ny0, nx0), "bottom": (ny1 - fr["bottom"].shape[1], nx0),
                      "left": (ny0, nx0), "right": (ny0, nx1 - fr["right"].shape[2])}
                for side, (sy, sx) in at.items():
                    _paste(canvas, fr[side], sy - cy0, sx - cx0)
            pts = self._points(canvas, cy0, cx0)
            y, x = pts["y"].astype(np.int64), pts["x"].astype(np.int64)
            pts = pts[(y >= ka) & (y < kc) & (x >= kb) & (x < kd)]
            for p in pts:  # the band boxes may overlap on a tiny shard: keep a point once
                k3 = (int(p["y"]), int(p["x"]), int(p["class"]))
                if k3 not in seen:
                    seen.add(k3)
                    found.append(p)
        from napari_xt.model.heads import POINT_DTYPE

        return np.array(found, POINT_DTYPE) if found else np.empty(0, POINT_DTYPE)


def sparse_points(heat: np.ndarray, classes: int, has_size: bool, threshold: float,
                  min_distance: int, tile: int = 64) -> np.ndarray:
    """`points_from_heatmap` over a (K [+ 1 size], H, W) map, computed only where it can
    find something: the map is cut into `tile`-pixel tiles, and only tiles holding a pixel
    >= threshold are searched, each with the 2 * min_distance pixels around it that decide
    its peaks, all in one batch. Same points as the whole-map call (a peak depends on
    nothing farther away); most of a centre map is far below the threshold."""
    from napari_xt.model.heads import POINT_DTYPE, points_from_heatmap

    k, md = int(classes), int(min_distance)
    _, h, w = heat.shape
    scores = heat[:k].max(axis=0) if k > 1 else heat[0]
    hot = scores >= threshold
    if not hot.any():
        return np.empty(0, POINT_DTYPE)
    ty, tx = -(-h // tile), -(-w // tile)
    pad = np.zeros((ty * tile, tx * tile), bool)
    pad[:h, :w] = hot
    tiles = np.argwhere(pad.reshape(ty, tile, tx, tile).any(axis=(1, 3)))
    m = 2 * md
    side = tile + 2 * m
    batch = np.full((len(tiles), heat.shape[0], side, side), -np.inf, np.float32)
    for n, (i, j) in enumerate(tiles):
        y0, x0 = i * tile - m, j * tile - m
        ya, xa = max(0, y0), max(0, x0)
        yb, xb = min(h, y0 + side), min(w, x0 + side)
        batch[n, :, ya - y0:yb - y0, xa - x0:xb - x0] = heat[:, ya:yb, xa:xb]
    t = torch.from_numpy(batch)
    size = t[:, k:k + 1] if has_size else None
    pts = points_from_heatmap(t[:, :k], size, threshold=threshold, min_distance=md)
    origin = tiles[pts["batch"]] * tile - m
    pts["y"] += origin[:, 0]
    pts["x"] += origin[:, 1]
    ly, lx = pts["y"] - origin[:, 0] - m, pts["x"] - origin[:, 1] - m
    inside = (ly >= 0) & (ly < tile) & (lx >= 0) & (lx < tile)
    pts = pts[inside]
    pts["batch"] = 0
    return pts


def _paste(canvas: np.ndarray, strip: np.ndarray, oy: int, ox: int) -> None:
    """Copy `strip` (C, h, w) into `canvas` at offset (oy, ox), clipped to the canvas."""
    h, w = strip.shape[1:]
    ya, xa = max(0, oy), max(0, ox)
    yb, xb = min(canvas.shape[1], oy + h), min(canvas.shape[2], ox + w)
    if ya < yb and xa < xb:
        canvas[:, ya:yb, xa:xb] = strip[:, ya - oy:yb - oy, xa - ox:xb - ox]


def sort_points(points: np.ndarray) -> np.ndarray:
    """Points in one deterministic order: y, x, class."""
    if len(points) == 0:
        return points
    order = np.lexsort((points["class"], points["x"], points["y"]))
    return points[order]


# ---------------------------------------------------------------------- (de)serialising
def pack(points: np.ndarray | None, frames: dict[str, np.ndarray] | None) -> bytes:
    """Points (and frames) as npz bytes (no pickled objects)."""
    arrays: dict[str, np.ndarray] = {}
    if points is not None:
        for name in points.dtype.names:
            arrays[f"p_{name}"] = np.ascontiguousarray(points[name])
    if frames is not None:
        for side in SIDES:
            arrays[f"f_{side}"] = frames[side]
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack(data: bytes) -> tuple[np.ndarray | None, dict[str, np.ndarray] | None]:
    """The points (POINT_DTYPE) and frames of `pack` bytes, each None when the bytes hold none;
    never loads pickled objects."""
    from napari_xt.model.heads import POINT_DTYPE

    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        names = set(z.files)
        points = None
        if "p_y" in names:
            n = len(z["p_y"])
            points = np.zeros(n, POINT_DTYPE)
            for name in POINT_DTYPE.names:
                points[name] = z[f"p_{name}"]
        frames = {s: z[f"f_{s}"] for s in SIDES} if "f_top" in names else None
    return points, frames
