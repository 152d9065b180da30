"""`Execution`: the compute loop behind `run` (one instance per run, one thread).

Per crop, in visiting order: make sure its regions' features are in memory (LRU, else the
embedding cache, else the next prefetched pixel batches through the encoder), stitch the
deepest features into the crop's token sequence with crop-local positions (`region_tokens`),
`contextualize`, blend across crops (window-weighted sums per region of its tokens, or of
its decoded maps with blend="outputs"), decode, and hand every region whose covering crops
are all done to the writer thread.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .crops import CropStages
from .device import BatchRunner, autocast, pick_device, release
from .events import (
    Cancelled,
    Event,
    Failed,
    Finished,
    Notice,
    Planned,
    RegionEncoded,
    RegionFailed,
    Written,
)
from .finish import classification_record, finish_outputs
from .outputs import RegionWriter
from .pipeline import FeatureLRU, PixelBatch, Prefetcher, encode_sequence, read_batch
from .plan import ViewportOrder
from .scratch import Accumulators
from .store import (
    STATE_DONE,
    STATE_ENCODED,
    STATE_FAILED,
    STATE_PENDING,
    STATE_QUEUED,
    StoreError,
)

Index = tuple[int, int]


class _Stop(Exception):
    """Ends the compute loop with a Failed event (message in args[0])."""


class Execution(CropStages):
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)
        self.device = pick_device(self.device)
        self.pending: list[Event] = []
        self.runner = BatchRunner(self.batch_size, self.device,
                                  lambda m: self.pending.append(Notice(m, "oom")))
        self.counts = {"encoded": 0, "from_cache": 0, "decoded": 0, "written": 0,
                       "failed": 0, "crops": 0, "nonfinite_pixels": 0}
        self.failed: set[Index] = set()
        self.bad: dict[Index, np.ndarray] = {}
        self.acc: Accumulators | None = None  # set once the plan's strip size is known
        self.windows: dict[tuple[int, ...], torch.Tensor] = {}
        self.group_regions = self.batch_size  # regions per batched context/decode call
        self.decode_chunk: int | None = None  # regions per decode call (None: a whole crop)
        self.cache_sized = False  # the embedding cache's disk estimate was reported

    # ------------------------------------------------------------------ setup
    def _progress(self) -> None:
        plan, store = self.plan, self.store
        self.state_array = store.array("_progress/region_state", plan.grid, plan.grid, np.uint8)
        state = np.asarray(self.state_array[...]) if store.resumed else np.zeros(plan.grid,
                                                                                 np.uint8)
        self.final = state == STATE_DONE
        state[~self.final] = STATE_PENDING
        self.state = state
        self.classify = self.layout is None
        if self.classify:
            k = self.model.cfg.num_classes
            n = len(plan.crops)
            self.logit_array = store.array("_progress/crop_logits", (n, k), (n, k), np.float32)
            self.crop_done_array = store.array("_progress/crop_done", (n,), (n,), bool)
            self.crop_done = (np.asarray(self.crop_done_array[...]) if store.resumed
                              else np.zeros(n, bool))
            self.logits = np.asarray(self.logit_array[...], np.float32)
            self.todo = [c.index for c in plan.crops if not self.crop_done[c.index]]
            self.remaining = np.zeros(plan.grid, np.int32)
            for ci in self.todo:
                c = plan.crops[ci]
                self.remaining[c.row0:c.row0 + c.rows, c.col0:c.col0 + c.cols] += 1
            self.final = self.remaining == 0
            self.writer = None
        else:
            self.todo = [c.index for c in plan.crops
                         if not all(self.final[i] for i in c.regions())]
            self.remaining = np.where(self.final, 0, plan.coverage).astype(np.int32)
            detected = store.points_done(plan.grid) if store.resumed else None
            self.writer = RegionWriter(store, plan, self.layout, self.outputs, self.state,
                                       self.state_array, self.detect, detected, self.name)

    def _crop_order(self) -> Any:
        todo = set(self.todo)
        if self.order == "viewport":
            return ViewportOrder(self.plan, self.todo, self.point, self.priority)
        return [i for i in self.plan.order(self.order) if i in todo]

    # ------------------------------------------------------------------ events
    def events(self) -> Iterator[Event]:
        t0 = time.perf_counter()
        plan = self.plan
        self.model.eval()
        if self.device.type == "cuda":
            self.model.to(self.device, memory_format=torch.channels_last)
        else:
            self.model.to(self.device)
        attrs = self.store.attrs() if self.store.resumed else {}
        if attrs.get("complete"):
            yield from self._already_complete(attrs, t0)
            return
        self._progress()
        done0 = int(self.final.sum())
        order = self._crop_order()
        yield Planned(plan.num_regions, plan.num_regions - done0, plan.grid, plan.region_size,
                      len(self.todo), plan.k, self.order, (plan.height, plan.width),
                      self.store.resumed, None if self.store.path is None else str(self.store.path))
        if self.store.resumed:
            yield Notice(f"resuming: {done0} of {plan.num_regions} regions already done",
                         "resume")
        if self.cache is not None and self.cache.rebuilt:
            yield Notice(f"embedding cache {self.cache.path} did not match; rebuilt", "cache")
        sim = list(order) if isinstance(order, list) else list(order.pending)
        cap = (plan.strip_width * plan.stride + plan.k) * plan.k
        planned: set[Index] = set()

        def known(idx: Index) -> bool:
            if self.cache is None:
                return False
            if self.cache.has(*idx) or idx in planned:
                return True
            planned.add(idx)
            return False

        seq = encode_sequence([plan.crops[i] for i in sim], cap, known, set())
        for idx in seq:
            self.state[idx] = max(self.state[idx], STATE_QUEUED)
        bs = self.batch_size
        batches = [seq[i:i + bs] for i in range(0, len(seq), bs)]
        self.prefetch = Prefetcher(self.source, plan, batches, pin=self.device.type == "cuda")
        self.lru = FeatureLRU(cap + 2 * bs)
        # boundary columns waiting for the next strip go to disk instead of growing memory
        self.acc = Accumulators(cap + 2 * bs, self.device)
        self.context_state = None
        try:
            group: list[Any] = []
            for ci in order:
                if self.cancelled():
                    yield from self._wind_down()
                    yield Cancelled(int((self.state == STATE_DONE).sum()), plan.num_regions)
                    return
                crop = plan.crops[ci]
                if not self._batchable(crop, group):
                    yield from self._flush(group)
                    group = []
                if self._batchable(crop, group):
                    group.append(crop)
                    if sum(c.rows * c.cols for c in group) >= self.group_regions:
                        yield from self._flush(group)
                        group = []
                else:
                    yield from self._crop(crop)
                yield from self._drain()
            yield from self._flush(group)
            yield from self._wind_down()
            summary = finish_outputs(self.store, self.writer, self.layout, self.outputs,
                                     self.name, self.source, self._record())
        except (GeneratorExit, KeyboardInterrupt):  # consumer stopped: keep finished work
            self._abort()
            raise
        except _Stop as stop:
            self._abort()
            yield from self._drain()
            yield Failed(str(stop.args[0]))
            return
        except (StoreError, OSError) as err:
            self._abort()
            yield Failed(f"cannot write the output store {self.store.path}: {err}; "
                         "finished regions are kept")
            return
        except Exception as err:
            self._abort()
            yield Failed(f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=6)}")
            return
        finally:
            if self.acc is not None:
                self.acc.close()
            release(self.device)
        complete = not self.failed
        self.store.set_attrs(self._provenance(summary, complete))
        self.counts["failed"] = len(self.failed)
        self.counts["regions"] = plan.num_regions
        yield Finished(time.perf_counter() - t0, dict(self.counts),
                       None if self.store.path is None else str(self.store.path),
                       {**summary, "complete": complete})

    def _already_complete(self, attrs: dict[str, Any], t0: float) -> Iterator[Event]:
        plan = self.plan
        yield Planned(plan.num_regions, 0, plan.grid, plan.region_size, 0, plan.k, self.order,
                      (plan.height, plan.width), True, str(self.store.path))
        yield Notice(f"resuming: {plan.num_regions} of {plan.num_regions} regions already "
                     "done; the store is complete", "resume")
        summary = dict(attrs.get("summary", {}))
        yield Finished(time.perf_counter() - t0, {**dict.fromkeys(self.counts, 0),
                                                  "regions": plan.num_regions},
                       str(self.store.path), {**summary, "complete": True})

    def _drain(self) -> Iterator[Event]:
        yield from self.pending
        self.pending.clear()
        if self.writer is not None:
            self.writer.check()
            total = self.plan.num_regions
            for indices, seconds in self.writer.written():
                self.counts["written"] += len(indices)
                yield Written(indices, seconds, int((self.state == STATE_DONE).sum()), total)

    def _wind_down(self) -> Iterator[Event]:
        self.prefetch.stop()
        if self.writer is not None:
            self.writer.close()
        self.state_array[...] = self.state
        yield from self._drain()

    def _abort(self) -> None:
        self.prefetch.stop()
        if self.writer is not None:
            try:
                self.writer.close()
            except BaseException:  # the first error is what gets reported
                pass
        try:
            self.state_array[...] = self.state
        except OSError:
            pass

    # ------------------------------------------------------------------ features
    def _ensure(self, regions: list[Index]) -> Iterator[Event]:
        self.lru.pinned = set(regions)
        for idx in regions:
            if idx in self.lru or idx in self.failed:
                continue
            if self.cache is not None and self.cache.has(*idx):
                t = time.perf_counter()
                want = [i for i in regions if i not in self.lru and i not in self.failed
                        and self.cache.has(*i)]
                levels = self.cache.get(want)
                dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
                for n, i in enumerate(want):
                    self.lru.put(i, [torch.from_numpy(lv[n]).to(self.device, dtype)
                                     for lv in levels])
                    self.state[i] = max(self.state[i], STATE_ENCODED)
                self.counts["from_cache"] += len(want)
                yield RegionEncoded(tuple(want), len(want), time.perf_counter() - t, True)
                continue
            # take prefetched batches only while the region is close in the read-ahead; when
            # the order changed (viewport moved) read what this crop needs directly, so the
            # regions now in view never wait behind the whole old queue
            while (idx not in self.lru and idx not in self.failed
                   and self.prefetch.will_read(idx)
                   and self.prefetch.batches_ahead(idx) < self.prefetch.depth):
                yield from self._encode(self.prefetch.next())
            if idx not in self.lru and idx not in self.failed:
                missing = [i for i in regions if i not in self.lru and i not in self.failed
                           and not (self.cache is not None and self.cache.has(*i))]
                yield from self._encode(read_batch(self.source, self.plan, missing, False))

    def _encode(self, batch: PixelBatch) -> Iterator[Event]:
        for idx, reason in batch.failed.items():
            self.failed.add(idx)
            self.state[idx] = STATE_FAILED
            yield RegionFailed((idx,), reason)
            if self.on_error == "stop":
                raise _Stop(f"region {idx} could not be read: {reason}; finished regions "
                            "are kept, run again to resume")
        if batch.pixels is None:
            return
        fresh = [n for n, i in enumerate(batch.indices) if i not in self.lru
                 and not (self.cache is not None and self.cache.has(*i))]
        if len(fresh) < len(batch.indices):  # read directly earlier: never encode twice
            if not fresh:
                return
            kept = [batch.indices[n] for n in fresh]
            batch = PixelBatch(kept, batch.pixels[fresh],
                               {i: m for i, m in batch.bad.items() if i in kept}, {},
                               batch.seconds)
        if batch.bad:
            n = sum(int(m.sum()) for m in batch.bad.values())
            self.counts["nonfinite_pixels"] += n
            self.bad.update(batch.bad)
            yield Notice(f"{n} non-finite pixels (NaN/inf) in regions {sorted(batch.bad)}: "
                         "replaced by 0 for the model, written as label 0 / no data", "nan")
        t = time.perf_counter()
        x = batch.pixels.to(self.device, non_blocking=True)  # (n, C, S, S)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)

        def encode(items: list[int]) -> list[list[torch.Tensor]]:
            with torch.inference_mode(), autocast(self.device):
                feats = self.model.encode_regions(x[items[0]:items[-1] + 1])  # [(n, C_l, h, w)]
            return [[f[j] for f in feats] for j in range(len(items))]

        per_region = self.runner.run(list(range(len(batch.indices))), encode)
        if self.cache is not None:
            levels = [torch.stack([r[lv] for r in per_region]).float().cpu().numpy()
                      for lv in range(len(per_region[0]))]
            self.cache.put(batch.indices, levels)
            if not self.cache_sized:  # once, when the size of one region is known
                self.cache_sized = True
                message, fits = self.cache.size_notice()
                yield Notice(message, "cache" if fits else "warning")
            per_region = [[f.half().to(f.dtype) for f in r] for r in per_region]
        for idx, feats in zip(batch.indices, per_region):
            self.lru.put(idx, feats)
            self.state[idx] = max(self.state[idx], STATE_ENCODED)
        self.counts["encoded"] += len(batch.indices)
        yield RegionEncoded(tuple(batch.indices), self.runner.batch_size,
                            time.perf_counter() - t + batch.seconds, False)

    def _record(self) -> dict[str, Any] | None:
        if not self.classify:
            return None
        done = self.crop_done
        return classification_record(self.logits[done].sum(0), int(done.sum()))

    def _provenance(self, summary: dict[str, Any], complete: bool) -> dict[str, Any]:
        import datetime

        from napari_xt import __version__

        return {
            "complete": complete, "model": self.model.cfg.name,
            "model_hash": self.signature["model_hash"], "version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "image": self.signature["image"], "level": self.source.level,
            # level-0 pixels per pixel of the processed level (tables are in level-0 pixels)
            "level_scale": [float(v) for v in self.source.scale],
            "settings": {k: v for k, v in self.signature.items() if k not in ("image",)},
            "device": str(self.device), "summary": {k: v for k, v in summary.items()
                                                   if k != "arrays"},
        }
