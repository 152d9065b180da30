"""One image over many workers: `run_distributed(image, model, store, workers=N)`.

The image's region grid is cut into blocks (`block_grid`); the run becomes dask tasks of
three kinds (`napari_xt.engine.parts`), each an engine run of the same image, model and
options in a worker process (the model loaded once per process):

    encode parts     the regions not in the embedding cache, one part per block that owns
                     some, in parallel, each into a cache part of its own
    scene part       (whole-image context only) the scene pass, after every encode part
    regions parts    per block: its regions' crops with the cached features (and the
                     scene), its final tiles back to this process; a part waits only for
                     the encode parts of the regions its crops read

This process is the store's only writer: it holds the store's and the cache's locks for the
whole run, writes every part's tiles through the store's commit protocol as the part ends
(so finished blocks are kept whatever happens next) and finishes the store as a single run
does. The results equal a single-process run's bit for bit (see `engine/parts.py` for why;
tested). A worker that dies is replaced by the cluster and its parts run again elsewhere;
`cancel` reaches every part through a cluster-wide event, what finished is kept, and the
same call again resumes. Progress is the engine's event stream: `Planned`, `RegionEncoded`
per encode part, `RegionDecoded` and `Written` per regions part, `Notice`s of the parts, and
one of `Finished`, `Failed`, `Cancelled`.

Not split: classifiers (one record per image, cheap to run where it is), `carry_state`
(one state passed crop to crop is sequential by definition) and the viewport order.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from napari_xt.engine import EngineInputError
from napari_xt.engine import events as ev
from napari_xt.engine.parts import Part
from napari_xt.engine.regions import RegionBook

from .cluster import ClusterCancel, as_they_end, connect, default_threads, model_for
from .schedule import block_grid, default_block_side, make_schedule
from .worker import PartResult, Shipped, run_part

Index = tuple[int, int]


_NOT_SPLIT = {"carry_state": True, "order": "viewport"}


def run_distributed(
    image: Any,
    model: str,
    store: str | os.PathLike,
    *,
    workers: int = 2,
    scheduler: str | None = None,
    threads: int | None = None,
    devices: Sequence[str] | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
    block: int | None = None,
    in_chans: int | None = None,
    **options: Any,
) -> DistributedRun:
    """Run `model` (a model choice: "demo", a zoo name or a checkpoint path; every worker
    loads it) over one image into `store`, on a local cluster of `workers` processes
    (`threads` torch threads each, default the cores shared out; `devices` one per worker
    by its number, e.g. ["cuda:0", "cuda:1"], as a local cluster numbers them 0, 1, ...)
    or the running cluster at `scheduler` (every worker needs napari-xt, the model file, the
    image and the store's folder at the same paths). `block`: side of a block in regions
    (default: a store shard, smaller when that leaves workers idle); `in_chans`: channels of
    a zoo model. `options` are `run`'s (batch_size, level, outputs, threshold, context,
    overwrite, resume, cache, ...).

    Refuses what `run` refuses, before any work, and what cannot be split (a classifier,
    carry_state, the viewport order, no store or no embedding cache). Returns an iterator
    of events (module docstring), with `.store` the run's store as `run`'s has."""
    from napari_xt.engine import run
    from napari_xt.engine.spelling import Spelling, hint

    if store is None:
        raise EngineInputError("a run over several workers writes a result store: give its "
                               "path")
    if workers < 1:
        raise EngineInputError(f"workers must be >= 1, got {workers}")
    for key, value in _NOT_SPLIT.items():
        if options.get(key) == value:
            raise EngineInputError(f"{key}={value!r} runs in one process (it is sequential); "
                                   "run without several workers")
    if options.get("cache", True) in (False, None):
        spelling = options.get("spelling") or Spelling()
        raise EngineInputError("a run over several workers shares its region features "
                               "through the embedding cache, so it needs the cache (drop "
                               f"{hint(spelling, 'no_cache')})")
    if options.get("point") is not None or options.get("priority") is not None:
        raise EngineInputError("a run over several workers visits crops in raster order; "
                               "point and priority are for the viewport order")
    if block is not None and int(block) < 1:
        raise EngineInputError(f"block must be at least 1 region, got {block}")
    devices = _check_devices(devices, scheduler)
    # every worker resolves the same paths (a worker's working folder may be another)
    image, store = _absolute(image), os.path.abspath(os.fspath(store))
    if options.get("cache", True) not in (True, "rebuild"):
        options["cache"] = os.path.abspath(os.fspath(options["cache"]))
    if os.path.exists(os.fspath(model)):
        model = os.path.abspath(os.fspath(model))
    net, normalize = model_for(model, in_chans)
    if net.cfg.head.kind == "classification":
        raise EngineInputError("a classifier's run is not split over workers (it gives one "
                               "record per image); run it in one process")
    options.setdefault("normalize", normalize)  # (the checkpoint's, unless given)
    # the cluster first: a scheduler that cannot be reached leaves nothing written
    cluster = connect(workers, scheduler)
    client = cluster.__enter__()
    try:
        execution = run(image, net, store, cancel=cancel, **options)
    except BaseException:
        cluster.__exit__(None, None, None)
        raise
    if threads is None and scheduler is None:
        threads = default_threads(workers)
    part_options = {k: v for k, v in options.items() if k not in ("overwrite", "resume")}
    part_options["batch_size"] = execution.spec.batch_size  # (as capped by the budget)
    if part_options.get("cache", True) == "rebuild":  # (done by this process's cache)
        part_options["cache"] = True
    events = _coordinate(execution, client, cluster, image, (model, in_chans), store,
                         workers, scheduler, threads, devices, block, part_options)

    return DistributedRun(execution, events, lambda: _release(execution, cluster))


def _check_devices(devices: Sequence[str] | None, scheduler: str | None) -> list[str] | None:
    """`devices` checked before anything starts: each a device this machine has."""
    if not devices:
        return None
    if scheduler is not None:
        raise EngineInputError("devices are for local workers (one each); on a cluster, "
                               "give each worker its device (CUDA_VISIBLE_DEVICES)")
    import torch

    out = []
    for name in devices:
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError) as err:
            raise EngineInputError(f"device {name!r}: {err}") from None
        if dev.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if (dev.index or 0) >= count:
                raise EngineInputError(f"device {name!r}: this machine has {count} CUDA "
                                       "device(s)")
        out.append(str(dev))
    return out


class DistributedRun:
    """The events of a distributed run (an iterator), and its store (`.store`)."""

    def __init__(self, execution: Any, events: Iterator[ev.Event],
                 release: Any = None) -> None:
        self.store = execution.store
        self._events = events
        self._release = release  # what closing before the first event must undo
        self._started = False

    def __iter__(self) -> DistributedRun:
        return self

    def __next__(self) -> ev.Event:
        self._started = True
        return next(self._events)

    def close(self) -> None:
        """Stop early: what finished is kept, the workers stop, the locks are released."""
        self._events.close()
        if not self._started and self._release is not None:  # (no finally ran)
            self._started = True
            self._release()


def _absolute(image: Any) -> Any:
    """A path (or an `ImagePath`, keeping how to read it) made absolute; other images
    (arrays) as they are."""
    path = getattr(image, "path", None)
    if dataclasses.is_dataclass(image) and isinstance(path, str):
        return image if "://" in path else dataclasses.replace(image,
                                                               path=os.path.abspath(path))
    if isinstance(image, (str, os.PathLike)):
        text = os.fspath(image)
        return text if "://" in text else os.path.abspath(text)
    return image


def _coordinate(execution: Any, client: Any, cluster: Any, image: Any,
                model: tuple[str, int | None], store: str, workers: int,
                scheduler: str | None, threads: int | None, devices: Sequence[str] | None,
                block: int | None, options: dict[str, Any]) -> Iterator[ev.Event]:
    spec, out = execution.spec, execution.store
    t0 = time.perf_counter()
    last: ev.Event | None = None
    try:
        yield from spec.notices
        for text in (*out.notices, *execution.cache.notices):
            yield ev.Notice(text, "warning")
        seen = len(out.notices)
        if out.complete:
            last = yield from execution.already_complete(t0)
        else:
            last = yield from _run_blocks(execution, client, image, model, store, workers,
                                          scheduler, threads, devices, block, options, t0,
                                          seen)
    except (GeneratorExit, KeyboardInterrupt):
        _flush(execution)
        raise
    except Exception as err:  # noqa: BLE001 - the stream ends with Failed naming it
        _flush(execution)
        last = ev.Failed(f"{type(err).__name__}: {err}; finished regions are kept, run again "
                         "to resume")
    finally:
        _release(execution, cluster)
    if last is not None:
        yield last


def _run_blocks(execution, client, image, model, store, workers, scheduler, threads, devices,
                block, options, t0, seen):
    """Plan the blocks, run them on the cluster; returns the run's last event."""
    spec, out = execution.spec, execution.store
    plan = spec.plan
    book = execution.book = RegionBook(plan, out.done)
    todo = book.todo_crops()
    if scheduler is not None:  # the cluster's own workers
        workers = max(1, len(client.scheduler_info().get("workers", {})))
    side = block or default_block_side(plan.grid, out.tiling.shard[0] // plan.region_size,
                                       plan.k, workers)
    blocks = block_grid(plan.grid, side)
    schedule = make_schedule(plan, book, execution.cache.done, blocks, todo,
                             spec.context == "image")
    yield ev.Planned(plan.num_regions, plan.num_regions - book.done_before, plan.grid,
                     plan.region_size, len(todo), plan.k, spec.order,
                     (plan.height, plan.width), out.resumed, store)
    if out.resumed:
        yield ev.Notice(f"resuming: {book.done_before} of {plan.num_regions} regions "
                        "already done", "resume")
    if execution.cache.rebuilt:
        yield ev.Notice(f"embedding cache {execution.cache.path} did not match; rebuilt",
                        "cache")
    where = (f"{workers} local workers" if scheduler is None else
             f"the cluster {scheduler} ({workers} workers)")
    yield ev.Notice(f"distributed: {len(schedule.regions)} blocks of up to {side} x {side}"
                    f" regions ({len(schedule.encode)} to encode) on {where}", "info")
    book.counts["crops"], book.counts["from_cache"] = len(todo), schedule.from_cache
    out.start()
    return (yield from _on_cluster(execution, client, book, schedule, image, model, store,
                                   threads, devices, options, t0, seen))


