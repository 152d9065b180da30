"""Annotators' corrections of a result, kept beside the prediction in the same store.

    labels/<name>-corrected/  starts as an exact copy of `labels/<name>` (same pyramid,
                              colours, class properties) and is edited window by window;
                              its attributes list every saved edit (`napari-xt.corrections`)
    tables/<name>-corrected/  the detection table as the annotator left it (the whole table
                              is written again on every save)

The prediction (`labels/<name>`, `tables/<name>`) is never modified, so a correction can
always be compared with, or reset to, what the model said. A saved window updates level 0
and the matching part of every pyramid level (same downsampling as the prediction's
pyramid), and is recorded as an `Edit` (box, time, changed pixels, class counts before and
after) after its pixels are written. Boxes are `Box` (y0, x0, y1, x1) level-0 pixels; the
edit log in the store keeps its own (y0, y1, x0, x1) order (`_box_record`, `_record_box`).

This module never imports Qt or napari.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .box import Box
from .errors import ImageIOError
from .ngff import ome_attrs, parse_image
from .pyramid import downsample_block
from .result_store import (
    check_name,
    group_attrs,
    register,
    store_lock,
    write_group,
    zarr_format,
)
from .results import LabelsResult, read_detections, read_labels, write_detections
from .store import atomic_directory

SUFFIX = "-corrected"
KEY = "corrections"
MAX_WINDOW = 8192  # pixels a side: one window is held in memory (and in a napari layer)


@dataclass(frozen=True)
class Edit:
    """One saved window of a correction: `box` in level-0 pixels."""

    box: Box
    time: str
    changed: int  # pixels whose label differs from what the correction held before
    before: dict[int, int]  # label value -> pixel count in the window before the save
    after: dict[int, int]


def corrected_name(name: str) -> str:
    """The name of the correction of result `name` (`<name>-corrected`); raises
    `ImageIOError` when `name` is not a valid result name."""
    return f"{check_name(name)}{SUFFIX}"


def is_correction(name: str) -> bool:
    """Whether result name `name` is a correction (ends with `-corrected`)."""
    return name.endswith(SUFFIX)


def predicted(names: list[str]) -> list[str]:
    """The result names that are not corrections."""
    return [n for n in names if not is_correction(n)]


def corrections_in(store: str | os.PathLike) -> list[str]:
    """Store-relative paths of every correction in a store (labels and tables)."""
    root = Path(store)
    found = []
    for kind in ("labels", "tables"):
        folder = root / kind
        if folder.is_dir():
            found += [f"{kind}/{p.name}" for p in sorted(folder.iterdir())
                      if p.is_dir() and is_correction(p.name) and zarr_format(p)]
    return found


def _labels_dir(store: str | os.PathLike, name: str) -> Path:
    return Path(store) / "labels" / check_name(name)


def has_correction(store: str | os.PathLike, name: str) -> bool:
    """Whether the label result `name` in `store` has a correction saved."""
    return zarr_format(_labels_dir(store, corrected_name(name))) is not None


def open_correction(store: str | os.PathLike, name: str) -> LabelsResult:
    """The correction of label result `name`, created as a copy of it when missing."""
    with store_lock(store):
        return _open_correction(store, name)


def _open_correction(store: str | os.PathLike, name: str) -> LabelsResult:
    root = Path(store)
    src = _labels_dir(root, name)
    fmt = zarr_format(src)
    if fmt is None:
        raise ImageIOError(f"{src}: no label result {name!r} to correct in {store}")
    target = corrected_name(name)
    dst = _labels_dir(root, target)
    if zarr_format(dst) is None:
        if not os.access(root / "labels", os.W_OK):
            raise ImageIOError(f"{root / 'labels'}: not writable; corrections are saved in "
                               "the result store, so copy the store somewhere writable")
        with atomic_directory(dst, overwrite=False, what=f"correction {target!r}") as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            attrs = group_attrs(tmp, fmt)
            block, _ = ome_attrs(attrs)  # a view into attrs: edited in place
            for ms in block.get("multiscales", []):
                ms["name"] = target
            attrs.setdefault("napari-xt", {})[KEY] = {"source": f"labels/{name}",
                                                      "created": _now(), "edits": []}
            write_group(tmp, fmt, attrs)
        register(root, "labels", target, "labels")
    return read_labels(root, target)


def read_window(store: str | os.PathLike, name: str, box: Box | Sequence[int],
                *, corrected: bool = True) -> np.ndarray:
    """Level-0 labels of `box` (y0, x0, y1, x1): from the correction when there is one
    (and `corrected`), else from the prediction."""
    use = corrected_name(name) if corrected and has_correction(store, name) else name
    levels = read_labels(store, use).levels
    return np.asarray(levels[0][check_box(box, levels[0].shape).slices])


def check_box(box: Box | Sequence[int], shape) -> Box:
    """`box` (y0, x0, y1, x1) as a Box, refused when empty, outside a (h, w, ...) `shape`
    or larger than `MAX_WINDOW`."""
    box = Box.of(box)
    y0, x0, y1, x1 = box
    h, w = int(shape[0]), int(shape[1])
    if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise ImageIOError(f"window (rows {y0}:{y1}, columns {x0}:{x1}) is empty or outside "
                           f"the {h} x {w} label image")
    if max(y1 - y0, x1 - x0) > MAX_WINDOW:
        raise ImageIOError(f"window {y1 - y0} x {x1 - x0} is larger than {MAX_WINDOW} pixels "
                           "a side; correct it in smaller windows")
    return box


def save_window(store: str | os.PathLike, name: str, box: Box | Sequence[int],
                data: np.ndarray) -> Edit:
    """Write `data` (the labels of `box`, (y0, x0, y1, x1)) into the correction of `name`
    and its pyramid.

    Labels that are not classes of the result (when its metadata lists them) are refused
    before anything is written. The store is locked meanwhile (never beside a run)."""
    with store_lock(store):
        return _save_window(store, name, box, data)


def _save_window(store: str | os.PathLike, name: str, box: Box | Sequence[int],
                 data: np.ndarray) -> Edit:
    result = open_correction(store, name)
    box = check_box(box, result.levels[0].shape)
    data = np.asarray(data)
    if data.shape != box.shape:
        raise ImageIOError(f"corrected window has shape {data.shape}, the window (rows "
                           f"{box.y0}:{box.y1}, columns {box.x0}:{box.x1}) is {box.shape}")
    if data.dtype.kind not in "iub":
        raise ImageIOError(f"corrected labels must be integers, not {data.dtype}")
    values = np.unique(data)
    allowed = set(result.properties) or set(result.colors)
    if allowed and not set(int(v) for v in values) <= allowed:
        bad = sorted(int(v) for v in values if int(v) not in allowed)
        raise ImageIOError(f"label(s) {bad} are not classes of {name!r} (classes: "
                           f"{sorted(allowed)}); nothing was saved")
    path = Path(result.path)
    arrays = [zarr.open_array(str(path / p), mode="r+")
              for p in parse_image(group_attrs(path, zarr_format(path)), str(path)).paths]
    info = np.iinfo(arrays[0].dtype)
    if values.size and (int(values.min()) < info.min or int(values.max()) > info.max):
        raise ImageIOError(f"labels {int(values.min())}..{int(values.max())} do not fit the "
                           f"result's {arrays[0].dtype}; nothing was saved")
    old = np.asarray(arrays[0][box.slices])
    new = data.astype(arrays[0].dtype, copy=False)
    arrays[0][box.slices] = new
    _update_pyramid(arrays, box, _method(path))
    edit = Edit(box, _now(), int(np.count_nonzero(old != new)), _counts(old), _counts(new))
    fmt = zarr_format(path)
    attrs = group_attrs(path, fmt)
    attrs.setdefault("napari-xt", {}).setdefault(KEY, {"source": f"labels/{name}", "edits": []})
    attrs["napari-xt"][KEY]["edits"].append({**asdict(edit), "box": _box_record(box)})
    write_group(path, fmt, attrs)
    return edit


def edits(store: str | os.PathLike, name: str) -> list[Edit]:
    """Every saved edit of the correction of `name`, oldest first (empty when none)."""
    path = _labels_dir(store, corrected_name(name))
    fmt = zarr_format(path)
    if fmt is None:
        return []
    out = []
    for e in group_attrs(path, fmt).get("napari-xt", {}).get(KEY, {}).get("edits", []):
        out.append(Edit(_record_box(e["box"]), e["time"], int(e["changed"]),
                        {int(k): int(v) for k, v in e["before"].items()},
                        {int(k): int(v) for k, v in e["after"].items()}))
    return out


def save_detections(store: str | os.PathLike, name: str, table: Mapping[str, Any]) -> Path:
    """Write the corrected detection table of `name` (replacing the previous correction;
    the prediction's table is untouched)."""
    if zarr_format(Path(store) / "tables" / check_name(name)) is None:
        raise ImageIOError(f"{store}: no detection table {name!r} to correct")
    rows = len(np.asarray(table["y"])) if "y" in table else 0
    return write_detections(store, corrected_name(name), table, overwrite=True,
                            attrs={"source": f"tables/{name}", "corrected": _now(),
                                   "corrected_rows": rows})


def read_corrected_detections(store: str | os.PathLike, name: str) -> dict[str, np.ndarray]:
    """The corrected table when there is one, else the prediction's."""
    target = corrected_name(name)
    use = target if zarr_format(Path(store) / "tables" / target) else name
    return read_detections(store, use)


def run_provenance(store: str | os.PathLike) -> dict[str, Any]:
    """The engine's provenance of the run that wrote `store` (level, level_scale, image
    identity, settings, ...); empty for a store without one."""
    root = Path(store)
    fmt = zarr_format(root)
    return dict(group_attrs(root, fmt).get("napari-xt", {})) if fmt else {}


def table_scale(store: str | os.PathLike) -> tuple[float, float]:
    """Detection-table pixels per label pixel: a run on pyramid level L writes its labels at
    that level and its table in level-0 pixels (`level_scale` in the run's provenance)."""
    fy, fx = run_provenance(store).get("level_scale", (1.0, 1.0))
    return float(fy), float(fx)


# The edit log in the store (`napari-xt.corrections.edits[].box`) keeps the order it was
# first written in, (y0, y1, x0, x1), so that existing stores read the same; these two convert
# at that boundary, nothing else sees that order.
def _box_record(box: Box) -> list[int]:
    """The log's [y0, y1, x0, x1] of a Box."""
    return [box.y0, box.y1, box.x0, box.x1]


def _record_box(record: Sequence[int]) -> Box:
    """The Box of the log's [y0, y1, x0, x1]."""
    y0, y1, x0, x1 = (int(v) for v in record)
    return Box(y0, x0, y1, x1)


def _update_pyramid(arrays: list, box: Box, method: str) -> None:
    """Recompute every coarser level over the part that `box` (level 0) touches."""
    y0, x0, y1, x1 = box
    for above, target in zip(arrays[:-1], arrays[1:]):
        h, w = target.shape
        y0, x0 = y0 // 2, x0 // 2
        y1, x1 = min(h, -(-y1 // 2)), min(w, -(-x1 // 2))
        if y0 >= y1 or x0 >= x1:
            return
        src = np.asarray(above[2 * y0:2 * y1, 2 * x0:2 * x1])
        target[y0:y1, x0:x1] = downsample_block(src, 0, 1, 2, method)


def _method(path: Path) -> str:
    block, _ = ome_attrs(group_attrs(path, zarr_format(path)))
    ms = (block.get("multiscales") or [{}])[0]
    method = ms.get("type") or ms.get("metadata", {}).get("method") or "mode"
    return "nearest" if "nearest" in str(method) else "mode"


def _counts(a: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(a, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
