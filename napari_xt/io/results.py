"""Results in an OME-Zarr store: label images, detection tables, classification records.

Layout inside the store (beside the image, if the store holds one):

    labels/<name>/            NGFF image-label: multiscale label pyramid (mode downsampling),
                              `image-label` metadata with colors, properties, source
    tables/<name>/            detections: one 1-D array per column (y, x, class, score, size,
                              ...), same length; string columns stored as integer codes with
                              their categories in the group attributes; optional table.parquet
    classifications/<name>/   a group whose attributes hold the classification record

Coordinates and sizes are level-0 pixels. Every result is written under a temporary name and
renamed into place when complete; an existing result is replaced only with `overwrite=True`.
The store's zarr format decides the layout: zarr v3 -> NGFF 0.5, zarr v2 -> NGFF 0.4; a store
that does not exist yet is created as zarr v3.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from .chunks import lazy_array
from .errors import ImageIOError
from .ngff import has_multiscales, multiscale_metadata, ome_attrs, parse_image, wrap_ome
from .progress import ProgressCallback, ProgressEvent
from .pyramid import pyramid_shapes
from .result_store import (
    NAME_PATTERN,
    check_name,
    group_attrs,
    json_default,
    register,
    result_dir,
    write_group,
    zarr_format,
)
from .store import block_grid, write_blocks, write_pyramid_level

DETECTION_COLUMNS = ("y", "x", "class", "score", "size")
# colours (RGBA 0-255) of classes 0, 1, 2, ... (cycled); class 0 transparent, as background
PALETTE = ((0, 0, 0, 0), (31, 119, 180, 255), (255, 187, 0, 255), (214, 39, 40, 255),
           (44, 160, 44, 255), (148, 103, 189, 255), (140, 86, 75, 255), (227, 119, 194, 255),
           (127, 127, 127, 255), (188, 189, 34, 255), (23, 190, 207, 255))


@dataclass(frozen=True)
class LabelsResult:
    """A label pyramid read back: `levels[0]` is full resolution (Y, X) integers."""

    name: str
    levels: list[da.Array]
    colors: dict[int, tuple[int, int, int, int]]
    properties: dict[int, dict[str, Any]]
    source: dict[str, Any] | None
    pixel_size: tuple[float, float] | None
    unit: str | None
    path: str


def _root_image(root: Path):
    """(height, width, pixel_size, unit) of the store's image, or None."""
    fmt = zarr_format(root)
    if fmt is None:
        return None
    attrs = group_attrs(root, fmt)
    if not has_multiscales(attrs):
        return None
    meta = parse_image(attrs, str(root))
    arr = zarr.open_array(str(root / meta.paths[0]), mode="r")
    iy, ix = meta.axes.index("Y"), meta.axes.index("X")
    unit = meta.units.get("Y") if meta.units.get("Y") == meta.units.get("X") else None
    return arr.shape[iy], arr.shape[ix], (meta.scale[iy], meta.scale[ix]), unit


