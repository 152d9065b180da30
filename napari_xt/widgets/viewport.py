"""The camera centre as a thread-safe priority for viewport-first runs.

`ViewportPriority` listens to the viewer's camera on the main thread, converts the centre
from world coordinates to pixel coordinates of the image being processed, and keeps it under
a lock. The engine's worker thread calls it (``priority()``) to ask "where is the user
looking now?"; it never touches the viewer itself.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np


def camera_of(viewer):
    """The viewer's camera (`viewer.scene.camera` from napari 0.9, `viewer.camera` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


class ViewportPriority:
    """Callable returning the camera centre as (y, x) image pixels, clamped to the image
    (a view beside the image puts the nearest edge regions first).

    `scale` and `translate` are the (y, x) world transform of the processed image's pixels
    (for a multiscale level: the layer's scale times the level's downsampling factor).
    """

    def __init__(
        self,
        viewer,
        scale: Sequence[float],
        translate: Sequence[float],
        shape: Sequence[int],
    ) -> None:
        self._viewer = viewer
        self._scale = np.asarray(scale, dtype=float)[-2:]
        self._translate = np.asarray(translate, dtype=float)[-2:]
        self._shape = tuple(int(s) for s in shape[-2:])
        self._lock = threading.Lock()
        self._centre: tuple[float, float] = (0.0, 0.0)
        self.moves = 0
        self._camera = camera_of(viewer)
        self._camera.events.center.connect(self._on_camera)
        self._on_camera()

    def _on_camera(self, event=None) -> None:
        world = np.asarray(self._camera.center, dtype=float)[-2:]
        y, x = (world - self._translate) / self._scale
        h, w = self._shape
        centre = (float(np.clip(y, 0, h - 1)), float(np.clip(x, 0, w - 1)))
        with self._lock:
            self._centre = centre
            self.moves += 1

    def __call__(self) -> tuple[float, float]:
        with self._lock:
            return self._centre

    def disconnect(self) -> None:
        """Stop following the camera (call on the main thread when the run ends)."""
        self._camera.events.center.disconnect(self._on_camera)
