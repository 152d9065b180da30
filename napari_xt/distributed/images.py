"""Many images at once: one streaming engine run per image, spread over worker processes.

`predict_many(images, model, out_dir, workers=N)` writes `out_dir/<image name>.xt.zarr` for
every image and yields an `ImageOutcome` as each one ends. With `workers=1` (and no
`scheduler`) the images run one after the other in this process; otherwise they are tasks
of a dask.distributed cluster (`pip install "napari-xt[distributed]"`): a local cluster of
`workers` processes with `threads` torch threads each, or an existing cluster at
`scheduler` (an address such as ``tcp://host:8786``; every worker needs napari-xt, the
model file and the images at the same paths). Each worker process loads the model once.

Each image is an ordinary engine run, so everything the engine promises holds per image:
memory bounded by the region grid, the store resumable, an image that fails (unreadable,
wrong channels, ...) reported without stopping the others. `cancel` (a threading.Event)
stops every running image at its next region (through a cluster-wide event) and skips the
ones not started; finished regions stay in their stores and the same call again resumes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STORE_SUFFIX = ".xt.zarr"
_IMAGE_SUFFIXES = (".ome.zarr", ".ome.tiff", ".ome.tif", ".zarr", ".tiff", ".tif", ".svs",
                   ".ndpi", ".npy")
_MODELS: dict[str, tuple[Any, Any]] = {}  # model choice -> (model, normalization), per process
_MODELS_LOCK = threading.Lock()


@dataclass(frozen=True)
class ImageOutcome:
    """How one image's run ended: `outcome` is finished, failed, cancelled or skipped."""

    image: str
    store: str
    outcome: str
    seconds: float = 0.0
    regions: int = 0  # regions of the image's grid
    encoded: int = 0  # regions encoded by this run (0 for a store that was complete)
    failed_regions: int = 0
    message: str = ""
    worker: str = ""


def store_name(image: str | os.PathLike) -> str:
    """`scan.ome.tiff` -> `scan.xt.zarr`."""
    name = Path(image).name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return f"{name}{STORE_SUFFIX}"


