"""A view re-decoded without context, from the run's embedding cache where it has them.

`labels_without_context(model, source, regions, store=...)` gives the class labels each
region would get with the context encoder skipped (its input tokens straight to the head:
what the model makes of the region alone), for the regions of a view. Region features come
from the store's embedding cache when it holds them for this image and model (only the head
reruns), else the region encoder runs. The run's own labels are the same view with context,
so toggling between the two shows what context changed, region by region.

Layouts: regions (R, 2) (row, col); features [(R, C_l, h_l, w_l)]; labels per region
(h, w) integers, clipped to the image.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

CACHE_KEYS = ("image", "normalize", "model_hash", "region_size", "version")


@dataclass
class ViewLabels:
    """Labels of a view decoded without context: `labels` (h, w) per region (row, col),
    how many regions came `from_cache` and how many were `encoded`, the time it took in
    `seconds`, and a `note` on the use of the embedding cache."""

    labels: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    from_cache: int = 0
    encoded: int = 0
    seconds: float = 0.0
    note: str = ""


def _cached(store: str | os.PathLike | None, regions: list[tuple[int, int]], grid
            ) -> tuple[dict[tuple[int, int], list[np.ndarray]], dict, str]:
    """Features of `regions` from the store's own embedding cache: ({region: levels},
    {region: NaN mask}, note); empty when there is no usable cache (busy, other inputs)."""
    if store is None:
        return {}, {}, ""
    from napari_xt.engine.cache import CacheMismatchError, EmbeddingCache
    from napari_xt.engine.store import open_result
    from napari_xt.io.lock import LockedError

    try:
        reader = open_result(store)
    except Exception:  # noqa: BLE001 - not a store: nothing cached
        return {}, {}, ""
    path = reader.default_cache
    if not (path / "cache.json").is_file():
        return {}, {}, "no embedding cache in the store"
    sig = {k: reader.signature.get(k) for k in CACHE_KEYS}
    try:
        cache = EmbeddingCache(path, sig, grid)
    except (CacheMismatchError, LockedError, OSError) as err:
        return {}, {}, f"embedding cache not used ({err})"
    try:
        wanted = [rc for rc in regions if cache.has(*rc)]
        if not wanted or cache.shapes is None:
            return {}, {}, ""
        found, levels, _, masks = cache.get(wanted)
        return ({rc: [lv[n] for lv in levels] for n, rc in enumerate(found)}, masks, "")
    finally:
        cache.close()


def labels_without_context(model: Any, source: Any, regions: list[tuple[int, int]], *,
                           region_size: int, store: str | os.PathLike | None = None,
                           stride: int | None = None, batch: int = 16) -> ViewLabels:
    """Labels of `regions` with the context encoder skipped (see the module docstring), each
    region at the crop-relative position the run gives it (`stride`: the run's)."""
    from napari_xt.engine.plan import RegionPlan

    t0 = time.perf_counter()
    if model.classification:
        raise ValueError("a view needs a dense (segmentation/detection) model; this model "
                         "is an image classifier")
    s = int(region_size)
    plan = RegionPlan(source.height, source.width, s, model.cfg.crop_regions or 1, stride)
    regions = [(int(r), int(c)) for r, c in regions
               if 0 <= r < plan.rows and 0 <= c < plan.cols]
    cached, masks, note = _cached(store, regions, plan.grid)
    # regions at one position share a decode call (B regions, one position each)
    by_position: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for rc in regions:
        by_position.setdefault(plan.position_in_crop(*rc), []).append(rc)
    out = ViewLabels(note=note)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    work = [(pos, group[i:i + batch]) for pos, group in by_position.items()
            for i in range(0, len(group), batch)]
    for pos, part in work:
        feats_of: dict[tuple[int, int], list[torch.Tensor]] = {}
        bad: dict[tuple[int, int], np.ndarray] = {}
        todo = [rc for rc in part if rc not in cached]
        with torch.no_grad():
            if todo:
                pix, mk = zip(*(source.read(plan.box(*rc), s) for rc in todo))
                feats = model.encode_regions(torch.from_numpy(np.stack(pix)).to(device))
                for n, rc in enumerate(todo):
                    feats_of[rc] = [f[n] for f in feats]
                    bad[rc] = mk[n]
                out.encoded += len(todo)
            for rc in part:
                if rc in cached:
                    feats_of[rc] = [torch.from_numpy(np.asarray(f, np.float32)).to(device, dtype)
                                    for f in cached[rc]]
                    bad[rc] = masks.get(rc)
                    out.from_cache += 1
            levels = [torch.stack([feats_of[rc][i] for rc in part])
                      for i in range(len(feats_of[part[0]]))]  # [(B, C_l, h_l, w_l)]
            where = np.array([pos], np.int64)
            tokens, _ = model.region_tokens(levels[-1][:, None], where)  # (B, h*w, D)
            maps = model.decode(tokens, levels, where)  # identity: no context encoder
        logits = maps["logits"] if "logits" in maps else next(iter(maps.values()))
        labels = logits[:, 0].float().argmax(1).cpu().numpy()  # (B, S, S)
        dt = np.uint16 if model.cfg.num_classes > 255 else np.uint8
        for n, rc in enumerate(part):
            y0, x0, y1, x1 = plan.box(*rc)
            lab = labels[n, : y1 - y0, : x1 - x0].astype(dt)
            m = bad.get(rc)
            if m is not None:
                lab[np.asarray(m)[: y1 - y0, : x1 - x0]] = 0
            out.labels[rc] = lab
    out.seconds = time.perf_counter() - t0
    return out


def mosaic(view: ViewLabels, region_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The regions' labels as one array over their bounding box (regions not in the view
    are 0), and its top-left pixel (y, x)."""
    if not view.labels:
        return np.zeros((0, 0), np.uint8), (0, 0)
    s = region_size
    rows = [r for r, _ in view.labels]
    cols = [c for _, c in view.labels]
    r0, c0 = min(rows), min(cols)
    first = next(iter(view.labels.values()))
    h = max(r * s + lab.shape[0] for (r, _), lab in view.labels.items()) - r0 * s
    w = max(c * s + lab.shape[1] for (_, c), lab in view.labels.items()) - c0 * s
    out = np.zeros((h, w), first.dtype)
    for (r, c), lab in view.labels.items():
        y, x = (r - r0) * s, (c - c0) * s
        out[y:y + lab.shape[0], x:x + lab.shape[1]] = lab
    return out, (r0 * s, c0 * s)

