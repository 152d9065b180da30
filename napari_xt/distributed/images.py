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

from .cluster import ClusterCancel, as_they_end, connect, model_for, tune_malloc

STORE_SUFFIX = ".xt.zarr"
_IMAGE_SUFFIXES = (".ome.zarr", ".ome.tiff", ".ome.tif", ".zarr", ".tiff", ".tif", ".svs",
                   ".ndpi", ".npy")


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

    tune_malloc()
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    import dask

    try:
        net, normalize = model_for(model)
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


def _on_cluster(images, stores, model, workers, threads, scheduler, cancel, options):
    import uuid

    from distributed import Event

    with connect(workers, scheduler) as client:
        name = f"napari-xt-cancel-{uuid.uuid4().hex}"
        stop = Event(name, client=client)
        try:
            if cancel.is_set():
                stop.set()
            futures = {}
            for image, store in zip(images, stores):
                f = client.submit(predict_image, image, model, str(store), options, threads,
                                  ClusterCancel(name), pure=False,
                                  key=f"napari-xt-{Path(store).name}-{uuid.uuid4().hex[:8]}")
                futures[f] = (image, store)

            def between() -> None:
                if cancel.is_set() and not stop.is_set():
                    stop.set()

            for f, _ in as_they_end(list(futures), client, between):
                image, store = futures[f]
                if f.status == "finished":
                    yield f.result()
                else:
                    yield ImageOutcome(image, str(store), "failed",
                                       message=f"worker error: {f.exception()!r}")
        finally:
            stop.set()  # a generator closed early (Ctrl-C) stops what still runs
