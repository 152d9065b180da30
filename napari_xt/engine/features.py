"""`FeatureSupply`: region features where the crops need them, each region encoded once.

A crop asks for its regions' features (`ensure`); they come from memory (`FeatureSlab`),
else from the embedding cache (checked: a region whose cached bytes do not verify is
encoded again, with a notice), else from the reader thread's next pixel batches through the
region encoder (batched, out-of-memory back-off), else, when the visiting order changed
(viewport) and the region is not close in the read-ahead, from a direct read. Unreadable
regions are marked failed in the book (`on_error="stop"` ends the run instead).

Features per region: [(C_l, h_l, w_l)] shallow to deep, on the device; fp16-rounded when the
cache is on, so a resumed run equals an uninterrupted one exactly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from .device import BatchRunner, autocast, background_threads
from .events import Event, Notice, RegionEncoded, RegionFailed
from .pipeline import FeatureSlab, PixelBatch, Prefetcher, encode_sequence, read_batch
from .regions import ENCODED, QUEUED, RegionBook

Index = tuple[int, int]


def cached_dtype(device: torch.device) -> torch.dtype:
    """The dtype features are used in when the cache is on (read back or freshly encoded
    alike): float32 on the CPU, bfloat16 on accelerators (half the memory of the slab)."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


class RunStopped(Exception):
    """Ends the run with a Failed event (the message is args[0]); finished work is kept."""


