"""Threads and memory of the streaming pipeline.

- `Prefetcher`: a reader thread that reads region pixels for a fixed sequence of encode
  batches through a bounded queue (at most `depth` batches ahead), so reading and
  decompression overlap the device. On CUDA the batch goes into pinned host memory so the
  copy to the device is asynchronous. A region that cannot be read is reported in the batch's
  `failed` dict, never replaced by zeros.
- `FeatureSlab`: region features kept in memory (on the device) in one tensor, a slot per
  region, least recently used slots reused.
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
    """The pixels of one batch of regions, as `read_batch` gives them: `indices` the regions read
    (in order) and their `pixels` (n, C, S, S), None when none could be read; `bad` the (S, S)
    masks of non-finite pixels per region; `failed` the reason for each region that could not be
    read; `seconds` the read time."""

    indices: list[Index]  # regions read successfully, in order
    pixels: torch.Tensor | None  # (n, C, S, S) float32 (pinned on CUDA)
    bad: dict[Index, np.ndarray] = field(default_factory=dict)  # (S, S) non-finite masks
    failed: dict[Index, str] = field(default_factory=dict)  # region -> reason
    seconds: float = 0.0


def read_batch(source: Any, plan: Any, indices: Sequence[Index], pin: bool) -> PixelBatch:
    """The pixels of regions `indices` as a `PixelBatch`: each region's box read by `source.fill`
    (zero-padded to S x S), then normalised for the whole batch by `source.finish`. A region
    whose read raises is listed in `failed` with the error, never zero-filled. `pin`: into pinned
    host memory (asynchronous copies to CUDA). Called by the reader thread, or by the engine's
    thread for direct reads."""
    import time

    t0 = time.perf_counter()
    s = plan.region_size
    out = np.empty((len(indices), source.channels, s, s), np.float32)  # (n, C, S, S)
    ok, sizes, failed = [], [], {}
    for r, c in indices:
        try:
            sizes.append(source.fill(plan.box(r, c), out[len(ok)]))
        except Exception as err:  # any read error marks only this region failed
            failed[(r, c)] = f"{type(err).__name__}: {err}"
            continue
        ok.append((r, c))
    masks = source.finish(out[: len(ok)], sizes)  # normalised in whole-batch operations
    bad = {i: m for i, m in zip(ok, masks) if m is not None}
    pixels = None
    if ok:
        pixels = torch.from_numpy(out[: len(ok)])
        if pin:
            pixels = pixels.pin_memory()
    return PixelBatch(ok, pixels, bad, failed, time.perf_counter() - t0)


class Prefetcher:
    """Reads `batches` (lists of region indices) in order, `depth` batches ahead on a
    background thread (`threaded`, beside a GPU), or each when it is asked for (on the CPU,
    where a reader thread would take cores from torch's threads: measured 0.5 s of a 5.7 s
    4096^2 run on 2 cores)."""

    def __init__(self, source: Any, plan: Any, batches: Sequence[Sequence[Index]],
                 pin: bool = False, depth: int = 3, threaded: bool = True) -> None:
        self.source, self.plan, self.pin = source, plan, pin
        self.batches = [list(b) for b in batches]
        self.depth = max(1, depth)
        self.queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self.consumed = 0
        self.last_batch = {i: n for n, b in enumerate(self.batches) for i in b}
        self.thread: threading.Thread | None = None
        if threaded:
            self.thread = threading.Thread(target=self._loop, name="napari-xt-reader",
                                           daemon=True)
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
        """Raises ReaderError (caused by the reader thread's own error) when the reader thread
        failed."""
        if self.error is not None:
            raise ReaderError(f"the reader thread failed: {type(self.error).__name__}: "
                              f"{self.error}") from self.error

    def pending(self) -> bool:
        """Whether some batch was not yet taken by `next`."""
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
        if self.thread is None:
            batch = self.batches[self.consumed]
            self.consumed += 1
            return read_batch(self.source, self.plan, batch, self.pin)
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
        """Stops the reader: no further batch is read, queued ones are dropped, and the thread is
        joined (for up to 10 s)."""
        self.stopped.set()
        if self.thread is None:
            return
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.thread.join(timeout=10)


class FeatureSlab:
    """Region features in preallocated tensors (one per level), a slot per region, least
    recently used slots reused first (never a pinned one: the regions of the crop being
    assembled).

    `put(indices, levels)` stores a batch ([(n, C_l, h_l, w_l)] per level) with one copy per
    level; `stack(indices, levels)` gives the chosen levels of many regions with one index
    operation each, so assembling a crop costs the same whatever its number of regions, and
    the context step copies only the deepest level. The slab grows (doubling) only if every
    slot is pinned.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, int(capacity))
        self.slots: OrderedDict[Index, int] = OrderedDict()  # LRU order
        self.free: list[int] = []
        self.pinned: set[Index] = set()
        self.held: dict[Index, int] = {}  # regions kept whatever the LRU says (queued work)
        self.data: list[torch.Tensor] = []  # per level (capacity, C_l, h_l, w_l)

    def __contains__(self, index: Index) -> bool:
        return index in self.slots

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def levels(self) -> int:
        """The number of feature levels held (0 before the first `put`)."""
        return len(self.data)

    def _slot(self, keep: set[Index] | frozenset = frozenset()) -> int:
        if self.free:
            return self.free.pop()
        for old in self.slots:  # least recently used first
            if old not in self.pinned and old not in self.held and old not in keep:
                return self.slots.pop(old)
        grown = []
        for d in self.data:
            g = torch.empty((2 * self.capacity, *d.shape[1:]), dtype=d.dtype, device=d.device)
            g[: self.capacity] = d
            grown.append(g)
        self.free = list(range(2 * self.capacity - 1, self.capacity, -1))
        slot, self.capacity, self.data = self.capacity, 2 * self.capacity, grown
        return slot

    def put(self, indices: Sequence[Index], levels: Sequence[torch.Tensor]) -> None:
        """Stores the features of `indices`, one batch ([(n, C_l, h_l, w_l)] per level, cast to
        the slab's dtypes), in each region's own slot or a free or least recently used one that
        is neither pinned nor held. The first call allocates the slab with its levels' shapes,
        dtypes and device."""
        if not self.data:
            self.data = [torch.empty((self.capacity, *lv.shape[1:]), dtype=lv.dtype,
                                     device=lv.device) for lv in levels]
            self.free = list(range(self.capacity - 1, -1, -1))
        slots: list[int] = []
        placed: set[Index] = set()  # never evicted by this same call: two regions in one
        for idx in indices:  # slot would leave one of them with the other's features
            old = self.slots.pop(idx, None)
            slot = old if old is not None else self._slot(placed)
            self.slots[idx] = slot
            placed.add(idx)
            slots.append(slot)
        where = torch.as_tensor(slots, device=self.data[0].device)
        for d, lv in zip(self.data, levels):
            d[where] = lv.to(d.dtype)

    def stack(self, indices: Sequence[Index], levels: Sequence[int] | None = None
              ) -> list[torch.Tensor]:
        """[(n, C_l, h_l, w_l)] of `indices` for `levels` (default: all, shallow to deep);
        the regions are marked recently used."""
        slots = []
        for idx in indices:
            self.slots.move_to_end(idx)
            slots.append(self.slots[idx])
        where = torch.as_tensor(slots, device=self.data[0].device)
        chosen = range(len(self.data)) if levels is None else levels
        return [self.data[lv][where] for lv in chosen]


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
