"""Progress events of a prediction run: frozen dataclasses yielded by `run`, in this order.

`Planned` first; then, interleaved, `RegionEncoded` / `ContextStep` / `RegionDecoded` /
`Written` / `Notice` / `RegionFailed`; last exactly one of `Finished`, `Failed`, `Cancelled`.
Region indices are `(row, col)` on the region grid of the chosen level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Index = tuple[int, int]


@dataclass(frozen=True)
class Planned:
    """The work ahead. `todo_regions` excludes regions finished by an earlier run (resume)."""

    total_regions: int
    todo_regions: int
    grid: tuple[int, int]  # (rows, cols)
    region_size: int
    crops: int  # crops that will run
    crop_regions: int  # k: a crop holds up to k x k regions
    order: str
    image_shape: tuple[int, int]  # (H, W) of the level
    resumed: bool = False
    store: str | None = None


@dataclass(frozen=True)
class RegionEncoded:
    indices: tuple[Index, ...]
    batch_size: int
    seconds: float
    from_cache: bool = False


@dataclass(frozen=True)
class ContextStep:
    crop: int
    regions: tuple[Index, ...]
    seconds: float


@dataclass(frozen=True)
class RegionDecoded:
    indices: tuple[Index, ...]
    seconds: float


@dataclass(frozen=True)
class Written:
    """Regions whose final outputs are in the store (done regions so far: `done`)."""

    indices: tuple[Index, ...]
    seconds: float
    done: int = 0
    total: int = 0


@dataclass(frozen=True)
class Notice:
    message: str
    kind: str = "info"  # "info" | "warning" | "oom" | "nan" | "cache" | "resume"


@dataclass(frozen=True)
class RegionFailed:
    indices: tuple[Index, ...]
    reason: str


@dataclass(frozen=True)
class Finished:
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    store: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Failed:
    message: str


@dataclass(frozen=True)
class Cancelled:
    done_regions: int = 0
    total_regions: int = 0


Event = (Planned | RegionEncoded | ContextStep | RegionDecoded | Written | Notice
         | RegionFailed | Finished | Failed | Cancelled)
