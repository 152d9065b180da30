"""Finishing a result store: pyramids, preview, tables, metadata, then "complete".

Every step is idempotent and recorded in the journal with the digests of the files it wrote
(`published` records), so a kill at any moment leaves a store that the next run verifies and
finishes: steps whose files verify are kept, the others are done again. The root zarr.json
is rewritten last, atomically, with `"complete": true`; until then generic readers see no
image and napari-xt sees an unfinished run.

- label pyramid (mode) and probability pyramid (mean), each level from the one above it,
  shard by shard;
- a preview of the input image as the store's own OME-Zarr image (`preview.py`);
- the detection table (zarr columns and Parquet, class names as categories), the
  classification record;
- NGFF metadata: labels (image-label with class names and colours), probabilities (an image
  with one channel per class), the labels listing, the root image.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .digests import file_digest, sync_dir, sync_file, sync_tree
from .layout import (
    Tiling,
    classification_path,
    default_cache,
    labels_path,
    probabilities_path,
    table_path,
)
from .preview import write_preview
from .spec import StoreSpec

FAULT_HOOK = None  # tests: a callable(step) run before each step (to kill the process there)


def _fault(step: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(step)


def level_shapes(spec: StoreSpec) -> list[tuple[int, int]]:
    """(height, width) of every pyramid level of the store of `spec` (`layout.level_shapes`)."""
    from . import layout

    return layout.level_shapes(spec.height, spec.width)


def run_pixel_size(source: Any) -> tuple[tuple[float, float], str | None]:
    """World size of one pixel of the run's level, and its unit (None: level-0 pixels)."""
    if source is not None and source.pixel_size is not None:
        return ((float(source.pixel_size[0] * source.scale[0]),
                 float(source.pixel_size[1] * source.scale[1])), source.unit)
    scale = (1.0, 1.0) if source is None else tuple(float(v) for v in source.scale)
    return scale, None