def _release(execution: Any, cluster: Any) -> None:
    """The store's and the cache's locks released, the cluster connection (and a local
    cluster) closed."""
    try:
        execution.release()
    finally:
        cluster.__exit__(None, None, None)


def _flush(execution: Any) -> None:
    try:
        execution.store.flush()
    except BaseException:  # the first error is what gets reported
        pass


def _on_cluster(execution, client, book, schedule, image, model, store, threads, devices,
                options, t0, seen):
    """Submit the parts, write what they hand back; returns the run's last event."""
    from distributed import Event

    spec, out = execution.spec, execution.store
    plan = spec.plan
    name = f"napari-xt-cancel-{uuid.uuid4().hex}"
    stop = Event(name, client=client)
    flag = ClusterCancel(name)
    tag = uuid.uuid4().hex[:8]
    devs = list(devices) if devices else None

    if not isinstance(image, str):  # an array or a pyramid: sent to every worker once
        image = client.scatter(Shipped(image), broadcast=True, hash=False)

    def submit(part: Part, b: int, **deps: Any) -> Any:
        return client.submit(run_part, image, model, store, part, options, threads, devs,
                             flag, b, pure=False, key=f"napari-xt-{part.segment}-{tag}",
                             **deps)

    encoders = {b: submit(Part("encode", f"e{b}", tuple(r)), b)
                for b, r in schedule.encode.items()}
    cache = execution.cache  # (what it held before the run: handed to the parts)
    scene = None
    if spec.context == "image" and schedule.regions:
        every = [(r, c) for r in range(plan.grid[0]) for c in range(plan.grid[1])]
        scene = submit(Part("scene", "scene", known=cache.locations(every)), -1,
                       after=list(encoders.values()))
    parts = {}
    for b, done in schedule.regions.items():
        deps: dict[str, Any] = {"after": [encoders[e] for e in sorted(schedule.waits[b])]}
        if scene is not None:
            deps["scene"] = scene
        parts[b] = submit(Part("regions", f"r{b}", block=schedule.blocks[b],
                               done=tuple(done), known=cache.locations(schedule.reads[b])),
                          b, **deps)
    error: str | None = None
    cancelled = stopped = False
    said: set[str] = set()

    def between() -> None:
        nonlocal cancelled, stopped
        if not stopped and (spec.cancelled() or error is not None):
            cancelled = cancelled or error is None
            stop.set()
            stopped = True

    try:
        for future, pending in as_they_end([*encoders.values(), *([scene] if scene else []),
                                            *parts.values()], client, between):
            result = _result(future, pending)
            if result is None:  # its worker died meanwhile: it runs again
                continue
            if isinstance(result, BaseException):
                error = error or f"a part failed on its worker: {result!r}"
                continue
            yield from _take(execution, book, result, said)
            if result.outcome == "failed":
                error = error or result.message
            elif result.outcome == "cancelled":
                cancelled = True
    finally:
        stop.set()  # a consumer that stops early stops what still runs
    out.flush()
    yield from execution.drain()
    if error is not None:
        return ev.Failed(f"{error}; finished regions are kept, run again to resume")
    if cancelled:
        return ev.Cancelled(book.done, plan.num_regions)
    return (yield from execution.finish(t0, seen))


