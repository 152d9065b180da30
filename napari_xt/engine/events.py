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
    """Regions whose features are now available: encoded from their pixels, or read from the
    embedding cache (`from_cache`). `batch_size` is the encoder's call size (the last call is
    padded to it), or for cached features the number of regions read; `seconds` the read and
    encode time (or the cache read)."""

    indices: tuple[Index, ...]
    batch_size: int
    seconds: float
    from_cache: bool = False


@dataclass(frozen=True)
class ContextStep:
    """The context step of crop `crop` (its index in the plan) is done over its readable
    `regions`; `seconds` is the crop's share of the call that ran it (alike crops run in one
    batch)."""

    crop: int
    regions: tuple[Index, ...]
    seconds: float


@dataclass(frozen=True)
class RegionDecoded:
    """Regions decoded: by a dense head (once per region from its blended tokens, or with
    blend="outputs" once in each covering crop), or a crop's regions after a classifier's head
    ran on it. `seconds` the decode time (0 when the decode was part of the batched context call,
    counted in `ContextStep`)."""

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
    """A message for the user: `kind` says what it is about ("info", "warning", "oom" for a batch
    size backed off, "nan" for non-finite input pixels, "cache" for the embedding cache, "resume"
    for work found done)."""

    message: str
    kind: str = "info"  # "info" | "warning" | "oom" | "nan" | "cache" | "resume"


@dataclass(frozen=True)
class RegionFailed:
    """Regions whose pixels could not be read (`reason`: the error). Their pixels are never
    replaced by zeros: the regions stay failed (label 0) until a later run resumes them, and with
    on_error="stop" the run then ends with `Failed`."""

    indices: tuple[Index, ...]
    reason: str


@dataclass(frozen=True)
class Finished:
    """The last event of a run that ran to its end: `seconds` of wall time, `counts` of the work
    (regions encoded, read from the cache, decoded, written, failed; crops; non-finite pixels),
    `store` the output store's path (None in memory) and `summary` what was written
    (`summary["complete"]`: no region failed; in memory `summary["arrays"]` holds the results)."""

    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    store: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Failed:
    """The last event of a run that an error ended: `message` names the error (and whether
    finished regions are kept). The store's and the cache's locks are released before it is
    emitted."""

    message: str


@dataclass(frozen=True)
class Cancelled:
    """The last event of a cancelled run: `done_regions` of `total_regions` are final and kept; a
    rerun resumes the rest."""

    done_regions: int = 0
    total_regions: int = 0


Event = (Planned | RegionEncoded | ContextStep | RegionDecoded | Written | Notice
         | RegionFailed | Finished | Failed | Cancelled)