def _datasets(n: int, px: tuple[float, float], lead: int, factors: list[int] | None = None):
    out = []
    for level in range(n):
        f = (factors or [2**i for i in range(n)])[level]
        scale = [1.0] * lead + [px[0] * f, px[1] * f]
        ds: dict[str, Any] = {"path": str(level),
                              "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        if f > 1:
            shift = [0.0] * lead + [(f - 1) / 2 * px[0], (f - 1) / 2 * px[1]]
            ds["coordinateTransformations"].append({"type": "translation",
                                                    "translation": shift})
        out.append(ds)
    return out


def _axes(lead: str, unit: str | None) -> list[dict[str, Any]]:
    from napari_xt.io.ngff import unit_name

    axes: list[dict[str, Any]] = [{"name": "c", "type": "channel"}] if lead else []
    for name in ("y", "x"):
        a: dict[str, Any] = {"name": name, "type": "space"}
        if unit_name(unit):
            a["unit"] = unit_name(unit)
        axes.append(a)
    return axes


def _dir_digests(root: Path, rel: str) -> dict[str, list[int] | None]:
    out: dict[str, list[int] | None] = {}
    base = root / rel
    for dirpath, _, files in os.walk(base):
        for f in files:
            full = Path(dirpath) / f
            d = file_digest(full)
            out[str(full.relative_to(root)).replace(os.sep, "/")] = None if d is None else list(d)
    return out


# ---------------------------------------------------------------------- steps
def write_pyramid(store: Any, name: str, method: str) -> None:
    """Writes levels 1 and up of output `name`'s pyramid, each halved from the level above by
    `method` ("mode" for labels, "mean" for probabilities) shard by shard, and records their
    files as the published step `pyramid:<name>`."""
    from napari_xt.io.pyramid import downsample_block

    from .arrays import ArrayDef, create_array

    d0 = store.defs[name]
    base = d0.path.rsplit("/", 1)[0]
    lead = d0.shape[:-2]
    shapes = level_shapes(store.spec)
    prev = store._zarray(name)
    for level, (h, w) in enumerate(shapes[1:], start=1):
        t = Tiling.for_grid(h, w, 1)
        d = ArrayDef(f"{base}/{level}", (*lead, h, w), (*lead, *t.chunk), (*lead, *t.shard),
                     d0.dtype, d0.dims)
        arr = create_array(store.zstore, d, level=3)
        iy, ix = len(lead), len(lead) + 1
        rows, cols = t.shard_grid
        for i in range(rows):
            for j in range(cols):
                y0, x0, y1, x1 = t.shard_box(i, j)
                src = np.asarray(prev[..., 2 * y0:2 * y1, 2 * x0:2 * x1])
                arr[..., y0:y1, x0:x1] = downsample_block(src, iy, ix, 2, method)
        prev = arr
    files = {k: (list(v) if v else None) for k, v in store.zstore.take(base + "/").items()
             if not k.startswith(f"{base}/0/")}
    store.record_published(f"pyramid:{name}", files)


def class_names(classes: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """(N,) object array: the name of each class index, "class <i>" for an index the names
    do not cover (never another class's name)."""
    return np.array([names[i] if 0 <= i < len(names) else f"class {i}"
                     for i in np.asarray(classes, np.int64).reshape(-1).tolist()], dtype=object)


def write_table(store: Any, points: np.ndarray, scale: tuple[float, float]) -> int:
    """Writes the detection table of `points` (level pixels; `scale`: level-0 pixels per level
    pixel) as zarr columns and Parquet, with class names when the spec has them, and records it
    as published; returns the number of detections."""
    from napari_xt.io.results import write_detections

    from ..finish import detection_table

    spec = store.spec
    table = detection_table(points, scale)
    if spec.point_classes:
        table["class_name"] = class_names(table["class"], spec.point_classes)
    write_detections(store.path, spec.name, table, overwrite=True, parquet=True,
                     attrs={"source": "napari-xt predict",
                            "classes": list(spec.point_classes)})
    store.record_published("table", _dir_digests(store.path, table_path(spec.name)))
    return int(len(points))


def write_classification_record(store: Any, record: dict[str, Any]) -> None:
    """Writes the classification `record` under `classifications/<name>` and records it as
    published."""
    from napari_xt.io.results import write_classification

    write_classification(store.path, store.spec.name, record, overwrite=True)
    store.record_published("classification",
                           _dir_digests(store.path, classification_path(store.spec.name)))


def write_metadata(store: Any, source: Any) -> None:
    """Writes the NGFF metadata of the outputs: the label image's (multiscales, class colours and
    names; listed in the labels group) and the probability image's (multiscales, a channel per
    class), and records their zarr.json files as the published step "metadata"."""
    from napari_xt.io.result_store import register, write_group

    from .layout import FORMAT, KIND  # noqa: F401  (documented keys)

    spec = store.spec
    px, unit = run_pixel_size(source)
    n = len(level_shapes(spec))
    files: dict[str, list[int] | None] = {}
    if "labels" in store.defs:
        ms = {"axes": _axes("", unit), "datasets": _datasets(n, px, 0), "name": spec.name,
              "type": "mode"}
        label: dict[str, Any] = {"version": "0.5", "source": {"image": "../../"}}
        if spec.classes:
            label["colors"] = [{"label-value": c.value, "rgba": list(c.color)}
                               for c in spec.classes]
            label["properties"] = [{"label-value": c.value, "class": c.name}
                                   for c in spec.classes]
        group = store.path / labels_path(spec.name)
        write_group(group, 3, {"ome": {"version": "0.5", "multiscales": [ms],
                                       "image-label": label}})
        register(store.path, "labels", spec.name, "labels")
        files[f"{labels_path(spec.name)}/zarr.json"] = list(file_digest(group / "zarr.json"))
    if "probabilities" in store.defs:
        from napari_xt.io.ngff import omero_metadata

        names = [c.name for c in spec.classes] or [f"class {i}" for i in
                                                   range(spec.prob_channels)]
        colors = ["".join(f"{v:02X}" for v in c.color[:3]) for c in spec.classes] or None
        ms = {"axes": _axes("c", unit), "datasets": _datasets(n, px, 1), "name": spec.name,
              "type": "mean"}
        omero = omero_metadata(names[: spec.prob_channels], colors, [(0.0, 1.0)] * len(names))
        group = store.path / probabilities_path(spec.name)
        write_group(group, 3, {"ome": {"version": "0.5", "multiscales": [ms], "omero": omero},
                               "napari-xt": {"kind": "probabilities", "classes": names}})
        files[f"{probabilities_path(spec.name)}/zarr.json"] = list(file_digest(group / "zarr.json"))
    store.record_published("metadata", files)


def root_block(store: Any, source: Any) -> dict[str, Any]:
    """The root group's `ome` block: the preview image."""
    from napari_xt.io.ngff import omero_metadata

    px, unit = run_pixel_size(source)
    info = store.preview
    n, f0, c = info["levels"], info["first_factor"], info["channels"]
    ms = {"axes": _axes("c" if c > 1 else "", unit),
          "datasets": _datasets(n, px, 1 if c > 1 else 0, [f0 * 2**i for i in range(n)]),
          "name": "input preview", "type": "mean"}
    block: dict[str, Any] = {"version": "0.5", "multiscales": [ms]}
    names = list(source.channel_names or [f"channel {i}" for i in range(c)]) if source else []
    if len(names) == c:
        block["omero"] = omero_metadata(names, None, [tuple(r) for r in info["ranges"]])
    return block


def publish(store: Any, source: Any, *, record: dict[str, Any] | None,
            provenance: dict[str, Any], complete: bool,
            preview: Any = None) -> dict[str, Any]:
    """Finish the store (see the module docstring); returns the run summary."""
    from napari_xt.io.result_store import group_attrs, json_default, write_group

    spec = store.spec
    if store.changed:
        store.published = {}
    done = set(store.published)
    summary: dict[str, Any] = {"outputs": list(spec.outputs)}
    if "labels" in store.defs:
        if "pyramid:labels" not in done:
            _fault("pyramid")
            write_pyramid(store, "labels", "mode")
        summary["labels"] = labels_path(spec.name)
    if "probabilities" in store.defs:
        if "pyramid:probabilities" not in done:
            _fault("pyramid")
            write_pyramid(store, "probabilities", "mean")
        summary["probabilities"] = probabilities_path(spec.name)
    store.preview = (store.attrs().get("preview") if "preview" in done else None)
    if store.preview is None:
        _fault("preview")
        write_preview(store, source, preview)
    if spec.writes_detections:
        points = store.points()
        summary["detections"] = int(len(points))
        if "table" not in done:
            _fault("table")
            write_table(store, points, tuple(float(v) for v in source.scale))
        summary["table"] = table_path(spec.name)
    if record is not None:
        summary["classification"] = record
        if "classification" not in done:
            _fault("classification")
            write_classification_record(store, record)
    if "metadata" not in done:
        _fault("metadata")
        write_metadata(store, source)
    store.journal.sync()
    # every result on disk before the root says "complete" (the embedding cache checks
    # itself when read, and may be gigabytes)
    sync_tree(store.path, skip=(os.path.relpath(default_cache(store.path), store.path),))
    _fault("root")
    import json

    attrs = group_attrs(store.path, 3)
    ours = dict(attrs.get("napari-xt", {}))
    ours.update(json.loads(json.dumps(provenance, default=json_default)))
    ours.update({"complete": bool(complete), "summary": summary})
    write_group(store.path, 3, {"ome": root_block(store, source), "napari-xt": ours})
    sync_file(store.path / "zarr.json")
    sync_dir(store.path)
    _fault("done")
    return summary
