"""The worker side of a widget run (no Qt, no napari): load the model, stream the engine's
events, and read back what each `Written` event made final, as small preview tiles.

Reading the store here, in the worker thread, keeps the main thread to cheap array copies:
labels and probabilities are subsampled with a fixed integer stride (`preview_stride`) so
the live layers of a 100k-pixel image stay about a megabyte; at the end the widget swaps the
labels for the store's own multiscale pyramid.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

PREVIEW_MAX = 1024  # live layers are at most this many pixels per side (a 1024^2 labels
# layer redraws in ~60 ms on a software-GL canvas, 2048^2 in ~250 ms)


@dataclass(frozen=True)
class RunRequest:
    """Everything a run needs, captured on the main thread before it starts."""

    image: Any  # lazy array of the chosen level
    axes: str  # YX | YXC | CYX
    level: int
    name: str
    model: str  # widget model choice (see models.py)
    device: str
    batch_size: int
    crop_stride: int | None  # regions between crop starts (None: the engine's default)
    carry_state: bool  # pass the context encoder's state from crop to crop
    probabilities: bool  # also write per-class probability maps
    threshold: float  # detection score threshold
    order: str  # raster | zigzag | viewport
    store: str
    cache: bool
    resume: bool
    scale: tuple[float, float]  # world size of one pixel of the level
    translate: tuple[float, float]
    channels: int
    blend: str = "tokens"  # merge overlapping crops by context tokens or decoded outputs
    context: str | None = None  # "crop" | "image"; None: the mode the model was trained for
    pyramid: Any = None  # every level (MultiscaleImage): provenance, the input's file
    replace: bool = False  # replace a napari-xt store holding another run (confirmed)
    tag: str = ""  # names this run's layers (model, level)
    cluster: str = ""  # "" this process, "N" local workers, or a dask scheduler address

    @property
    def table_scale(self) -> tuple[float, float]:
        """Level-0 pixels per pixel of the processed level (detection tables are level 0)."""
        return self.pyramid.downsample(self.level) if self.pyramid is not None else (1.0, 1.0)


@dataclass(frozen=True)
class ModelLoaded:
    """First item of a run: the model the engine will use (kept for inspection)."""

    model: Any
    description: str
    normalize: Any = None  # per-channel (mean, std) the engine applies, or None


@dataclass(frozen=True)
class ResultTiles:
    """Preview tiles of regions made final by one `Written` event (worker-read)."""

    indices: tuple[tuple[int, int], ...]
    labels: dict[tuple[int, int], tuple[slice, slice, np.ndarray]]
    probabilities: dict[tuple[int, int], tuple[slice, slice, np.ndarray]]
    points: np.ndarray | None  # new detections (structured: y, x, class, score, size)


def preview_stride(height: int, width: int, limit: int = PREVIEW_MAX) -> int:
    return max(1, math.ceil(max(height, width) / limit))


class StoreTileReader:
    """Preview tiles of finished regions, read through the run's store (worker thread):
    final regions come from the store's memory until their shard is written, then from disk;
    detections as the store commits them."""

    def __init__(self, store: Any, height: int, width: int, region_size: int,
                 stride: int) -> None:
        self.store = store
        self.height, self.width, self.size, self.stride = height, width, region_size, stride
        self._points_cursor = 0

    def _tile(self, name: str, row: int, col: int):
        s, f = self.size, self.stride
        y0, x0 = row * s, col * s
        y1, x1 = min(y0 + s, self.height), min(x0 + s, self.width)
        fy, fx = -(-y0 // f) * f, -(-x0 // f) * f  # first sampled pixel inside the box
        if fy >= y1 or fx >= x1:
            return None
        region = self.store.read_region(name, (row, col))
        if region is None:
            return None
        tile = np.ascontiguousarray(region[..., fy - y0::f, fx - x0::f])
        dst = (slice(fy // f, fy // f + tile.shape[-2]), slice(fx // f, fx // f + tile.shape[-1]))
        return dst[0], dst[1], tile

    def read(self, indices) -> ResultTiles:
        labels, probs = {}, {}
        for row, col in indices:
            for name, out in (("labels", labels), ("probabilities", probs)):
                tile = self._tile(name, row, col)
                if tile is not None:
                    out[(row, col)] = tile
        points, self._points_cursor = self.store.points_since(self._points_cursor)
        return ResultTiles(tuple(indices), labels, probs, points)

    def read_finished(self, batch: int = 256) -> Iterator[ResultTiles]:
        """Tiles of the regions an earlier run already finished (resume)."""
        from napari_xt.engine.store import DONE

        state = self.store.region_status()
        done = [(int(r), int(c)) for r, c in np.argwhere(state == DONE)]
        for i in range(0, len(done), batch):
            yield self.read(done[i:i + batch])


def run_outputs(model, probabilities: bool) -> tuple[str, ...]:
    """Everything the model's head can give (the engine's default outputs), with the
    per-class probability maps when asked and the head has classes."""
    from napari_xt.engine.run import default_outputs

    outputs = default_outputs(model.cfg.head)
    if probabilities and outputs[0] == "labels":
        outputs = ("labels", "probabilities") + outputs[1:]
    return outputs


def run_events(
    request: RunRequest,
    cancel: threading.Event,
    priority: Callable[[], tuple[float, float] | None] | None = None,
) -> Iterator[Any]:
    """Generator run in the worker: ModelLoaded, then every engine event, each `Written`
    followed by the `ResultTiles` it made readable."""
    from napari_xt.engine.events import Cancelled, Planned, Written
    from napari_xt.engine.run import run

    from .models import load_model

    model, what, normalize = load_model(request.model, in_chans=request.channels)
    yield ModelLoaded(model, what, normalize)
    if cancel.is_set():
        yield Cancelled()
        return
    reader: StoreTileReader | None = None
    viewport = request.order == "viewport" and priority is not None
    image, level = ((request.pyramid, request.level) if request.pyramid is not None
                    else (request.image, 0))
    from napari_xt.engine.spelling import WIDGET

    options = dict(
        axes=request.axes, level=level, device=request.device, spelling=WIDGET,
        batch_size=request.batch_size, resume=request.resume, overwrite=request.replace,
        cache=(True if request.resume else "rebuild") if request.cache else False,
        outputs=run_outputs(model, request.probabilities), normalize=normalize,
        crop_stride=request.crop_stride, blend=request.blend, context=request.context,
        carry_state=request.carry_state, threshold=request.threshold)
    if request.cluster:  # the image's blocks over workers (always in raster order)
        from napari_xt.distributed import run_distributed

        local = request.cluster.isdigit()
        events = run_distributed(
            image, request.model, request.store, cancel=cancel, in_chans=request.channels,
            workers=int(request.cluster) if local else 2,
            scheduler=None if local else request.cluster,
            order="raster" if request.order == "viewport" else request.order, **options)
    else:
        events = run(image, model, request.store, order=request.order, cancel=cancel,
                     priority=priority if viewport else None,
                     point=priority() if viewport else None, **options)
    for event in events:
        yield event
        if isinstance(event, Planned):
            h, w = event.image_shape
            reader = StoreTileReader(events.store, h, w, event.region_size,
                                     preview_stride(h, w))
            if event.resumed:
                yield from reader.read_finished()
        elif isinstance(event, Written) and reader is not None:
            yield reader.read(event.indices)
