"""What a store must hold for one run (`StoreSpec`), what the engine hands it (`RegionTiles`),
and the store's error and region status codes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .layout import Index

# region status persisted by a store (the engine's live lifecycle states are in-memory only)
PENDING, DONE, FAILED = 0, 4, 5


class StoreError(OSError):
    """The output store cannot be created or written, is locked by another run, or holds
    something this run must not replace."""




@dataclass(frozen=True)
class ClassInfo:
    """A label value's name and display colour (RGBA 0-255)."""

    value: int
    name: str
    color: tuple[int, int, int, int]


@dataclass(frozen=True)
class StoreSpec:
    """Everything a store needs to know about a run (built by the engine from its plan)."""

    signature: dict[str, Any]
    height: int
    width: int
    region_size: int
    strip_px: int  # width of an engine strip in pixels (shards are aligned with it)
    kind: str  # "segmentation" | "detection" | "classification"
    outputs: tuple[str, ...]
    name: str = "prediction"
    label_dtype: str = "uint8"
    classes: tuple[ClassInfo, ...] = ()  # label values of the labels output
    prob_channels: int = 0  # K of the probabilities output (0: not written)
    heat_channels: int = 0  # centre/heatmap classes (0: no detections)
    has_size: bool = False  # the detection maps carry a size channel
    point_classes: tuple[str, ...] = ()  # names of the detection classes
    threshold: float = 0.5
    min_distance: int = 2
    crops: int = 0  # classification: number of crops

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the region grid (the last row and column may be partial)."""
        s = self.region_size
        return -(-self.height // s), -(-self.width // s)

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) pixels of region (row, col), clipped to the image."""
        s = self.region_size
        return row * s, col * s, min((row + 1) * s, self.height), min((col + 1) * s, self.width)

    @property
    def dense(self) -> bool:
        """Whether the run writes maps (segmentation, detection), not one record per image
        (classification)."""
        return self.kind != "classification"

    @property
    def writes_labels(self) -> bool:
        """Whether the labels output is written."""
        return "labels" in self.outputs

    @property
    def writes_probabilities(self) -> bool:
        """Whether the probabilities output is written (asked for, and the head has class
        channels)."""
        return "probabilities" in self.outputs and self.prob_channels > 0

    @property
    def writes_detections(self) -> bool:
        """Whether detections are written (asked for, and the head has centre channels)."""
        return "detections" in self.outputs and self.heat_channels > 0


@dataclass
class RegionTiles:
    """Final outputs of a batch of R regions, each padded to S x S (cropped by the store):
    labels (R, S, S), probabilities (R, K, S, S) float16, heat (R, K_h [+ 1], S, S) float32.
    `tainted`: regions decoded in a crop that lacked a region that failed to read (written
    now, computed again by the next run)."""

    indices: list[Index]
    labels: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    heat: np.ndarray | None = None
    seconds: float = 0.0
    tainted: tuple[Index, ...] = ()
    arrays: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.arrays = {k: v for k, v in (("labels", self.labels),
                                         ("probabilities", self.probabilities),
                                         ("heat", self.heat)) if v is not None}
