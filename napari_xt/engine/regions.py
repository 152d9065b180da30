"""`RegionBook`: the one owner of every region's lifecycle during a run.

    pending -> queued -> encoded -> contextualized -> decoded (final, handed to the store)
                  \\-> failed (unreadable; retried by the next run)

`state` holds the furthest stage each region reached (the values the Run xT widget colours
by); `final` marks regions whose outputs will not change any more (decoded in every crop
that covers them, or done by an earlier run); `remaining` counts the crops still to come
for each region. Persisted status (done / failed) is the store's business, not this book's:
the book starts from what the store verified.

The four kinds of "state" in napari-xt, named apart: region state (this book), context
state (`ContextState` of the context encoder, carried between crops), store state (the
store's journal: what is durably committed) and widget state (the Run xT panel).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .plan import Crop, RegionPlan

Index = tuple[int, int]

PENDING, QUEUED, ENCODED, CONTEXTUALIZED, DECODED, FAILED = range(6)
STATE_NAMES = ("pending", "queued", "encoded", "contextualized", "decoded", "failed")


class RegionBook:
    """The lifecycle of every region of one run (see the module docstring), used from the
    engine's thread: `state` (rows, cols) uint8 of the stage codes (`PENDING` to `FAILED`),
    `final`, `remaining`, the `failed` and `tainted` regions, `bad` the non-finite pixel masks
    waiting for their region's finalisation, and `counts` of the work done (reported by
    `Finished`)."""

    def __init__(self, plan: RegionPlan, done: np.ndarray | None = None,
                 done_crops: Iterable[int] | None = None) -> None:
        """`done`: regions an earlier run finished (dense models); `done_crops`: crops an
        earlier run finished (classifiers, whose progress is per crop: a region is final
        when every crop covering it is done)."""
        self.plan = plan
        self.done_crops: set[int] = set(done_crops or ())
        if done_crops is not None:
            self.remaining = np.zeros(plan.grid, np.int32)
            for c in plan.crops:
                if c.index not in self.done_crops:
                    self.remaining[c.row0:c.row0 + c.rows, c.col0:c.col0 + c.cols] += 1
            self.final = self.remaining == 0
        else:
            self.final = (np.zeros(plan.grid, bool) if done is None
                          else np.asarray(done, bool).copy())
            self.remaining = np.where(self.final, 0, plan.coverage).astype(np.int32)
        self.state = np.where(self.final, DECODED, PENDING).astype(np.uint8)
        self.failed: set[Index] = set()
        self.tainted: set[Index] = set()  # contextualized in a crop that lacked a failed region
        self.bad: dict[Index, np.ndarray] = {}  # (S, S) masks of non-finite input pixels
        self.done_before = int(self.final.sum())
        self.counts = {"encoded": 0, "from_cache": 0, "decoded": 0, "written": 0,
                       "failed": 0, "crops": 0, "nonfinite_pixels": 0}

    def advance(self, indices: Iterable[Index], state: int) -> None:
        """Raises the state of `indices` to `state`; never lowers one, and failed regions stay
        failed."""
        for idx in indices:
            if self.state[idx] != FAILED:
                self.state[idx] = max(self.state[idx], state)

    def fail(self, idx: Index) -> None:
        """Marks region `idx` failed (its pixels could not be read)."""
        self.failed.add(idx)
        self.state[idx] = FAILED

    def usable(self, idx: Index) -> bool:
        """Whether region `idx` has not failed in this run."""
        return idx not in self.failed

    def todo_crops(self, per_crop: bool = False) -> list[int]:
        """Crops still to run: with a region that is not final yet (or, `per_crop`, not
        done themselves)."""
        if per_crop:
            return [c.index for c in self.plan.crops if c.index not in self.done_crops]
        return [c.index for c in self.plan.crops if not self.final[c.row0:c.row0 + c.rows,
                                                                  c.col0:c.col0 + c.cols].all()]

    def crop_passed(self, crop: Crop, regions: Iterable[Index]) -> list[Index]:
        """One more crop covered `regions`: those whose covering crops are now all done."""
        complete = []
        for idx in regions:
            self.remaining[idx] -= 1
            if self.remaining[idx] == 0:
                complete.append(idx)
        return complete

    def finalize(self, indices: Iterable[Index]) -> None:
        """Marks `indices` final (decoded, handed to the store: their outputs will not change)."""
        for idx in indices:
            self.final[idx] = True
            self.state[idx] = DECODED

    @property
    def done(self) -> int:
        """The number of final regions, those an earlier run finished included."""
        return int(self.final.sum())

