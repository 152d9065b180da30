"""Live per-region progress: a Labels layer with one pixel per region.

States are written into a small (rows, cols) uint8 array as events arrive (cheap, any rate);
`flush()` pushes them to the layer (in place, then a refresh: no copy, no dims update),
called by the run session's timer or, with `auto_flush`, by the painter's own timer at most
`max_rate` times a second, so a burst of thousands of events costs a handful of redraws.
The layer is scaled by the region size so each pixel covers its region of the image, with
the image's translate.
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


def grid_transform(
    region_size: int, scale: Sequence[float], translate: Sequence[float]
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(scale, translate) of a one-pixel-per-region layer over an image whose pixels have
    world `scale` and `translate`: a region's pixel sits at the centre of its S x S block."""
    sy, sx = (float(v) for v in list(scale)[-2:])
    ty, tx = (float(v) for v in list(translate)[-2:])
    half = (region_size - 1) / 2.0
    return (sy * region_size, sx * region_size), (ty + half * sy, tx + half * sx)


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
    ) -> None:
        from napari.utils.colormaps import DirectLabelColormap
        from qtpy.QtCore import QTimer

        self.viewer = viewer
        self.states = np.zeros((rows, cols), dtype=np.uint8)
        self.refreshes = 0
        self._dirty = False
        grid_scale, grid_translate = grid_transform(region_size, scale, translate)
        colormap = DirectLabelColormap(
            color_dict={**STATE_COLORS, None: (0.0, 0.0, 0.0, 0.0)}
        )
        if LAYER_NAME in viewer.layers:
            viewer.layers.remove(LAYER_NAME)
        self.layer = viewer.add_labels(
            self.states,
            name=LAYER_NAME,
            scale=grid_scale,
            translate=grid_translate,
            opacity=opacity,
            colormap=colormap,
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
        self.layer.refresh()  # the layer's data is `states` itself
        self.refreshes += 1

    def stop(self) -> None:
        """Final push and stop the timer (the layer stays as a record of the run)."""
        self._timer.stop()
        self.flush()