class FeatureSupply:
    """The features of the regions each crop needs (see the module docstring), one per run, used
    from the engine's thread. Pixels come from the `Prefetcher` that `start` sets up (a reader
    thread beside a GPU), or are read directly; out-of-memory back-offs are appended to
    `notices`."""

    def __init__(self, spec: Any, book: RegionBook, cache: Any, store: Any,
                 notices: list[Event]) -> None:
        self.spec, self.book, self.cache, self.store = spec, book, cache, store
        self.notices = notices  # events for the run's stream, emitted between crops
        self.runner = BatchRunner(spec.batch_size, spec.device,
                                  lambda m: notices.append(Notice(m, "oom")))
        self.cache_sized = False  # the embedding cache's disk estimate was reported
        self.prefetch: Prefetcher | None = None  # none before `start`: reads are direct
        plan, bs = spec.plan, spec.batch_size
        self.lru = FeatureSlab((plan.strip_width * plan.stride + plan.k) * plan.k + 2 * bs)

    def start(self, crops: list[Any]) -> None:
        """Plan the reads for `crops` (visiting order) and start the reader thread."""
        plan, bs = self.spec.plan, self.spec.batch_size
        cap = (plan.strip_width * plan.stride + plan.k) * plan.k
        planned: set[Index] = set()

        def known(idx: Index) -> bool:
            if self.cache is None:
                return False
            if self.cache.has(*idx) or idx in planned:
                return True
            planned.add(idx)
            return False

        seq = encode_sequence(crops, cap, known, set())
        self.book.advance(seq, QUEUED)
        batches = [seq[i:i + bs] for i in range(0, len(seq), bs)]
        self.prefetch = Prefetcher(self.spec.source, plan, batches,
                                   pin=self.spec.device.type == "cuda",
                                   threaded=background_threads(self.spec.device))

    def stop(self) -> None:
        """Stops the reader thread (nothing to do before `start`)."""
        if self.prefetch is not None:
            self.prefetch.stop()

    def __contains__(self, idx: Index) -> bool:
        return idx in self.lru

    def hold(self, idx: Index) -> None:
        """Keep the features of `idx` in memory until `release` (it waits to be decoded)."""
        self.lru.held[idx] = self.lru.held.get(idx, 0) + 1

    def release(self, idx: Index) -> None:
        """Undoes one `hold` of `idx`; with no hold left its features may be evicted again."""
        n = self.lru.held.get(idx, 0) - 1
        if n > 0:
            self.lru.held[idx] = n
        else:
            self.lru.held.pop(idx, None)

    def stack(self, indices: list[Index], deepest: bool = False,
              levels: list[int] | None = None) -> list[torch.Tensor]:
        """Features of `indices`: [(n, C_l, h_l, w_l)] shallow to deep (only the deepest
        level, what the context step needs, with `deepest`; only `levels` when given)."""
        if deepest:
            levels = [self.lru.levels - 1]
        return self.lru.stack(indices, levels)

    # ------------------------------------------------------------------ ensure
    def ensure(self, regions: list[Index]) -> Iterator[Event]:
        """Make the features of `regions` available (failed ones excepted)."""
        lru, book, cache = self.lru, self.book, self.cache
        lru.pinned = set(regions)
        for idx in regions:
            if idx in lru or not book.usable(idx):
                continue
            if cache is not None and cache.has(*idx):
                yield from self._from_cache([i for i in regions if i not in lru
                                             and book.usable(i) and cache.has(*i)])
                if idx in lru:
                    continue
            # take prefetched batches only while the region is close in the read-ahead; when
            # the order changed (viewport moved) read what this crop needs directly, so the
            # regions now in view never wait behind the whole old queue
            pf = self.prefetch
            while (pf is not None and idx not in lru and book.usable(idx) and pf.will_read(idx)
                   and pf.batches_ahead(idx) < pf.depth):
                yield from self._encode(pf.next())
            if idx not in lru and book.usable(idx):
                missing = [i for i in regions if i not in lru and book.usable(i)
                           and not (cache is not None and cache.has(*i))]
                yield from self._encode(read_batch(self.spec.source, self.spec.plan, missing,
                                                   False))

    def _from_cache(self, want: list[Index]) -> Iterator[Event]:
        t = time.perf_counter()
        found, levels, bad, masks = self.cache.get(want)
        if bad:
            first = next(iter(bad.values()))
            yield Notice(f"embedding cache {self.cache.path}: {len(bad)} region(s) did not "
                         f"read back intact ({first}); encoding them again", "cache")
        if masks:  # regions that had non-finite pixels: masked as when they were read
            self.book.bad.update(masks)
            n = sum(int(m.sum()) for m in masks.values())
            self.book.counts["nonfinite_pixels"] += n
            yield Notice(f"{n} non-finite pixels (NaN/inf) in regions {sorted(masks)} (as "
                         "cached): written as label 0 / no data", "nan")
        dtype = cached_dtype(self.spec.device)
        if found:
            self.lru.put(found, [torch.from_numpy(lv).to(self.spec.device, dtype)
                                 for lv in levels])
        self.book.advance(found, ENCODED)
        self.book.counts["from_cache"] += len(found)
        if found:
            yield RegionEncoded(tuple(found), len(found), time.perf_counter() - t, True)

    def _encode(self, batch: PixelBatch) -> Iterator[Event]:
        book, spec, cache = self.book, self.spec, self.cache
        for idx, reason in batch.failed.items():
            book.fail(idx)
            self.store.put_failed([idx], reason)
            yield RegionFailed((idx,), reason)
            if spec.on_error == "stop":
                raise RunStopped(f"region {idx} could not be read: {reason}; finished "
                                 "regions are kept, run again to resume")
        if batch.pixels is None:
            return
        fresh = [n for n, i in enumerate(batch.indices) if i not in self.lru
                 and not (cache is not None and cache.has(*i))]
        if len(fresh) < len(batch.indices):  # read directly earlier: never encode twice
            if not fresh:
                return
            kept = [batch.indices[n] for n in fresh]
            batch = PixelBatch(kept, batch.pixels[fresh],
                               {i: m for i, m in batch.bad.items() if i in kept}, {},
                               batch.seconds)
        if batch.bad:
            n = sum(int(m.sum()) for m in batch.bad.values())
            book.counts["nonfinite_pixels"] += n
            book.bad.update(batch.bad)
            yield Notice(f"{n} non-finite pixels (NaN/inf) in regions {sorted(batch.bad)}: "
                         "replaced by 0 for the model, written as label 0 / no data", "nan")
        t = time.perf_counter()
        x = batch.pixels.to(spec.device, non_blocking=True)  # (n, C, S, S)
        if spec.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)

        def encode(items: list[int]) -> list[list[torch.Tensor]]:
            # always a full batch (the last one padded with copies of its last region): a
            # region's features then do not depend on which regions share its batch, so a
            # resumed run equals an uninterrupted one bit for bit
            part = x[items[0]:items[-1] + 1]
            n, pad = len(items), self.runner.batch_size - len(items)
            if pad > 0:
                part = torch.cat([part, part[-1:].expand(pad, *part.shape[1:])])
            with torch.inference_mode(), autocast(spec.device):
                feats = spec.model.encode_regions(part)  # [(n, C_l, h, w)]
            return [[f[:n] for f in feats] if pad > 0 else feats]  # one part per sub-batch

        parts = self.runner.run_batches(len(batch.indices), encode)
        levels = (parts[0] if len(parts) == 1 else
                  [torch.cat([p[lv] for p in parts]) for lv in range(len(parts[0]))])
        if cache is not None:
            cache.put(batch.indices, [lv.float().cpu().numpy() for lv in levels], batch.bad)
            if not self.cache_sized:  # once, when the size of one region is known
                self.cache_sized = True
                message, fits = cache.size_notice()
                yield Notice(message, "cache" if fits else "warning")
            # what a later run reads back from the cache, exactly (fp16 values, in the
            # dtype cached features are used in on this device)
            levels = [lv.half().to(cached_dtype(spec.device)) for lv in levels]
        self.lru.put(batch.indices, levels)
        book.advance(batch.indices, ENCODED)
        book.counts["encoded"] += len(batch.indices)
        yield RegionEncoded(tuple(batch.indices), self.runner.batch_size,
                            time.perf_counter() - t + batch.seconds, False)
