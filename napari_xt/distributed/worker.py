"""The worker side of one image over many workers: `run_part` runs one `Part` of the run
in a worker process (the model loaded once per process) and hands back a `PartResult`."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from napari_xt.engine import events as ev
from napari_xt.engine.parts import Part

from .cluster import model_for, tune_malloc

Index = tuple[int, int]


@dataclass
class PartResult:
    """What a part hands back to the coordinating process."""

    kind: str
    block: int
    outcome: str  # "finished" | "cancelled" | "failed"
    message: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    tiles: list[Any] = field(default_factory=list)  # RegionTiles of the block's regions
    failed: dict[Index, str] = field(default_factory=dict)
    scene: Any = None  # SceneTokens (the scene part)
    scene_tainted: bool = False
    notices: list[tuple[str, str]] = field(default_factory=list)  # (message, kind)
    regions: tuple[Index, ...] = ()  # encode: the regions it encoded or read
    refs: dict = field(default_factory=dict)  # encode: where their features are now
    seconds: float = 0.0
    worker: str = ""


@dataclass(frozen=True)
class Shipped:
    """An image that is not a path (an array, a pyramid), sent to the workers once: dask
    would take a bare dask array for work to schedule, not data to hand over."""

    value: Any


def run_part(image: str, model: tuple[str, int | None], store: str, part: Part,
             options: dict[str, Any], threads: int | None = None,
             devices: Sequence[str] | None = None, cancel: Any = None, block: int = -1,
             scene: Any = None, after: Sequence[Any] = ()) -> PartResult:
    """Run one part in this (worker) process. `model`: (choice, in_chans) as `model_for`
    takes them; `scene`: the scene part's result, when the part reads whole-image context;
    `after`: results of the parts it waited for (only the order matters)."""
    import dask

    from napari_xt.engine import run

    t0 = time.perf_counter()
    worker = f"{os.uname().nodename}:{os.getpid()}"
    result = PartResult(part.kind, block, "cancelled", regions=part.regions, worker=worker)
    if (cancel is not None and cancel()) or (scene is not None and
                                             scene.outcome == "cancelled"):
        return result  # (queued parts of a cancelled run do no set-up at all)
    tune_malloc()
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    options = dict(options)
    if devices:
        options["device"] = _worker_device(devices)
    known = None
    if part.kind != "encode":  # where the features it reads are: known before, or just made
        known = dict(part.known or {})
        for done in after:
            known.update(getattr(done, "refs", None) or {})
    tainted = part.scene_tainted
    if scene is not None:
        if scene.outcome != "finished":
            raise RuntimeError(f"the scene part did not finish: {scene.message}")
        tainted = scene.scene_tainted
    part = dataclasses.replace(part, known=known, scene_tainted=tainted,
                               scene=scene.scene if scene is not None else part.scene)
    if isinstance(image, Shipped):
        image = image.value
    net, _ = model_for(*model)
    result.outcome = "failed"
    # the part's reads stay in this process: on a cluster worker dask would otherwise hand
    # them to the cluster's scheduler (shipping every tile's pixels around)
    with dask.config.set(scheduler="threads"):
        execution = run(image, net, store, cancel=cancel, part=part, **options)
        for e in execution:
            if isinstance(e, ev.Notice):
                result.notices.append((e.message, e.kind))
            elif isinstance(e, ev.Finished):
                result.outcome, result.counts = "finished", dict(e.counts)
                result.scene = e.summary.get("scene")
                result.scene_tainted = bool(e.summary.get("scene_tainted", False))
            elif isinstance(e, ev.Cancelled):
                result.outcome = "cancelled"
            elif isinstance(e, ev.Failed):
                result.outcome, result.message = "failed", e.message
    sink = execution.store
    own = (set(part.regions) if part.block is None else
           {(r, c) for r in range(part.block.y0, part.block.y1)
            for c in range(part.block.x0, part.block.x1)})
    # (a region outside the part's own failing to read is the business of the part that owns
    # it: reported once, never over a tile that part wrote)
    result.tiles = sink.tiles
    result.failed = {i: why for i, why in sink.failed.items() if i in own}
    if part.kind == "encode" and execution.cache is not None:
        result.refs = execution.cache.locations(part.regions)
    if execution.book is not None and result.outcome != "finished":
        result.counts = dict(execution.book.counts)
    result.seconds = time.perf_counter() - t0
    return result


def _worker_device(devices: Sequence[str]) -> str:
    """The device of this worker of a local cluster: `devices[worker number]` (a local
    cluster numbers its workers 0, 1, ...; devices are refused for other clusters)."""
    from distributed import get_worker

    name = get_worker().name
    if not isinstance(name, int):
        raise RuntimeError(f"worker {name!r} has no number: devices are for the workers of "
                           "a local cluster")
    return str(devices[name % len(devices)])
