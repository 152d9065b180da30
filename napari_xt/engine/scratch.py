"""Blending accumulators of unfinished regions, bounded in memory whatever the image size.

A region's accumulator (window-weighted sum of its context token map, D x h x w, plus the
window sum, h x w; or with blend="outputs" of its decoded maps, C_tot x S x S and S x S)
lives from the first crop that covers it to the last. In strip order
most live only while their strip passes, but the `k - stride` boundary columns shared with
the next strip wait for it: their number grows with the grid's height. `Accumulators`
keeps the `capacity` most recently used ones in memory (on the device) and spills the
others, exactly (float32), to a scratch folder from which they come back when a crop needs
them. The folder is removed by `close()` (and when the object is collected); its contents
are never needed after the run (a resumed run recomputes unfinished regions anyway).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

Index = tuple[int, int]


class Accumulators:
    """region -> [sum (C, S, S), weight (S, S)], at most `capacity` in memory."""

    def __init__(self, capacity: int, device: torch.device | str = "cpu",
                 folder: str | None = None) -> None:
        self.capacity = max(1, int(capacity))
        self.device = torch.device(device)
        self._parent = folder
        self._mem: OrderedDict[Index, list[torch.Tensor]] = OrderedDict()
        self._spilled: set[Index] = set()
        self._dir: Path | None = None
        self._cleanup = None
        self.spills = 0  # how many accumulators went to disk (for tests and reports)

    def __contains__(self, idx: Index) -> bool:
        return idx in self._mem or idx in self._spilled

    def __len__(self) -> int:
        return len(self._mem) + len(self._spilled)

    @property
    def in_memory(self) -> int:
        """How many accumulators are in memory (the others are spilled to disk)."""
        return len(self._mem)

    def resident(self, idx: Index) -> list[torch.Tensor] | None:
        """The accumulator of `idx` when it is in memory (marked recently used), else None
        (never loads one, so never spills another)."""
        slot = self._mem.get(idx)
        if slot is not None:
            self._mem.move_to_end(idx)
        return slot

    def get(self, idx: Index) -> list[torch.Tensor] | None:
        """The accumulator of `idx` (brought back from disk if spilled), or None."""
        slot = self._mem.get(idx)
        if slot is not None:
            self._mem.move_to_end(idx)
            return slot
        if idx not in self._spilled:
            return None
        path = self._path(idx)
        with np.load(path) as data:
            slot = [torch.from_numpy(data["acc"]).to(self.device),
                    torch.from_numpy(data["wsum"]).to(self.device)]
        path.unlink()
        self._spilled.discard(idx)
        self._put(idx, slot)
        return slot

    def new(self, idx: Index, acc: torch.Tensor, wsum: torch.Tensor) -> list[torch.Tensor]:
        """Makes `acc` and `wsum` (kept as they are, not copied) the accumulator of `idx` and
        returns it; the least recently used one beyond `capacity` is spilled."""
        slot = [acc, wsum]
        self._put(idx, slot)
        return slot

    def pop(self, idx: Index) -> list[torch.Tensor]:
        """Removes and returns the accumulator [sum, weight] of `idx` (brought back from disk if
        it was spilled); raises KeyError when there is none."""
        slot = self.get(idx)
        if slot is None:
            raise KeyError(idx)
        del self._mem[idx]
        return slot

    def close(self) -> None:
        """Drops every accumulator and removes the scratch folder."""
        self._mem.clear()
        self._spilled.clear()
        if self._cleanup is not None:
            self._cleanup()
        self._dir = self._cleanup = None

    # ------------------------------------------------------------------ internals
    def _put(self, idx: Index, slot: list[torch.Tensor]) -> None:
        self._mem[idx] = slot
        self._mem.move_to_end(idx)
        while len(self._mem) > self.capacity:
            old, (acc, wsum) = self._mem.popitem(last=False)
            self._spill(old, acc, wsum)

    def _spill(self, idx: Index, acc: torch.Tensor, wsum: torch.Tensor) -> None:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="napari-xt-scratch-", dir=self._parent))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        with open(self._path(idx), "wb") as f:
            np.savez(f, acc=acc.detach().float().cpu().numpy(),
                     wsum=wsum.detach().float().cpu().numpy())
        self._spilled.add(idx)
        self.spills += 1

    def _path(self, idx: Index) -> Path:
        assert self._dir is not None
        return self._dir / f"{idx[0]}_{idx[1]}.npz"