def _result(future: Any, pending: Any) -> PartResult | BaseException | None:
    """The part's result; its error; or None when it was lost with its worker before its
    result came here (the cluster runs it again: it is waited for again)."""
    if future.status == "error":
        return future.exception()
    if future.status == "finished":
        try:
            result = future.result(timeout=10)
        except Exception:  # noqa: BLE001 - gone with its worker: rescheduled by the cluster
            result = None
        else:
            future.release()  # (its tiles leave the worker's memory)
            return result
    if future.status == "cancelled":
        return RuntimeError("the part was cancelled by the cluster")
    pending.add(future)
    return None


def _take(execution: Any, book: RegionBook, result: PartResult, said: set[str]
          ) -> Iterator[ev.Event]:
    """A part's results into the run: its notices, counts and tiles (through the store)."""
    for message, kind in result.notices:
        if kind == "cache" and " more for " in message:  # every encode part's estimate
            if said:
                continue
            said.add("cache estimate")  # (the first says what the whole cache takes)
        if kind == "nan" and result.kind != "encode":
            continue  # (said by the part that read the pixels; the others read the cache)
        yield ev.Notice(message, kind)
    # counted once for the run: encoded and non-finite pixels by the parts that read the
    # image, decoded by the block that owns the region (crops and cache reads: the plan's)
    keys = ("encoded", "nonfinite_pixels") if result.kind == "encode" else ("encoded", "decoded")
    for key in keys:
        book.counts[key] += int(result.counts.get(key, 0))
    for idx, reason in result.failed.items():
        book.fail(idx)
        execution.store.put_failed([idx], reason)
        yield ev.RegionFailed((idx,), reason)
    if result.kind == "encode" and result.regions:
        yield ev.RegionEncoded(tuple(result.regions), execution.spec.batch_size,
                               result.seconds)
    for tiles in result.tiles:
        for idx in tiles.indices:
            book.failed.discard(idx)
        book.finalize(tiles.indices)
        execution.store.put(tiles)
        yield ev.RegionDecoded(tuple(tiles.indices), tiles.seconds)
    yield from execution.drain()
