"""Training pairs from an annotator's corrections, to fine-tune a model on what was fixed.

`export_pairs(store, image, out_dir)` turns the saved edits of `labels/<name>-corrected`
(see `napari_xt.io.corrections`) into training pair stores (`train.data.write_pair`): edits
whose windows lie within `margin` of each other form one pair covering their windows plus
`margin` pixels of surrounding image on every side (the context an xT model needs). The mask
holds the corrected labels inside the edited windows and `IGNORE_INDEX` elsewhere (the
model's own labels around them are not ground truth); the points are the corrected
detections inside the edited windows. Images are read from the image the run saw, at the
run's pyramid level, and checked against the run's recorded image identity.

Fine-tune with `napari-xt train` and `model: {checkpoint: ...}`, `data: {kind: zarr,
train_paths: [OUT_DIR]}` (see docs/training.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_xt.io.box import Box

from .data import IGNORE_INDEX, write_pair


@dataclass(frozen=True)
class ExportedPair:
    """One training pair store written by `export_pairs`: its `path`, the `box` of label
    pixels it covers, the number of saved `edits` it holds, the `labelled` pixels (those inside
    edited windows; the rest of the mask is `IGNORE_INDEX`) and the number of detection
    `points`."""

    path: Path
    box: Box  # label pixels the pair covers
    edits: int  # saved edits it holds
    labelled: int  # pixels with a corrected label (the rest is IGNORE_INDEX)
    points: int


class ExportError(ValueError):
    """The corrections cannot be exported (no edits, another image, ...)."""


def group_boxes(boxes: Sequence[Box | Sequence[int]], margin: int) -> list[list[int]]:
    """Indices of boxes (y0, x0, y1, x1) grouped so that boxes closer than `margin` share
    a group."""
    boxes = [Box.of(b) for b in boxes]
    parent = list(range(len(boxes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(boxes):
        for j in range(i):
            b = boxes[j]
            if (a.y0 < b.y1 + margin and b.y0 < a.y1 + margin
                    and a.x0 < b.x1 + margin and b.x0 < a.x1 + margin):
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(boxes)):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values())


def _earlier_pairs(out: Path, stem: str, name: str) -> list[Path]:
    pattern = re.compile(rf"^{re.escape(stem)}-{re.escape(name)}-\d+-\d+\.zarr$")
    return sorted(p for p in out.iterdir() if pattern.match(p.name)) if out.is_dir() else []


def export_pairs(
    store: str | os.PathLike,
    image: Any,
    out_dir: str | os.PathLike,
    *,
    name: str = "prediction",
    margin: int = 256,
    axes: str | None = None,
    overwrite: bool = False,
    check_image: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> list[ExportedPair]:
    """Write one training pair store per group of edits into `out_dir`; returns them.

    `image`: what the run read (a path or a `MultiscaleImage`; for runs on an array, that
    array, with `axes` when they cannot be guessed). The run's pyramid level and image
    identity (shape, dtype, content fingerprint) come from the store's provenance.
    Pairs exported earlier from the same store and result are replaced with `overwrite`
    (else refused before anything is written): they would contradict newer corrections.
    """
    from napari_xt.io import read_labels
    from napari_xt.io.corrections import (
        corrected_name,
        edits,
        read_corrected_detections,
        run_provenance,
        table_scale,
    )
    from napari_xt.io.source import ImageSource

    root = Path(store)
    saved = edits(root, name)
    if not saved:
        raise ExportError(f"{root}: no saved corrections of {name!r} to export (correct some "
                          "windows first: Plugins > napari-xt > Correct results)")
    provenance = run_provenance(root)
    level = int(provenance.get("level", 0) or 0)
    pyramid = isinstance(image, (str, os.PathLike)) or hasattr(image, "levels")
    try:  # a bare array is the run's level itself
        source = ImageSource(image, level=level if pyramid else 0, axes=axes)
    except (ValueError, OSError) as err:
        raise ExportError(f"cannot read the image for the corrections: {err}") from err
    labels = read_labels(root, corrected_name(name)).levels[0]
    if source.shape != tuple(labels.shape):
        raise ExportError(f"the image (level {level}: {source.shape[0]} x {source.shape[1]}) "
                          f"does not match the corrected labels ({labels.shape[0]} x "
                          f"{labels.shape[1]}); pass the image the run was made on")
    if check_image and provenance.get("image") is not None:
        identity = source.identity()  # content, not path: a moved file is the same image
        recorded = provenance["image"]
        differs = sorted(k for k in ("shape", "dtype", "fingerprint") if k in recorded
                         and json.dumps(recorded[k]) != json.dumps(identity[k]))
        if differs:
            raise ExportError(f"the image differs from the one the run was made on (in: "
                              f"{', '.join(differs)}); pass the image the run read")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = None
    try:
        table = read_corrected_detections(root, name)
    except Exception:  # noqa: BLE001 - no detection table: masks only
        table = None
    fy, fx = table_scale(root)
    h, w = labels.shape
    boxes = [e.box for e in saved]
    groups = group_boxes(boxes, margin)
    stem = root.name[:-5] if root.name.endswith(".zarr") else root.name
    earlier = _earlier_pairs(out, stem, name)
    if earlier and not overwrite:
        raise ExportError(f"{out} already holds {len(earlier)} pair(s) exported from "
                          f"{root.name} ({name}); replace them with the current corrections "
                          "(overwrite) or export to another folder")
    for path in earlier:  # pairs of older corrections would contradict the current ones
        shutil.rmtree(path)
    pairs = []
    for g, members in enumerate(groups):
        y0 = max(0, min(boxes[i].y0 for i in members) - margin)
        x0 = max(0, min(boxes[i].x0 for i in members) - margin)
        y1 = min(h, max(boxes[i].y1 for i in members) + margin)
        x1 = min(w, max(boxes[i].x1 for i in members) + margin)
        pair = Box(y0, x0, y1, x1)
        corrected = np.asarray(labels[pair.slices])
        mask = np.full(corrected.shape, IGNORE_INDEX, np.uint8 if corrected.max(
            initial=0) < IGNORE_INDEX else corrected.dtype)
        reviewed = np.zeros(corrected.shape, bool)
        for i in members:
            b = boxes[i]
            reviewed[b.y0 - y0:b.y1 - y0, b.x0 - x0:b.x1 - x0] = True
        mask[reviewed] = corrected[reviewed]
        points = sizes = None
        if table is not None and len(table["y"]):
            py, px = np.asarray(table["y"], float) / fy, np.asarray(table["x"], float) / fx
            iy, ix = np.floor(py).astype(int) - y0, np.floor(px).astype(int) - x0
            inside = (iy >= 0) & (iy < pair.height) & (ix >= 0) & (ix < pair.width)
            inside[inside] = reviewed[iy[inside], ix[inside]]
            points = np.stack([py[inside] - y0, px[inside] - x0], 1)
            size = np.asarray(table.get("size", np.zeros(len(py))), float)
            sizes = size[inside] / float(np.sqrt(fy * fx))
        path = out / f"{stem}-{name}-{y0}-{x0}.zarr"  # one folder can collect many stores
        write_pair(path, source.read_box(y0, x0, y1, x1), mask, points, sizes)
        pairs.append(ExportedPair(path, pair, len(members),
                                  int(reviewed.sum()), 0 if points is None else len(points)))
        if progress is not None:
            progress(g + 1, len(groups))
    return pairs