def output_stores(images: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """The store of every image in `out_dir`; two images with one name are an error."""
    stores = [Path(out_dir) / store_name(i) for i in images]
    seen: dict[Path, str] = {}
    for image, store in zip(images, stores):
        if store in seen:
            raise ValueError(f"{seen[store]} and {image} would both write {store}; give the "
                             "images different names or run them into different folders")
        seen[store] = str(image)
    return stores


def _model(choice: str):
    with _MODELS_LOCK:
        if choice not in _MODELS:
            from napari_xt.model.choice import load_model

            model, _, normalize = load_model(choice)
            _MODELS[choice] = (model, normalize)
        return _MODELS[choice]


def predict_image(image: str, model: str, store: str, options: dict[str, Any] | None = None,
                  threads: int | None = None, cancel: Any = None) -> ImageOutcome:
    """Run `model` (a model choice: "demo", a zoo name or a checkpoint path) over one image
    into `store`; never raises for a bad image, the outcome says what happened."""
    from napari_xt.engine import events as ev
    from napari_xt.engine import run

    worker = f"{os.uname().nodename}:{os.getpid()}"
    start = time.perf_counter()

    def outcome(kind: str, message: str = "", **counts) -> ImageOutcome:
        return ImageOutcome(str(image), str(store), kind, time.perf_counter() - start,
                            message=message, worker=worker, **counts)

    if threads:
        import torch

        torch.set_num_threads(int(threads))
    import dask

    try:
        net, normalize = _model(model)
        regions = 0
        # the engine's reads stay in this process: on a cluster worker dask would otherwise
        # hand them to the cluster's scheduler (shipping every tile's pixels around)
        with dask.config.set(scheduler="threads"):
            for e in run(image, net, store, normalize=normalize, cancel=cancel,
                         **dict(options or {})):
                if isinstance(e, ev.Planned):
                    regions = e.total_regions
                elif isinstance(e, ev.Finished):
                    failed = int(e.counts.get("failed", 0))
                    ok = e.summary.get("complete", True) and not failed
                    return outcome("finished" if ok else "failed",
                                   "" if ok else f"{failed} region(s) failed", regions=regions,
                                   encoded=int(e.counts.get("encoded", 0)),
                                   failed_regions=failed)
                elif isinstance(e, ev.Failed):
                    return outcome("failed", e.message, regions=regions)
                elif isinstance(e, ev.Cancelled):
                    return outcome("cancelled",
                                   f"after {e.done_regions}/{e.total_regions} regions",
                                   regions=regions)
        return outcome("failed", "the run ended without a result", regions=regions)
    except Exception as err:  # noqa: BLE001 - one image's error must not stop the others
        return outcome("failed", f"{type(err).__name__}: {err}")


def predict_many(
    images: Sequence[str | os.PathLike],
    model: str,
    out_dir: str | os.PathLike,
    *,
    workers: int = 1,
    threads: int | None = None,
    scheduler: str | None = None,
    cancel: threading.Event | None = None,
    **options: Any,
) -> Iterator[ImageOutcome]:
    """Yield the outcome of every image as it ends (in completion order). `options` are
    engine `run` arguments (device, batch_size, level, outputs, threshold, ...)."""
    images = [str(i) for i in images]
    if not images:
        raise ValueError("no images to predict")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    stores = output_stores(images, out_dir)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    cancel = cancel or threading.Event()
    if workers == 1 and scheduler is None:
        for image, store in zip(images, stores):
            if cancel.is_set():
                yield ImageOutcome(image, str(store), "skipped", message="cancelled before it "
                                   "started")
                continue
            yield predict_image(image, model, str(store), options, threads, cancel)
        return
    yield from _on_cluster(images, stores, model, workers, threads, scheduler, cancel, options)


class _ClusterCancel:
    """The engine's cancel check on a worker: a cluster-wide event, asked at most every
    0.5 s."""

    def __init__(self, name: str) -> None:
        self.name, self._event, self._last, self._set = name, None, 0.0, False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self._set and now - self._last > 0.5:
            from distributed import Event

            self._event = self._event or Event(self.name)
            self._set, self._last = self._event.is_set(), now
        return self._set


def _on_cluster(images, stores, model, workers, threads, scheduler, cancel, options):
    try:
        from distributed import Client, Event, LocalCluster, as_completed
    except ImportError as err:
        raise ImportError("more than one worker needs dask.distributed: pip install "
                          "'napari-xt[distributed]'") from err
    import uuid

    own = client = stop = None
    try:
        if scheduler is None:
            own = _local_cluster(LocalCluster, workers)
            client = Client(own)
        else:
            try:
                client = Client(scheduler, timeout=10)
            except (OSError, TimeoutError) as err:
                raise ConnectionError(f"cannot reach the dask scheduler at {scheduler}: "
                                      f"{err}") from err
        name = f"napari-xt-cancel-{uuid.uuid4().hex}"
        stop = Event(name, client=client)
        if cancel.is_set():
            stop.set()
        futures = {}
        for image, store in zip(images, stores):
            f = client.submit(predict_image, image, model, str(store), options, threads,
                              _ClusterCancel(name), pure=False,
                              key=f"napari-xt-{Path(store).name}-{uuid.uuid4().hex[:8]}")
            futures[f] = (image, store)
        pending = as_completed(list(futures))
        while True:
            if cancel.is_set() and not stop.is_set():
                stop.set()
            try:
                batch = pending.next_batch(block=False)
            except StopIteration:
                break
            if not batch:
                if pending.is_empty():
                    break
                time.sleep(0.1)
                continue
            for f in batch:
                image, store = futures[f]
                if f.status == "finished":
                    yield f.result()
                else:
                    yield ImageOutcome(image, str(store), "failed",
                                       message=f"worker error: {f.exception()!r}")
    finally:
        if stop is not None:
            stop.set()  # a generator closed early (Ctrl-C) stops what still runs
        if client is not None:
            client.close()
        if own is not None:
            own.close()


def _local_cluster(local_cluster, workers: int):
    """A local cluster of `workers` processes that ignore Ctrl-C: the terminal sends it to
    the whole process group, and only this process should answer it (by cancelling the runs
    through the cluster-wide event, so finished work is kept)."""
    import signal

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:  # the worker processes start now and inherit the ignored SIGINT
        return local_cluster(n_workers=workers, threads_per_worker=1, processes=True,
                             dashboard_address=None)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
