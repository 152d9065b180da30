"""`Execution`: one run, from the frozen `RunSpec` to the last event. Iterate it for events.

    Planned -> (RegionEncoded | ContextStep | RegionDecoded | Written | Notice |
                RegionFailed)* -> exactly one of Finished | Failed | Cancelled

A region's way through a run (`RegionBook` keeps its state):

    reader thread   FeatureSupply          CropRunner                 store writer thread
    pixels -------> encode (or cache) ---> context per crop, blend --> finalize -> commit
                                           over the crops, decode     (shards, journal)

Per crop, in visiting order: `FeatureSupply.ensure` the crop's features, `CropRunner.run`
the crop (alike crops in one batch), and every region whose covering crops are all done is
finalised in one batch (`finalize_regions`) and handed to the store. At the end the store
publishes the results (pyramids, tables, metadata) or, for `store=None`, returns them in
`Finished.summary["arrays"]`. Every error after `run()` returned, in this thread or a
background one (reader, store writer), ends the stream with `Failed` naming it; the store's
lock and the cache's are released however the run ends.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .crops import CropRunner
from .device import bound_heap, release
from .events import Cancelled, Event, Failed, Finished, Notice, Planned, Written
from .features import FeatureSupply, RunStopped
from .finish import classification_record, memory_summary, provenance
from .outputs import finalize_regions
from .pipeline import ReaderError
from .plan import ViewportOrder
from .regions import RegionBook
from .scene import scene_pass
from .scratch import Accumulators
from .store import RegionTiles, StoreError

Index = tuple[int, int]


class Execution:
    """One run of `spec` into `store` (with the embedding `cache` or None): iterate it for
    its events; `.store` is the run's store (module docstring)."""

    def __init__(self, spec: Any, store: Any, cache: Any) -> None:
        self.spec, self.store, self.cache = spec, store, cache
        bound_heap()  # freed buffers go back to the system: memory flat in the image size
        self.notices: list[Event] = []  # events raised inside stages, emitted between crops
        self.book: RegionBook | None = None  # made when the run starts (store state known)
        self._acc: Accumulators | None = None
        self._features: FeatureSupply | None = None
        self._events = self._run()

    # an iterator of events
    def __iter__(self) -> Execution:
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def close(self) -> None:
        """Stop early (what a consumer that stops iterating does): finished work is kept."""
        self._events.close()

    # what the coordinator of a distributed run uses, which drives the store itself
    def release(self) -> None:
        """Close the store and the cache (their locks) and free the device, for a run whose
        events are never iterated."""
        try:
            self._close()
        finally:
            release(self.spec.device)

    # ------------------------------------------------------------------ the run
    def _run(self) -> Iterator[Event]:
        """The stream: the body's events, then its last event once the store's and the
        cache's locks are released (so whoever reads the last event can reopen the store)."""
        t0 = time.perf_counter()
        last: Event | None = None
        try:
            last = yield from self._body(t0)
        except (GeneratorExit, KeyboardInterrupt):  # consumer stopped: keep finished work
            self._abort()
            raise
        except RunStopped as stop:
            self._abort()
            yield from self._safe_drain()
            last = Failed(str(stop.args[0]))
        except (StoreError, OSError) as err:
            self._abort()
            last = Failed(f"cannot write the output store {self.store.path}: {err}; "
                          "finished regions are kept")
        except ReaderError as err:
            self._abort()
            cause = err.__cause__ or err
            last = Failed(f"{type(cause).__name__} while reading the image: {cause}; "
                          "finished regions are kept, run again to resume")
        except Exception as err:
            self._abort()
            last = Failed(f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=6)}")
        finally:
            self.spec.source.observer = None
            if self._acc is not None:
                self._acc.close()
            try:
                self._close()
            finally:
                release(self.spec.device)
        if last is not None:
            yield last

    def _body(self, t0: float):
        """Every event but the last; returns the last (Finished or Cancelled)."""
        spec, store = self.spec, self.store
        plan = spec.plan
        yield from spec.notices  # the run's estimate and what it capped, before planning
        for text in (*store.notices, *(self.cache.notices if self.cache else ())):
            yield Notice(text, "warning")
        seen = len(store.notices)
        if store.complete:
            return (yield from self.already_complete(t0))
        spec.model.eval()
        if spec.device.type == "cuda":
            spec.model.to(spec.device, memory_format=torch.channels_last)
        else:
            spec.model.to(spec.device)
        classify = spec.layout is None
        book = (RegionBook(plan, done_crops=store.crop_logits) if classify
                else RegionBook(plan, store.done))
        self.book = book
        part = spec.part
        if part is not None and part.kind != "regions":
            return (yield from self._cache_part(t0, part))
        todo = book.todo_crops(per_crop=classify)
        pending = set(todo)  # (made once: a set per crop made planning quadratic in crops)
        order = (ViewportOrder(plan, todo, spec.point, spec.priority)
                 if spec.order == "viewport"
                 else [i for i in plan.order(spec.order) if i in pending])
        yield Planned(plan.num_regions, plan.num_regions - book.done_before, plan.grid,
                      plan.region_size, len(todo), plan.k, spec.order,
                      (plan.height, plan.width), store.resumed,
                      None if store.path is None else str(store.path))
        if store.resumed:
            yield Notice(f"resuming: {book.done_before} of {plan.num_regions} regions "
                         "already done", "resume")
        if self.cache is not None and self.cache.rebuilt:
            yield Notice(f"embedding cache {self.cache.path} did not match; rebuilt", "cache")
        store.start()
        preview = None
        if store.path is not None:  # the store's preview image, from the pixels read anyway
            from .store.preview import PreviewSums, preview_factor

            preview = PreviewSums(plan.height, plan.width, spec.source.channels,
                                  preview_factor(plan.height, plan.width))
            spec.source.observer = preview
        features = self._features = FeatureSupply(spec, book, self.cache, store, self.notices)
        scene = None
        if part is not None and part.scene is not None:  # the scene part's, for every part
            scene = type(part.scene)(part.scene.tokens.to(spec.device), part.scene.grid)
            if part.scene_tainted:
                book.tainted.update((int(r), int(c)) for r, c in zip(*np.nonzero(~book.final)))
        elif spec.context == "image" and todo:  # every region once, before any crop
            scene = yield from scene_pass(spec, features)
            if scene is None:
                yield from self._wind_down()
                return Cancelled(self._done(), plan.num_regions)
        visit = list(order) if isinstance(order, list) else list(order.pending)
        features.start([plan.crops[i] for i in visit])
        cap = (plan.strip_width * plan.stride + plan.k) * plan.k
        # boundary columns waiting for the next strip go to disk instead of growing memory
        acc = self._acc = Accumulators(cap + 2 * spec.batch_size, spec.device)
        runner = CropRunner(spec, book, features, acc, self.notices, self._finalize, store,
                            scene)
        group: list[Any] = []
        for ci in order:
            if spec.cancelled():
                yield from runner.flush()  # what is complete is kept
                yield from self._wind_down()
                return Cancelled(self._done(), plan.num_regions)
            crop = plan.crops[ci]
            if not runner.batchable(crop, group):
                yield from runner.run(group)
                group = []
            if runner.batchable(crop, group):
                group.append(crop)
                if sum(c.rows * c.cols for c in group) >= runner.group_regions:
                    yield from runner.run(group)
                    group = []
            else:
                yield from runner.run([crop])
            yield from self.drain()
        yield from runner.run(group)
        yield from runner.flush()
        yield from self._wind_down()
        return (yield from self.finish(t0, seen, preview))

    def finish(self, t0: float, seen: int = 0, preview: Any = None):
        """The end of a run whose regions have all been handed to the store (a generator
        of its last notices; returns `Finished`): the store published (or, in memory, the
        summary of its arrays). The coordinator of a distributed run calls it too, after
        writing the parts' results into the store, with `book` its own."""
        spec, store, book = self.spec, self.store, self.book
        plan = spec.plan
        complete = not book.failed
        record = None
        if spec.layout is None:
            logits = np.array([store.crop_logits[i] for i in sorted(store.crop_logits)])
            record = classification_record(logits.sum(0), len(logits))
        if spec.part is not None:
            summary: dict[str, Any] = {}
        elif store.path is None:
            summary = memory_summary(store, spec, record)
        else:
            from .store.publish import publish

            spec.source.observer = None
            summary = publish(store, spec.source, record=record, complete=complete,
                              provenance=provenance(spec, complete), preview=preview)
        for text in store.notices[seen:]:  # what finishing had to say
            yield Notice(text, "warning")
        book.counts["failed"] = len(book.failed)
        book.counts["regions"] = plan.num_regions
        return Finished(time.perf_counter() - t0, dict(book.counts),
                        None if store.path is None else str(store.path),
                        {**summary, "complete": complete})

    def _cache_part(self, t0: float, part: Any):
        """An encode part (its regions into the cache) or the scene part (`summary["scene"]`:
        the scene tokens on the CPU, `summary["scene_tainted"]`)."""
        spec, book = self.spec, self.book
        features = self._features = FeatureSupply(spec, book, self.cache, self.store,
                                                  self.notices)
        summary: dict[str, Any] = {}
        if part.kind == "scene":
            scene = yield from scene_pass(spec, features)
            if scene is None:
                yield from self._wind_down()
                return Cancelled(0, spec.plan.num_regions)
            summary = {"scene": type(scene)(scene.tokens.cpu(), scene.grid),
                       "scene_tainted": bool(book.tainted)}
        else:
            regions = list(part.regions)
            for start in range(0, len(regions), spec.batch_size):
                if spec.cancelled():
                    yield from self._wind_down()
                    return Cancelled(0, spec.plan.num_regions)
                yield from features.ensure(regions[start:start + spec.batch_size])
                yield from self.drain()
        yield from self._wind_down()
        book.counts["failed"] = len(book.failed)
        return Finished(time.perf_counter() - t0, dict(book.counts), None,
                        {**summary, "complete": not book.failed})

    def already_complete(self, t0: float):
        """The events of a store that was complete before the run (returns `Finished`)."""
        plan, store = self.spec.plan, self.store
        yield Planned(plan.num_regions, 0, plan.grid, plan.region_size, 0, plan.k,
                      self.spec.order, (plan.height, plan.width), True, str(store.path))
        yield Notice(f"resuming: {plan.num_regions} of {plan.num_regions} regions already "
                     "done; the store is complete (verified)", "resume")
        summary = dict(store.attrs().get("summary", {}))
        counts = {k: 0 for k in ("encoded", "from_cache", "decoded", "written", "failed",
                                 "crops", "nonfinite_pixels")}
        return Finished(time.perf_counter() - t0, {**counts, "regions": plan.num_regions},
                        str(store.path), {**summary, "complete": True})

    # ------------------------------------------------------------------ finalising
    def _finalize(self, indices: list[Index], values: torch.Tensor) -> None:
        """Regions whose covering crops are all done: values (R, C_tot, S, S) -> store."""
        t = time.perf_counter()
        book = self.book
        bad = [book.bad.pop(i, None) for i in indices]
        tiles = finalize_regions(values, bad, self.spec.layout, self.spec.outputs)
        book.finalize(indices)
        self.store.put(RegionTiles(list(indices), tiles.get("labels"),
                                   tiles.get("probabilities"), tiles.get("heat"),
                                   time.perf_counter() - t,
                                   tuple(i for i in indices if i in book.tainted)))

    def _done(self) -> int:
        return 0 if self.book is None else int(self.book.final.sum())

    def drain(self) -> Iterator[Event]:
        """Notices raised so far and `Written` for what the store made readable."""
        yield from self.notices
        self.notices.clear()
        total = self.spec.plan.num_regions
        for indices, seconds in self.store.drain():
            self.book.counts["written"] += len(indices)
            yield Written(indices, seconds, self._done(), total)

    def _safe_drain(self) -> Iterator[Event]:
        try:
            yield from self.drain()
        except Exception:  # the first error is what gets reported
            pass

    def _wind_down(self) -> Iterator[Event]:
        if self._features is not None:
            self._features.stop()
        self.store.flush()
        yield from self.drain()

    def _abort(self) -> None:
        if self._features is not None:
            try:
                self._features.stop()
            except BaseException:
                pass
        try:
            self.store.flush()
        except BaseException:  # the first error is what gets reported
            pass

    def _close(self) -> None:
        for closer in (self.store.close, self.cache.close if self.cache else None):
            if closer is None:
                continue
            try:
                closer()
            except BaseException:
                pass
