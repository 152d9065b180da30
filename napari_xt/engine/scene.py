"""The scene pass of whole-image context (`context="image"`): every region once, then crops.

Before any crop runs, every region of the image goes through the region encoder in raster
order, in batches (features from the embedding cache where it has them; what is encoded is
put in the cache, so the crops that follow read it instead of encoding again). Each
region's deepest map is reduced to one vector and summed into its scene cell
(`SceneSummary`: memory flat in the image size); the cells are encoded once into the scene
tokens that every crop then reads (`XT.read_scene`). See `napari_xt.model.global_context`.

The pass covers regions an earlier run finished too (a resumed run rebuilds the same scene
from the same features, so its results equal an uninterrupted run's). A region that cannot
be read is left out of its cell; since every region's context then lacks it, every region
of this run is marked tainted, and a rerun that can read it computes them all again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from napari_xt.model.global_context import SceneSummary, SceneTokens

from .device import autocast
from .events import Event, Notice
from .features import FeatureSupply

Index = tuple[int, int]


def scene_pass(spec: Any, features: FeatureSupply) -> Iterator[Event]:
    """Run the scene pass (events as it goes); returns the `SceneTokens`, or None when the
    run was cancelled during it."""
    plan, model, book = spec.plan, spec.model, features.book
    rows, cols = plan.grid
    grid = model.scene_grid(rows, cols)
    summary: SceneSummary | None = None
    order = [(r, c) for r in range(rows) for c in range(cols)]
    t0 = time.perf_counter()
    gr, gc = grid.shape
    yield Notice(f"whole-image context: summarizing all {len(order)} regions into "
                 f"{gr} x {gc} scene cells before the crops run", "info")
    bs = spec.batch_size
    for start in range(0, len(order), bs):
        if spec.cancelled():
            return None
        batch = order[start:start + bs]
        yield from features.ensure(batch)
        ok = [i for i in batch if book.usable(i) and i in features]
        if not ok:
            continue
        vectors = model.summarize(features.stack(ok, levels=model.summary_levels()))
        if summary is None:
            summary = model.new_summary(rows, cols, vectors.shape[1])
        summary.add(ok, vectors)
    if summary is None:
        raise RuntimeError("no region of the image could be read for the scene pass")
    missing = len(order) - summary.regions
    if missing:
        book.tainted.update(order)
        yield Notice(f"whole-image context: {missing} unreadable region(s) are missing from "
                     "the scene; every region of this run is marked for recomputation by a "
                     "rerun that can read them", "warning")
    with torch.inference_mode(), autocast(spec.device):
        scene = model.encode_scene(summary)
    yield Notice(f"whole-image context: scene of {gr} x {gc} cells encoded in "
                 f"{time.perf_counter() - t0:.1f} s", "info")
    return SceneTokens(scene.tokens.to(spec.device), scene.grid)