# --------------------------------------------------------------------------- labels
def write_labels(
    store: str | os.PathLike,
    name: str,
    labels: np.ndarray | da.Array,
    *,
    colors: Mapping[int, Any] | None = None,
    properties: Mapping[int, Mapping[str, Any]] | None = None,
    source_image: str = "../../",
    pixel_size: tuple[float, float] | None = None,
    unit: str | None = None,
    overwrite: bool = False,
    chunk: int = 1024,
    min_size: int = 1024,
    method: str = "mode",
    workers: int = 2,
    progress: ProgressCallback | None = None,
    match_image: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a (Y, X) integer label image as `labels/<name>` with a display pyramid.

    colors: label value -> RGBA (0-255 ints or 0-1 floats, 3 or 4 values).
    properties: label value -> mapping of JSON values (class, score, area, ...).
    The pyramid uses `mode` (or `nearest`) downsampling so no label value is invented.
    The labels must have the shape of the store image's level 0, whose pixel size is then
    the default; `match_image=False` skips that (a result store's image is a preview that
    may be downsampled: the caller passes the labels' own pixel size).
    extra: JSON values kept under the group's "napari-xt" attribute (provenance).
    Returns the label group's path.
    """
    if method not in ("mode", "nearest"):
        raise ImageIOError(f"labels are downsampled with 'mode' or 'nearest', not {method!r}")
    labels = _as_label_array(labels, chunk)
    root = Path(store)
    image = _root_image(root)
    if image is not None and match_image:
        h, w, image_px, image_unit = image
        if labels.shape != (h, w):
            raise ImageIOError(
                f"{root}: labels of shape {labels.shape} do not match the image ({h}, {w})"
            )
        pixel_size = pixel_size or image_px
        unit = unit or image_unit
    with result_dir(store, "labels", name, overwrite) as (tmp, fmt, version):
        group = zarr.open_group(str(tmp), mode="w", zarr_format=fmt)
        shapes = pyramid_shapes(*labels.shape, min_size=min_size)
        arrays = [
            group.create_array(str(i), shape=s, chunks=(min(chunk, s[0]), min(chunk, s[1])),
                               dtype=labels.dtype, fill_value=0,
                               **({"dimension_names": ("y", "x")} if fmt == 3 else {}))
            for i, s in enumerate(shapes)
        ]
        total = sum(len(block_grid(s, (chunk, chunk))) for s in shapes)
        done = 0
        for i, arr in enumerate(arrays):
            steps = (
                write_blocks(labels, arr, "YX", block=(chunk, chunk), workers=workers)
                if i == 0
                else write_pyramid_level(arrays[i - 1], arr, "YX", block=(chunk, chunk),
                                         method=method, workers=workers)
            )
            for _ in steps:
                done += 1
                if progress is not None:
                    progress(ProgressEvent(done, total, i, len(arrays), f"labels {name}"))
        py, px = pixel_size or (1.0, 1.0)
        ms = multiscale_metadata(
            "YX", [(py * 2.0**i, px * 2.0**i) for i in range(len(shapes))],
            unit=unit if pixel_size else None, name=name, version=version, method=method,
        )
        for i, ds in enumerate(ms["datasets"][1:], 1):  # a level-i pixel's centre is the
            f = 2.0**i  # centre of the f x f level-0 pixels it summarises
            ds["coordinateTransformations"].append(
                {"type": "translation", "translation": [(f - 1) / 2 * py, (f - 1) / 2 * px]})
        block = {"multiscales": [ms], "image-label": _image_label(
            colors, properties, source_image if image is not None else None, version)}
        attrs = wrap_ome(block, version)
        if extra:
            attrs["napari-xt"] = json.loads(json.dumps(dict(extra), default=json_default))
        group.attrs.update(attrs)
    register(root, "labels", name, "labels")
    return root / "labels" / name


def _as_label_array(labels: Any, chunk: int) -> da.Array:
    if isinstance(labels, np.ndarray):
        labels = da.from_array(labels, chunks=(chunk, chunk) if labels.ndim == 2 else -1,
                               name=False)
    if not isinstance(labels, da.Array):
        raise ImageIOError(f"labels must be a numpy or dask array, not {type(labels).__name__}")
    if labels.ndim != 2:
        raise ImageIOError(f"labels must be 2-D (Y, X), not shape {labels.shape}")
    if 0 in labels.shape:
        raise ImageIOError(f"labels have zero size (shape {labels.shape})")
    if labels.dtype == np.bool_:
        return labels.astype(np.uint8)
    if labels.dtype.kind not in "iu":
        raise ImageIOError(f"labels must be integers, not {labels.dtype}")
    return labels


def _image_label(colors, properties, source_image, version) -> dict[str, Any]:
    out: dict[str, Any] = {"version": version}
    if colors:
        out["colors"] = [{"label-value": int(k), "rgba": _rgba(v)} for k, v in colors.items()]
    if properties:
        out["properties"] = [
            {"label-value": int(k), **json.loads(json.dumps(dict(v), default=json_default))}
            for k, v in properties.items()
        ]
    if source_image:
        out["source"] = {"image": source_image}
    return out


def _rgba(value: Any) -> list[int]:
    v = np.asarray(value, dtype=float).ravel()
    if v.size not in (3, 4):
        raise ImageIOError(f"a label colour needs 3 or 4 values, not {value!r}")
    if v.size == 3:
        v = np.append(v, 1.0 if v.max() <= 1.0 else 255.0)
    if v.max() <= 1.0:
        v = v * 255.0
    return [int(round(c)) for c in np.clip(v, 0, 255)]


def read_labels(store: str | os.PathLike, name: str) -> LabelsResult:
    """The label result `name` of `store` as a `LabelsResult` (levels read lazily);
    raises `ImageIOError` when there is none."""
    path = Path(store) / "labels" / check_name(name)
    fmt = zarr_format(path)
    if fmt is None:
        raise ImageIOError(f"{path}: no label result {name!r} in {store}")
    attrs = group_attrs(path, fmt)
    meta = parse_image(attrs, str(path))
    block, _ = ome_attrs(attrs)
    label_meta = block.get("image-label", {})
    levels = [lazy_array(zarr.open_array(str(path / p), mode="r"), f"{path} level {i}")
              for i, p in enumerate(meta.paths)]
    colors = {int(c["label-value"]): tuple(int(x) for x in c["rgba"])
              for c in label_meta.get("colors", [])}
    props = {int(p["label-value"]): {k: v for k, v in p.items() if k != "label-value"}
             for p in label_meta.get("properties", [])}
    unit = meta.units.get("Y") if meta.units.get("Y") == meta.units.get("X") else None
    return LabelsResult(name, levels, colors, props, label_meta.get("source"),
                        (meta.scale[0], meta.scale[1]), unit, str(path))


# --------------------------------------------------------------------------- probabilities
@dataclass(frozen=True)
class ProbabilitiesResult:
    """A per-class probability image read back: `levels[0]` is (K, Y, X) full resolution."""

    name: str
    levels: list[da.Array]
    class_names: tuple[str, ...]
    pixel_size: tuple[float, float] | None
    translation: tuple[float, float]
    unit: str | None
    path: str


def read_probabilities(store: str | os.PathLike, name: str) -> ProbabilitiesResult:
    """`probabilities/<name>`: an NGFF image (c, y, x) with one channel per class."""
    path = Path(store) / "probabilities" / check_name(name)
    fmt = zarr_format(path)
    if fmt is None:
        raise ImageIOError(f"{path}: no probability result {name!r} in {store}")
    attrs = group_attrs(path, fmt)
    meta = parse_image(attrs, str(path))
    levels = [lazy_array(zarr.open_array(str(path / p), mode="r"), f"{path} level {i}")
              for i, p in enumerate(meta.paths)]
    k = int(levels[0].shape[0])
    names = meta.channel_names or tuple(f"class {i}" for i in range(k))
    iy, ix = meta.axes.index("Y"), meta.axes.index("X")
    unit = meta.units.get("Y") if meta.units.get("Y") == meta.units.get("X") else None
    return ProbabilitiesResult(name, levels, tuple(names), (meta.scale[iy], meta.scale[ix]),
                               (meta.translation[iy], meta.translation[ix]), unit, str(path))


# --------------------------------------------------------------------------- tables
def write_detections(
    store: str | os.PathLike,
    name: str,
    table: Mapping[str, Any],
    *,
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    parquet: bool = False,
) -> Path:
    """Write a per-object table (columns `y`, `x` required; `class`, `score`, `size` and any
    other 1-D columns of equal length) as `tables/<name>`. String columns are stored as codes
    plus categories. `parquet=True` also writes `table.parquet` (needs pyarrow)."""
    columns = _columns(table)
    if parquet:
        try:
            import pyarrow  # noqa: F401
        except ImportError as err:
            raise ImageIOError("parquet=True needs pyarrow (pip install pyarrow)") from err
    with result_dir(store, "tables", name, overwrite) as (tmp, fmt, version):
        group = zarr.open_group(str(tmp), mode="w", zarr_format=fmt)
        categories = {}
        for col, values in columns.items():
            if values.dtype.kind in "OUS":
                cats, codes = np.unique(values.astype(str), return_inverse=True)
                categories[col] = [str(c) for c in cats]
                values = codes.astype(np.int32)
            arr = group.create_array(col, shape=values.shape, dtype=values.dtype,
                                     chunks=(max(1, min(len(values), 1 << 20)),), fill_value=0)
            if len(values):
                arr[:] = values
        group.attrs.update({
            "napari-xt": {"kind": "detections", "columns": list(columns),
                          "categories": categories, "rows": _rows(columns),
                          "coordinates": "level-0 pixels (y, x)",
                          **json.loads(json.dumps(dict(attrs or {}), default=json_default))},
        })
        if parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            def column(values: np.ndarray):  # strings (class names) as categories
                if values.dtype.kind in "OUS":
                    return pa.array(values.astype(str)).dictionary_encode()
                return pa.array(values)

            pq.write_table(pa.table({k: column(v) for k, v in columns.items()}),
                           tmp / "table.parquet")
    register(Path(store), "tables", name, "tables")
    return Path(store) / "tables" / name


def _rows(columns: Mapping[str, np.ndarray]) -> int:
    return int(len(next(iter(columns.values()))))


def _columns(table: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if isinstance(table, np.ndarray) and table.dtype.names:
        table = {n: table[n] for n in table.dtype.names}
    if not isinstance(table, Mapping):
        raise ImageIOError(f"a detection table is a mapping of columns, not {type(table).__name__}")
    missing = [c for c in ("y", "x") if c not in table]
    if missing:
        raise ImageIOError(f"a detection table needs columns y and x (missing: {missing})")
    out: dict[str, np.ndarray] = {}
    for col, values in table.items():
        check_name(str(col))
        arr = np.asarray(values)
        if arr.ndim != 1:
            raise ImageIOError(f"detection column {col!r} must be 1-D, not shape {arr.shape}")
        if arr.dtype.kind in "cVM":
            raise ImageIOError(f"detection column {col!r} has unsupported dtype {arr.dtype}")
        out[str(col)] = arr
    lengths = {c: len(v) for c, v in out.items()}
    if len(set(lengths.values())) != 1:
        raise ImageIOError(f"detection columns differ in length: {lengths}")
    return out


def read_detections(store: str | os.PathLike, name: str) -> dict[str, np.ndarray]:
    """The table as a dict of numpy columns (string columns decoded)."""
    path = Path(store) / "tables" / check_name(name)
    fmt = zarr_format(path)
    if fmt is None:
        raise ImageIOError(f"{path}: no detection table {name!r} in {store}")
    meta = group_attrs(path, fmt).get("napari-xt", {})
    group = zarr.open_group(str(path), mode="r")
    out = {}
    for col in meta.get("columns", []):
        values = np.asarray(group[col][...])
        cats = meta.get("categories", {}).get(col)
        out[col] = np.asarray(cats, dtype=object)[values] if cats is not None else values
    return out


# --------------------------------------------------------------------------- classification
def write_classification(
    store: str | os.PathLike, name: str, record: Mapping[str, Any], *, overwrite: bool = False
) -> Path:
    """Store a JSON-compatible classification record (e.g. `{"class": "tumour",
    "scores": {...}}`) as the attributes of `classifications/<name>`."""
    if not isinstance(record, Mapping):
        raise ImageIOError(f"a classification record is a mapping, not {type(record).__name__}")
    try:
        clean = json.loads(json.dumps(dict(record), default=json_default))
    except (TypeError, ValueError) as err:
        raise ImageIOError(f"classification record is not JSON-compatible: {err}") from err
    with result_dir(store, "classifications", name, overwrite) as (tmp, fmt, _):
        write_group(tmp, fmt, {"napari-xt": {"kind": "classification", "record": clean}})
    register(Path(store), "classifications", name, "classifications")
    return Path(store) / "classifications" / name


def read_classification(store: str | os.PathLike, name: str) -> dict[str, Any]:
    """The classification record `name` of `store`; raises `ImageIOError` when
    there is none."""
    path = Path(store) / "classifications" / check_name(name)
    fmt = zarr_format(path)
    if fmt is None:
        raise ImageIOError(f"{path}: no classification {name!r} in {store}")
    record = (group_attrs(path, fmt).get("napari-xt") or {}).get("record")
    if not isinstance(record, dict):
        raise ImageIOError(f"{path}: the classification {name!r} holds no napari-xt record")
    return dict(record)


# --------------------------------------------------------------------------- listing
def list_results(store: str | os.PathLike) -> dict[str, list[str]]:
    """Names of the results in a store, by kind (`labels`, `tables`, `classifications`,
    `probabilities`). Only finished results are listed: images with their multiscale
    metadata, tables and records (written whole)."""
    root = Path(store)
    out: dict[str, list[str]] = {}
    for kind in ("labels", "tables", "classifications", "probabilities"):
        folder = root / kind
        names = []
        if folder.is_dir():
            names = sorted(p.name for p in folder.iterdir()
                           if p.is_dir() and NAME_PATTERN.match(p.name) and _finished(p, kind))
        out[kind] = names
    return out


def _finished(path: Path, kind: str) -> bool:
    fmt = zarr_format(path)
    if fmt is None:
        return False
    if kind in ("labels", "probabilities"):
        return has_multiscales(group_attrs(path, fmt))
    return True
