"""Threads and memory of the streaming pipeline.

- `Prefetcher`: a reader thread that reads region pixels for a fixed sequence of encode
  batches through a bounded queue (at most `depth` batches ahead), so reading and
  decompression overlap the device. On CUDA the batch goes into pinned host memory so the
  copy to the device is asynchronous. A region that cannot be read is reported in the batch's
  `failed` dict, never replaced by zeros.
- `FeatureLRU`: region features kept in memory (on the device), least recently used evicted.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

Index = tuple[int, int]


class ReaderError(RuntimeError):
    """The reader thread died (its own error is the cause)."""


@dataclass
class PixelBatch:
    indices: list[Index]  # regions read successfully, in order
    pixels: torch.Tensor | None  # (n, C, S, S) float32 (pinned on CUDA)
    bad: dict[Index, np.ndarray] = field(default_factory=dict)  # (S, S) non-finite masks
    failed: dict[Index, str] = field(default_factory=dict)  # region -> reason
    seconds: float = 0.0


def read_batch(source: Any, plan: Any, indices: Sequence[Index], pin: bool) -> PixelBatch:
    import time

    t0 = time.perf_counter()
    ok, arrays, bad, failed = [], [], {}, {}
    for r, c in indices:
        try:
            x, mask = source.read(plan.box(r, c), plan.region_size)
        except Exception as err:  # any read error marks only this region failed
            failed[(r, c)] = f"{type(err).__name__}: {err}"
            continue
        ok.append((r, c))
        arrays.append(x)
        if mask.any():
            bad[(r, c)] = mask
    pixels = None
    if arrays:
        pixels = torch.from_numpy(np.stack(arrays))  # (n, C, S, S)
        if pin:
            pixels = pixels.pin_memory()
    return PixelBatch(ok, pixels, bad, failed, time.perf_counter() - t0)


class Prefetcher:
    """Reads `batches` (lists of region indices) in order on a background thread."""

    def __init__(self, source: Any, plan: Any, batches: Sequence[Sequence[Index]],
                 pin: bool = False, depth: int = 3) -> None:
        self.source, self.plan, self.pin = source, plan, pin
        self.batches = [list(b) for b in batches]
        self.depth = max(1, depth)
        self.queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self.consumed = 0
        self.last_batch = {i: n for n, b in enumerate(self.batches) for i in b}
        self.thread = threading.Thread(target=self._loop, name="napari-xt-reader", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            for batch in self.batches:
                if self.stopped.is_set():
                    return
                item = read_batch(self.source, self.plan, batch, self.pin)
                while not self.stopped.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # e.g. MemoryError: forwarded to the compute thread
            self.error = err

    def check(self) -> None:
        if self.error is not None:
            raise ReaderError(f"the reader thread failed: {type(self.error).__name__}: "
                              f"{self.error}") from self.error

    def pending(self) -> bool:
        return self.consumed < len(self.batches)

    def will_read(self, index: Index) -> bool:
        """True when a batch not yet consumed holds `index`."""
        return self.last_batch.get(index, -1) >= self.consumed

    def batches_ahead(self, index: Index) -> int:
        """How many batches must be consumed before the one holding `index` (-1: none)."""
        return self.last_batch.get(index, -1) - self.consumed

    def next(self) -> PixelBatch | None:
        """The next batch in order; raises `ReaderError` when the reader thread failed
        (never waits on a dead thread)."""
        if not self.pending():
            return None
        while True:
            try:
                item = self.queue.get(timeout=0.1)
                break
            except queue.Empty:
                self.check()
                if not self.thread.is_alive() and self.queue.empty():
                    self.check()
                    raise ReaderError(
                        "the reader thread stopped before reading every batch") from None
        self.consumed += 1
        return item

    def stop(self) -> None:
        self.stopped.set()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.thread.join(timeout=10)


class FeatureLRU:
    """region -> list of per-level features [(C_l, h_l, w_l)], bounded by `capacity`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, int(capacity))
        self.items: OrderedDict[Index, list[torch.Tensor]] = OrderedDict()
        self.pinned: set[Index] = set()  # the regions of the crop being assembled

    def __contains__(self, index: Index) -> bool:
        return index in self.items

    def get(self, index: Index) -> list[torch.Tensor]:
        self.items.move_to_end(index)
        return self.items[index]

    def put(self, index: Index, feats: list[torch.Tensor]) -> None:
        self.items[index] = feats
        self.items.move_to_end(index)
        if len(self.items) > self.capacity:
            for old in [k for k in self.items if k not in self.pinned]:
                del self.items[old]
                if len(self.items) <= self.capacity:
                    break


def encode_sequence(crops: Sequence[Any], capacity: int, known: Any,
                    skip: set[Index]) -> list[Index]:
    """Regions to read and encode, in order of first need, simulating a `capacity` LRU over
    the crops' regions; regions for which `known(index)` is true come from the cache."""
    lru: OrderedDict[Index, None] = OrderedDict()
    out: list[Index] = []
    for crop in crops:
        for idx in crop.regions():
            if idx in skip:
                continue
            if idx in lru:
                lru.move_to_end(idx)
                continue
            if not known(idx):
                out.append(idx)
            lru[idx] = None
            while len(lru) > capacity:
                lru.popitem(last=False)
    return out
