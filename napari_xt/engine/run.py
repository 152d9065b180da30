"""`run`: stream a model over an image of any size, region by region, crop by crop.

    for event in run(image, model, "out.zarr"):
        ...  # Planned, RegionEncoded, ContextStep, RegionDecoded, Written, Notice, ...

Bad input (channels that do not match the model, an unknown option, an output store that
holds another run or cannot be written, a mismatched embedding cache) raises before any work:
`EngineInputError` (a ValueError), `StoreError` (an OSError) or `CacheMismatchError`.
Everything after that is reported as events; the stream ends with exactly one of
`Finished`, `Failed`, `Cancelled`. `run` validates everything into one frozen `RunSpec`;
the run itself is `execution.Execution`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_xt.io.source import ImageSource

from .budget import PlanError, plan_budget
from .cache import EmbeddingCache
from .device import background_threads, pick_device
from .execution import Execution
from .outputs import OUTPUT_KINDS, MapLayout, map_layout
from .plan import ORDERS, RegionPlan
from .spelling import Spelling, hint
from .store import PALETTE, ClassInfo, StoreSpec, create_store
from .store.layout import default_cache

BLENDS = ("tokens", "outputs")
CONTEXTS = ("crop", "image")


class EngineInputError(ValueError):
    """The image, model or options cannot make a run (raised before any work)."""


def _cancel_check(cancel: Any) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    if callable(cancel):
        return lambda: bool(cancel())
    raise EngineInputError(f"cancel must be a threading.Event or a callable, not {cancel!r}")


def default_outputs(head: Any) -> tuple[str, ...]:
    """What a head gives when `outputs` is not chosen: a classifier's record, a detector's
    table, a segmenter's labels and, when it also predicts a centre/heatmap map, its
    detection table."""
    if head.kind == "classification":
        return ("classification",)
    if head.kind == "detection":
        return ("detections",)
    return ("labels",) + (("detections",) if map_layout(head).heat is not None else ())


def run(
    image: Any,
    model: Any,
    store: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    batch_size: int = 8,
    order: str = "raster",
    priority: Callable[[], tuple[float, float] | None] | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
    resume: bool = True,
    cache: bool | str | os.PathLike = True,
    outputs: Sequence[str] | None = None,
    on_error: str = "stop",
    overwrite: bool = False,
    level: int = 0,
    axes: str | None = None,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    crop_stride: int | None = None,
    blend: str = "tokens",
    strip_width: int = 16,
    carry_state: bool = False,
    context: str | None = None,
    threshold: float = 0.5,
    min_distance: int = 2,
    name: str = "prediction",
    point: tuple[float, float] | None = None,
    spelling: Spelling | None = None,
    part: Any = None,
) -> Execution:
    """Predict `image` with `model` (an `XT`) into `store` (an OME-Zarr path; None keeps the
    results in memory: `Finished.summary["arrays"]`). Returns an iterator of events.

    image: path, `MultiscaleImage` or array (YX / YXC / CYX; `axes` if not guessable);
      `level` picks the pyramid level. normalize: per-channel (mean, std) applied to pixels.
    device: "auto" (cuda -> mps -> cpu) or a torch device; batch_size regions per encoder
      batch (halved on out-of-memory with a Notice).
    order: "raster" | "zigzag" (vertical strips of `strip_width` crop columns) | "viewport"
      (nearest to `point` first; `priority()` may return a new (y, x) point between crops).
    cancel: threading.Event or callable checked between batches and crops.
    resume: continue a store holding the same run (regions finished before are neither
      encoded, with the cache, nor decoded again); False starts it again.
    cache: True (embeddings in the store's private folder), a path, "rebuild" (replace a
      mismatched cache with a Notice) or False.
    outputs: any of "labels", "probabilities", "detections" (dense models) or
      "classification"; default `default_outputs(head)`: labels plus detections for a
      segmentation head with a centre/heatmap map.
    on_error: "stop" (first unreadable region ends the run with Failed) or "continue" (the
      region is marked failed, its crops run without it; a rerun retries it).
    overwrite: replace a store holding another run's results.
    crop_stride: regions between crop starts (default max(1, k // 2)).
    blend: how overlapping crops are merged: "tokens" (default; each region's contextualized
      tokens are window-averaged over its crops and the region is decoded once) or
      "outputs" (every covering crop decodes the region and the output maps are averaged;
      about 3-4x the decoder work at the default stride).
    carry_state: pass the context encoder's state from crop to crop in visiting order.
    context: "crop" (each region sees the crops that cover it) or "image" (whole-image
      context: a scene pass over every region first, which every crop then reads; needs a
      model with `global_context`); default: the mode the model was trained for
      (`cfg.context_mode`).
    threshold, min_distance: detection peaks (score >= threshold, NMS window radius).
    spelling: how refusals name their remedy (`engine.spelling.CLI` for the command line);
      default: the Python arguments.
    part: a `parts.Part`: run only that part of the run of `store` (a worker's share of a
      distributed run, see `parts.py`); its results are in `Execution.store` (a
      `PartStore`), the store at `store` is neither opened nor written.

    The returned `Execution` is an iterator of events (also `.store`: the run's store).
    """
    from napari_xt import __version__
    from napari_xt.model.checkpoint import model_hash

    spelling = spelling or Spelling()
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise EngineInputError(f"model must be an XT model, not {type(model).__name__}")
    if order not in ORDERS:
        raise EngineInputError(f"unknown order {order!r}; expected one of {ORDERS}")
    if on_error not in ("stop", "continue"):
        raise EngineInputError(f"on_error must be 'stop' or 'continue', not {on_error!r}")
    if blend not in BLENDS:
        raise EngineInputError(f"blend must be one of {BLENDS}, not {blend!r}")
    if batch_size < 1:
        raise EngineInputError(f"batch_size must be >= 1, got {batch_size}")
    if part is not None and cfg.head.kind == "classification":
        raise EngineInputError("a classifier's run is not split into parts (it gives one "
                               "record per image); run it in one process")
    context = context or cfg.context_mode
    if context not in CONTEXTS:
        raise EngineInputError(f"context must be one of {CONTEXTS}, not {context!r}")
    if context == "image" and getattr(cfg, "global_context", None) is None:
        raise EngineInputError(
            f"model {cfg.name!r} has no whole-image context (it was trained on crops); "
            f"{hint(spelling, 'crop_context')}")
    try:
        source = ImageSource(image, level=level, axes=axes, normalize=normalize)
    except ValueError as err:
        raise EngineInputError(str(err)) from err
    if source.channels != cfg.in_chans:
        raise EngineInputError(
            f"the image has {source.channels} channel(s) ({source.axes}, shape "
            f"{tuple(source.array.shape)}); model {cfg.name!r} expects {cfg.in_chans}")
    kind = cfg.head.kind
    outputs = tuple(outputs) if outputs else default_outputs(cfg.head)
    allowed = {"classification": ("classification",),
               "segmentation": ("labels", "probabilities", "detections"),
               "detection": ("detections",)}[kind]
    bad = [o for o in outputs if o not in allowed]
    if bad:
        raise EngineInputError(f"outputs {bad} are not available from a {kind} model "
                               f"(choose from {allowed}; known kinds {OUTPUT_KINDS})")
    layout = None if kind == "classification" else map_layout(cfg.head)
    if "detections" in outputs and (layout is None or layout.heat is None):
        raise EngineInputError("detections need a model with a 'heatmap' or 'centre' map")
    k = max(1, int(cfg.crop_regions or 1))
    if crop_stride is not None and not 1 <= int(crop_stride) <= k:  # (before the budget)
        raise EngineInputError(f"crop stride must be in [1, {k}] regions, got {crop_stride}")
    try:  # refuses what cannot fit, before a plan of that size is made; caps the batch
        budget = plan_budget(source, model, outputs, layout, store, cache, batch_size, device,
                             crop_stride, spelling)
    except PlanError as err:  # (its probe of the model failing is not bad input)
        raise EngineInputError(str(err)) from err
    try:
        plan = RegionPlan(source.height, source.width, cfg.region.region_size,
                          cfg.crop_regions, crop_stride, strip_width)  # its option checks
    except ValueError as err:
        raise EngineInputError(str(err)) from err
    if part is not None and budget.batch_size != batch_size:  # (features would differ)
        raise EngineInputError(
            f"this worker's memory caps the encoder batch at {budget.batch_size} regions, the "
            f"run's is {batch_size}: every part must use the run's; give the run a "
            f"{hint(spelling, 'batch_size')} of {budget.batch_size} or less")
    batch_size = budget.batch_size
    # the reads of one strip (its width, a couple of crop rows) fit; nothing more is kept
    size = plan.region_size
    source.fit_tile_cache((plan.strip_width * plan.stride + plan.k) * size, 2 * plan.k * size)
    try:
        identity = source.identity()  # the first pixels read: an unreadable image is bad input
    except Exception as err:
        raise EngineInputError(f"cannot read the image: {type(err).__name__}: {err}") from err
    encoder_sig = {
        "image": identity, "normalize": _listify(normalize),
        "model_hash": model_hash(model), "region_size": plan.region_size,
        "version": __version__,
    }
    run_sig = {**encoder_sig, "model": cfg.name, "crop_regions": plan.k,
               "crop_stride": plan.stride, "blend": blend, "outputs": list(outputs),
               "threshold": threshold,
               "min_distance": min_distance, "carry_state": carry_state, "name": name,
               "context": context,
               "order": order if carry_state else None}
    store_spec = _store_spec(cfg, plan, layout, outputs, name, run_sig, threshold,
                             min_distance)
    dev = pick_device(device)
    if part is not None:
        pstore, emb = _part_store(part, store, cache, store_spec, encoder_sig, plan, spelling)
    else:
        pstore = create_store(store, store_spec, overwrite=overwrite, restart=not resume,
                              inputs=source.inputs, spelling=spelling,
                              threaded=background_threads(dev), cache_signature=encoder_sig)
        emb = None
        where: Path | None = None
        owned = False
        if cache is True or cache == "rebuild":  # the store's own (none for store=None)
            if pstore.path is not None:
                where, owned = default_cache(pstore.path), True
        elif cache is not False and cache is not None:
            where = Path(cache)
        try:
            if where is not None:
                if not owned:
                    from .store.guard import check_not_input

                    check_not_input(where, source.inputs, spelling, "embedding cache")
                emb = EmbeddingCache(where, encoder_sig, plan.grid,
                                     rebuild=cache == "rebuild", owned=owned,
                                     spelling=spelling)
        except BaseException:
            pstore.close()
            raise
    spec = RunSpec(
        source=source, model=model, plan=plan, layout=layout, outputs=outputs,
        device=dev, batch_size=batch_size, order=order, priority=priority,
        cancelled=_cancel_check(cancel), on_error=on_error, carry_state=carry_state,
        context=context,
        blend=blend, threshold=threshold, min_distance=min_distance, name=name, point=point,
        signature=run_sig, notices=budget.notices, part=part)
    return Execution(spec, pstore, emb)


def _part_store(part: Any, store: Any, cache: Any, store_spec: StoreSpec,
                encoder_sig: dict[str, Any], plan: RegionPlan, spelling: Spelling):
    """A part's sink and its part of the run's embedding cache (which the run made)."""
    from .parts import Part, PartStore

    if not isinstance(part, Part):
        raise EngineInputError(f"part must be an engine.parts.Part, not {part!r}")
    if cache is True and store is not None:
        where = default_cache(Path(store))
    elif cache not in (True, False, None, "rebuild"):
        where = Path(cache)
    else:
        raise EngineInputError("a part of a distributed run reads its features from the "
                               "run's embedding cache: give the run's store (or cache "
                               "path), with the cache on")
    return PartStore(store_spec, part), EmbeddingCache(where, encoder_sig, plan.grid,
                                                       spelling=spelling,
                                                       segment=part.segment,
                                                       known=part.known)


@dataclass(frozen=True)
class RunSpec:
    """Everything one run is: validated inputs and options, frozen before any work."""

    source: ImageSource
    model: Any
    plan: RegionPlan
    layout: MapLayout | None  # None: a classifier
    outputs: tuple[str, ...]
    device: Any  # torch.device
    batch_size: int
    order: str
    priority: Callable[[], tuple[float, float] | None] | None
    cancelled: Callable[[], bool]
    on_error: str
    carry_state: bool
    context: str  # "crop" | "image"
    blend: str
    threshold: float
    min_distance: int
    name: str
    point: tuple[float, float] | None
    signature: dict[str, Any]
    notices: tuple[Any, ...] = ()  # what the run says first (its estimate, a capped batch)
    part: Any = None  # parts.Part: only this share of the run (a distributed run's worker)


def class_infos(head: Any) -> tuple[ClassInfo, ...]:
    """Names (from the model's config, else "class i") and colours of a head's classes."""
    names = head.class_names or tuple(f"class {i}" for i in range(head.num_classes))
    return tuple(ClassInfo(i, n, PALETTE[i % len(PALETTE)]) for i, n in enumerate(names))


def _store_spec(cfg: Any, plan: RegionPlan, layout: MapLayout | None, outputs, name: str,
                signature: dict[str, Any], threshold: float, min_distance: int) -> StoreSpec:
    head = cfg.head
    heat = 0 if layout is None or layout.heat is None else layout.heat[1] - layout.heat[0]
    points = head.point_names or tuple(f"class {i}" for i in range(heat))
    probs = 0 if layout is None or layout.probs is None else layout.probs[1] - layout.probs[0]
    return StoreSpec(
        signature=signature, height=plan.height, width=plan.width,
        region_size=plan.region_size, strip_px=plan.strip_width * plan.stride * plan.region_size,
        kind=head.kind, outputs=tuple(outputs), name=name,
        label_dtype=str(np.dtype(layout.label_dtype)) if layout else "uint8",
        classes=class_infos(head) if layout is not None and layout.probs is not None else (),
        prob_channels=probs, heat_channels=heat,
        has_size=layout is not None and layout.size is not None,
        point_classes=points if heat else (), threshold=float(threshold),
        min_distance=int(min_distance), crops=len(plan.crops))


def _listify(value: Any) -> Any:
    if value is None:
        return None
    return [np.asarray(v, dtype=float).reshape(-1).tolist() for v in value]
