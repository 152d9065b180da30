"""Typed progress events for long-running io work (conversion, result writing).

A producer yields or passes these to a callback; the CLI prints them, napari shows them in a
progress bar, tests assert on them. `done` and `total` count blocks over the whole job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    """`done` of `total` blocks written; `level` is the pyramid level being written."""

    done: int
    total: int
    level: int
    num_levels: int
    message: str = ""

    @property
    def fraction(self) -> float:
        """`done / total`, from 0 to 1 (1.0 when `total` is 0)."""
        return 1.0 if self.total == 0 else self.done / self.total


ProgressCallback = Callable[[ProgressEvent], None]
