"""Parts of one run spread over workers (`run(..., part=Part(...))`; `napari_xt.distributed`
schedules them).

A run of one image over many workers is cut into three kinds of part, each an ordinary
engine run of the same image, model and options (so everything `run` validates, and the
signature of the embedding cache, is the same in every worker):

- ``encode``: encode the given regions into the run's embedding cache, nothing else. Each
  part writes a cache part of its own (`EmbeddingCache(segment=...)`), so parts write side
  by side; every cache reads what all its parts hold.
- ``scene`` (whole-image context): the scene pass over every region, from the cache; the
  part's result is the scene tokens, which the ``regions`` parts then read.
- ``regions``: finalize the regions of one block (region rows and columns, ends exclusive)
  that are not done yet. To this run, every other region is done: it runs exactly the crops
  a resumed run would run for them, with the features of the cache, and hands the block's
  final tiles to a `PartStore` instead of a store on disk. The caller writes them into the
  real store (one writer: its lock and commit protocol stay whole).

A part that reads the cache may be handed where its features are (`Part.known`, from
`EmbeddingCache.locations`); it then reads no index file at all, which for a slide of a
million regions would cost every part seconds.

Why the results equal a single-process run's bit for bit: features come from the cache
(fp16, as in a run with the cache), a region's features do not depend on the regions that
share its encoder batch, crops visit in the same relative order (so blending sums in the
same order), and decode calls have a fixed size; these are the same facts that make a
resumed run equal an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_xt.io.box import Box

from .store.memory import InMemory
from .store.spec import DONE, FAILED, PENDING, RegionTiles, StoreSpec

Index = tuple[int, int]
PART_KINDS = ("encode", "scene", "regions")


@dataclass(frozen=True)
class Part:
    """One worker's share of a run (see the module docstring)."""

    kind: str  # "encode" | "scene" | "regions"
    segment: str  # the embedding cache part it writes (letters, digits, _)
    regions: tuple[Index, ...] = ()  # encode: the regions to encode
    block: Box | None = None  # regions: region rows y0:y1 and columns x0:x1 it finalizes
    done: tuple[Index, ...] = ()  # regions: regions of the block finished before
    scene: Any = None  # regions with whole-image context: the scene part's SceneTokens
    scene_tainted: bool = False  # the scene lacked an unreadable region
    known: dict | None = None  # where the cached features it reads are (EmbeddingCache)

    def __post_init__(self) -> None:
        if self.kind not in PART_KINDS:
            raise ValueError(f"part kind must be one of {PART_KINDS}, not {self.kind!r}")
        if self.kind == "regions" and self.block is None:
            raise ValueError("a regions part needs its block")


class PartStore(InMemory):
    """Where a part's results go: the final tiles of its block's regions, kept in memory
    for the caller (`tiles`, `failed`); every region outside the block reads as done."""

    arrays: dict[str, np.ndarray] = {}  # (nothing for an in-memory summary)

    def __init__(self, spec: StoreSpec, part: Part) -> None:
        self.spec = spec
        self.grid = spec.grid
        self.notices: list[str] = []
        self.done = np.ones(self.grid, bool)
        if part.block is not None:
            self.done[part.block.slices] = False
            for idx in part.done:
                self.done[idx] = True
        self.crop_logits: dict[int, list[float]] = {}
        self.tiles: list[RegionTiles] = []
        self.failed: dict[Index, str] = {}
        self._written: list[tuple[tuple[Index, ...], float]] = []

    def put(self, tiles: RegionTiles) -> None:
        """Keep the final tiles of some of the block's regions for the caller."""
        self.tiles.append(tiles)
        for idx in tiles.indices:
            self.failed.pop(idx, None)
        self._written.append((tuple(tiles.indices), tiles.seconds))

    def put_failed(self, indices: list[Index], reason: str) -> None:
        """Record regions that could not be read, with the reason (`failed`)."""
        for idx in indices:
            self.failed[tuple(idx)] = reason

    def put_crop(self, index: int, logits: np.ndarray) -> None:
        """Unreachable: `run` refuses a part of a classifier's run (its record is one per
        image); raises should that ever change."""
        raise RuntimeError("a classifier's run is not split into parts")

    def region_status(self) -> np.ndarray:
        """(rows, cols) uint8: DONE for regions outside the block or finished, FAILED for
        regions that could not be read, PENDING for the rest."""
        out = np.full(self.grid, PENDING, np.uint8)
        for idx in self.failed:
            out[idx] = FAILED
        out[self.done] = DONE
        return out
