"""The schedule of one image over many workers: the blocks of the region grid, and which
part encodes, reads and waits for what."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_xt.engine.regions import RegionBook
from napari_xt.io.box import Box

Index = tuple[int, int]


def block_grid(grid: tuple[int, int], side: int) -> list[Box]:
    """Blocks of `side` x `side` regions (clipped at the grid's edges), raster order."""
    rows, cols = grid
    side = max(1, int(side))
    return [Box(r, c, min(r + side, rows), min(c + side, cols))
            for r in range(0, rows, side) for c in range(0, cols, side)]


def default_block_side(grid: tuple[int, int], shard_regions: int, k: int, workers: int) -> int:
    """Blocks of one store shard, halved (not below a crop) until there are at least two
    per worker: fewer blocks than that would leave workers idle."""
    side = max(1, int(shard_regions))
    while side > k and len(block_grid(grid, side)) < 2 * max(1, workers):
        side = max(k, side // 2)
    return side


@dataclass
class Schedule:
    """Which part does what, and what each regions part waits for."""

    blocks: list[Box]
    encode: dict[int, list[Index]]  # block -> regions it encodes (raster order)
    reads: dict[int, list[Index]]  # block -> regions its crops read (raster order)
    regions: dict[int, list[Index]]  # block -> regions of it finished before (to skip)
    waits: dict[int, set[int]]  # regions part of block -> encode parts it waits for
    from_cache: int = 0  # regions the run reads that were cached before it


def make_schedule(plan: Any, book: RegionBook, cached: np.ndarray, blocks: list[Box],
                  todo: Sequence[int], whole_image: bool) -> Schedule:
    """The parts of a run: the regions each block encodes (those the `todo` crops read, or
    every region with `whole_image` context, not `cached`; a region belongs to the block
    that contains it), the finished regions of every block with work left, and the encode
    parts each regions part waits for (the blocks its crops touch)."""
    owner = np.zeros(plan.grid, np.int64)
    for b, box in enumerate(blocks):
        owner[box.slices] = b
    need = np.zeros(plan.grid, bool)
    waits: dict[int, set[int]] = {}
    reads: dict[int, set[Index]] = {}  # (sets: a grid-sized mask per block would not scale)
    for ci in todo:
        crop = plan.crops[ci]
        sl = (slice(crop.row0, crop.row0 + crop.rows), slice(crop.col0, crop.col0 + crop.cols))
        need[sl] = True
        touched = set(np.unique(owner[sl]).tolist())
        for b in np.unique(owner[sl][~book.final[sl]]).tolist():
            waits.setdefault(int(b), set()).update(touched)
            reads.setdefault(int(b), set()).update(crop.regions())
    if whole_image and len(todo):
        need[:] = True  # the scene reads every region
    missing = need & ~cached
    from_cache = int((need & cached).sum())
    encode = {}
    for b, box in enumerate(blocks):
        rr, cc = np.nonzero(missing[box.slices])
        if len(rr):
            encode[b] = [(int(r) + box.y0, int(c) + box.x0) for r, c in zip(rr, cc)]
    regions = {}
    for b in waits:
        box = blocks[b]
        rr, cc = np.nonzero(book.final[box.slices])
        regions[b] = [(int(r) + box.y0, int(c) + box.x0) for r, c in zip(rr, cc)]
    read_lists = {b: sorted(m) for b, m in reads.items()}
    return Schedule(blocks, encode, read_lists, regions,
                    {b: {e for e in w if e in encode} for b, w in waits.items()}, from_cache)
