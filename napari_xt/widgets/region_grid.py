"""Live per-region progress: a Labels layer of region states over the image.

States are written into a small (rows, cols) uint8 array as events arrive (cheap, any rate);
`flush()` pushes them to the layer (in place, then a refresh: no dims update), called by the
run session's timer or, with `auto_flush`, by the painter's own timer at most `max_rate`
times a second, so a burst of thousands of events costs a handful of redraws.

The layer ends at the image's edge: its cells are `q` pixels a side, q the largest divisor
of the region size that divides the image's height and width and keeps the layer within
`MAX_CELLS` a side (one cell per region when the image is a whole number of regions; when
no divisor fits exactly, the smallest that fits: the layer overhangs by less than a cell).
When the run ends the layer is hidden (everything decoded) or fades to what is left:
decoded regions become transparent, queued ones stay grey, failed ones red.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

QUEUED, ENCODED, CONTEXTUALIZED, DECODED, FAILED = 1, 2, 3, 4, 5
STATE_NAMES = {
    0: "outside",
    QUEUED: "queued",
    ENCODED: "encoded",
    CONTEXTUALIZED: "contextualized",
    DECODED: "decoded",
    FAILED: "failed",
}
STATE_COLORS = {
    0: (0.0, 0.0, 0.0, 0.0),
    QUEUED: (0.55, 0.55, 0.55, 1.0),  # grey
    ENCODED: (0.25, 0.45, 1.0, 1.0),  # blue
    CONTEXTUALIZED: (1.0, 0.75, 0.1, 1.0),  # amber
    DECODED: (0.2, 0.85, 0.3, 1.0),  # green
    FAILED: (0.95, 0.1, 0.1, 1.0),  # red
}
LAYER_NAME = "xT regions"
MAX_CELLS = 1024  # the layer's largest side, in cells
DONE_OPACITY = 0.3  # what is left of a run that did not finish everything


def grid_transform(
    region_size: int, scale: Sequence[float], translate: Sequence[float]
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(scale, translate) of a one-pixel-per-region layer over an image whose pixels have
    world `scale` and `translate`: a region's pixel sits at the centre of its S x S block."""
    sy, sx = (float(v) for v in list(scale)[-2:])
    ty, tx = (float(v) for v in list(translate)[-2:])
    half = (region_size - 1) / 2.0
    return (sy * region_size, sx * region_size), (ty + half * sy, tx + half * sx)


def cell_size(region_size: int, height: int | None, width: int | None,
              limit: int = MAX_CELLS) -> int:
    """Pixels per cell of the grid layer (see the module docstring)."""
    s = int(region_size)
    if not height or not width:
        return s
    fits = [q for q in range(1, s + 1) if s % q == 0
            and -(-height // q) <= limit and -(-width // q) <= limit]
    exact = [q for q in fits if height % q == 0 and width % q == 0]
    return exact[-1] if exact else (fits or [s])[0]  # fewest cells, else least overhang


class RegionGridPainter:
    """Owns the region-grid layer of one run. Main thread only."""

    def __init__(
        self,
        viewer,
        rows: int,
        cols: int,
        region_size: int,
        scale: Sequence[float],
        translate: Sequence[float],
        max_rate: float = 10.0,
        opacity: float = 0.45,
        auto_flush: bool = True,
        image_shape: tuple[int, int] | None = None,
    ) -> None:
        from qtpy.QtCore import QTimer

        self.viewer = viewer
        self.states = np.zeros((rows, cols), dtype=np.uint8)
        self.refreshes = 0
        self._dirty = False
        if image_shape is None:  # whole regions
            q, self.cell_shape = region_size, (rows, cols)
        else:
            h, w = (int(v) for v in image_shape)
            q = cell_size(region_size, h, w)
            self.cell_shape = (-(-h // q), -(-w // q))
        self.repeat = region_size // q  # cells per region side
        self.cells = self.states if self.cell_shape == (rows, cols) else np.zeros(
            self.cell_shape, np.uint8)
        grid_scale, grid_translate = grid_transform(q, scale, translate)
        if LAYER_NAME in viewer.layers:
            viewer.layers.remove(LAYER_NAME)
        self.layer = viewer.add_labels(
            self.cells,
            name=LAYER_NAME,
            scale=grid_scale,
            translate=grid_translate,
            opacity=opacity,
            colormap=_colormap(STATE_COLORS),
            blending="translucent",
        )
        self.layer.editable = False
        self._timer = QTimer()
        self._timer.setInterval(max(1, int(1000 / max_rate)))
        self._timer.timeout.connect(self.flush)
        if auto_flush:
            self._timer.start()

    def mark(self, indices: Iterable[Sequence[int]], state: int) -> None:
        """Set the state of regions given as (row, col) pairs; drawn at the next flush."""
        idx = np.asarray(list(indices), dtype=np.int64).reshape(-1, 2)
        if len(idx):
            if state == FAILED:
                self.states[idx[:, 0], idx[:, 1]] = state
            else:  # a region never goes back (e.g. a late ContextStep after decoding)
                current = self.states[idx[:, 0], idx[:, 1]]
                keep = (current == FAILED) | (current > state)
                self.states[idx[:, 0], idx[:, 1]] = np.where(keep, current, state)
            self._dirty = True

    def mark_all(self, state: int) -> None:
        self.states[...] = state
        self._dirty = True

    def counts(self) -> dict[str, int]:
        values, counts = np.unique(self.states, return_counts=True)
        return {STATE_NAMES[int(v)]: int(c) for v, c in zip(values, counts)}

    def flush(self) -> None:
        """Push the states to the layer if anything changed since the last push."""
        if not self._dirty or self.layer not in self.viewer.layers:
            return
        self._dirty = False
        if self.cells is not self.states:
            m, (ch, cw) = self.repeat, self.cell_shape
            self.cells[...] = np.repeat(np.repeat(self.states, m, 0), m, 1)[:ch, :cw]
        self.layer.refresh()  # the layer's data is `cells` itself
        self.refreshes += 1

    def stop(self, outcome: str | None = None) -> None:
        """Final push and stop the timer. The layer stays as a record of the run, out of
        the way: hidden when every region was decoded, else faded with decoded regions
        transparent (queued grey and failed red remain)."""
        self._timer.stop()
        self.flush()
        if self.layer not in self.viewer.layers or outcome is None:
            return
        if outcome == "finished" and bool((self.states == DECODED).all()):
            self.layer.visible = False
        else:
            self.layer.colormap = _colormap({**STATE_COLORS, ENCODED: STATE_COLORS[QUEUED],
                                             CONTEXTUALIZED: STATE_COLORS[QUEUED],
                                             DECODED: (0.0, 0.0, 0.0, 0.0)})
            self.layer.opacity = DONE_OPACITY


def _colormap(colors):
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={**colors, None: (0.0, 0.0, 0.0, 0.0)})
