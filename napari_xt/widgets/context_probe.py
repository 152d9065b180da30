"""What did context change? Region-only predictions compared with a run's stored result.

For a region (row, col) the model is run on that region alone, in one of two ways:

- ``alone``: the context encoder runs, but its sequence holds only this region's tokens
  (what the model says when it can see nothing else), at the position the run gives it
  (crop-relative: its place in the first crop that covers it);
- ``centred``: the same, with the region placed at the centre of a training crop instead
  of its own position: a position-neutral baseline (a region's absolute position alone can
  tell a model "image border", e.g. region (0, 0));
- ``identity``: the context encoder is skipped (its input tokens go straight to the head).

The stored result is the run's with-context prediction (labels of the store). The change
fraction of a region is the share of its pixels whose class differs between the two. No Qt
here: the inspection widget calls these functions from a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODES = ("alone", "centred", "identity")


@dataclass(frozen=True)
class RegionComparison:
    row: int
    col: int
    box: tuple[int, int, int, int]  # (y0, x0, y1, x1) level pixels
    region_only: np.ndarray  # (h, w) labels without context
    with_context: np.ndarray  # (h, w) labels stored by the run
    changed_fraction: float


def stored_labels(store: str | Path):
    """The run's label array (final level 0 if written, else the live work array)."""
    from napari_xt.engine.store import open_result

    try:
        array = open_result(store).level0("labels")
    except OSError as err:
        raise ValueError(str(err)) from err
    if array is None:
        raise ValueError(f"{store}: no labels written yet (run the model first)")
    return array


def run_plan(model, source, region_size: int, stride: int | None = None):
    """The run's `RegionPlan` of `source` (its crops decide each region's position)."""
    from napari_xt.engine.plan import RegionPlan

    return RegionPlan(source.height, source.width, region_size, model.cfg.crop_regions or 1,
                      stride)


def region_only_labels(model, source, row: int, col: int, region_size: int,
                       mode: str = "alone", stride: int | None = None, plan=None
                       ) -> np.ndarray:
    """(h, w) class labels of region (row, col) predicted from that region only (`stride`:
    the run's crop stride, which decides the region's crop-relative position; or the run's
    `plan`, made once for many regions)."""
    import torch

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if model.cfg.head.kind == "classification":
        raise ValueError("the comparison needs a dense (segmentation/detection) model; this "
                         "model is an image classifier")
    s = region_size
    plan = plan or run_plan(model, source, s, stride)
    y0, x0, y1, x1 = plan.box(row, col)
    x, bad = source.read((y0, x0, y1, x1), s)  # (C, S, S), (S, S)
    device = next(model.parameters()).device
    k = plan.k
    rc = np.array([[k // 2, k // 2]] if mode == "centred" else [plan.position_in_crop(row, col)])
    with torch.no_grad():
        feats = model.encode_regions(torch.from_numpy(x)[None].to(device))
        last = feats[-1]
        tokens, _ = model.region_tokens(last[None], rc)
        if mode in ("alone", "centred"):
            tokens, _ = model.contextualize(tokens)
        maps = model.decode(tokens, feats, rc)
    primary = "logits" if "logits" in maps else next(iter(maps))
    labels = maps[primary][0, 0].float().argmax(0).cpu().numpy()[: y1 - y0, : x1 - x0]
    labels = labels.astype(np.uint16 if model.cfg.num_classes > 255 else np.uint8)
    labels[bad[: y1 - y0, : x1 - x0]] = 0
    return labels


def compare_region(model, source, store, row: int, col: int, region_size: int,
                   mode: str = "alone", stored=None, stride: int | None = None, plan=None
                   ) -> RegionComparison:
    """Region-only labels of (row, col) against the run's stored labels."""
    s = region_size
    plan = plan or run_plan(model, source, s, stride)
    rows, cols = plan.grid
    if not (0 <= row < rows and 0 <= col < cols):
        raise ValueError(f"region ({row}, {col}) is outside the {rows} x {cols} grid")
    stored = stored_labels(store) if stored is None else stored
    y0, x0, y1, x1 = box = plan.box(row, col)
    context = np.asarray(stored[y0:y1, x0:x1])
    alone = region_only_labels(model, source, row, col, s, mode, plan=plan)
    changed = float(np.mean(alone != context)) if context.size else 0.0
    return RegionComparison(row, col, tuple(box), alone, context, changed)


def change_map(model, source, store, region_size: int, regions, mode: str = "alone",
               stride: int | None = None):
    """Yield (row, col, changed fraction) for every (row, col) in `regions`."""
    stored = stored_labels(store)
    plan = run_plan(model, source, region_size, stride)  # once, for every region
    for row, col in regions:
        result = compare_region(model, source, store, int(row), int(col), region_size, mode,
                                stored=stored, plan=plan)
        yield result.row, result.col, result.changed_fraction
