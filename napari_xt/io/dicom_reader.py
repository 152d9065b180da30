"""DICOM whole-slide images through wsidicom (`napari-xt[dicom]`).

`open_dicom(path)` reads a folder of DICOM WSI files (one slide: its pyramid levels, label
and overview), or the folder of a `.dcm` file, as a `MultiscaleImage` (YXC uint8 RGB): one
lazy dask level per pyramid level, chunked like the DICOM tiles; the pixel size from the
level's Pixel Spacing (millimetres, given in micrometres); the label and overview images in
`associated`. Without the extra installed, one error names it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .chunks import lazy_array, window_of
from .errors import ImageIOError
from .image import MultiscaleImage

EXTRA = "pip install 'napari-xt[dicom]'"


WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def _header(path: Path) -> Any | None:
    """The DICOM header of a file (no pixel data), or None when it is not DICOM."""
    try:
        import pydicom
    except ImportError:
        return None
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - not DICOM
        return None


def is_dicom_folder(path: str | os.PathLike) -> bool:
    """A folder holding .dcm files of a whole-slide image (without pydicom, which comes with
    the dicom extra, any .dcm files: opening then names the extra)."""
    p = Path(path)
    if not p.is_dir():
        return False
    files = sorted(q for q in p.iterdir() if q.suffix.lower() == ".dcm")
    if not files:
        return False
    try:
        import pydicom  # noqa: F401
    except ImportError:
        return True
    return any(str(getattr(_header(f), "SOPClassUID", "")) == WSI_SOP_CLASS for f in files[:8])


def slide_key(path: str | os.PathLike) -> tuple[str, str]:
    """(folder, Series Instance UID) of a .dcm file: files of one slide share it."""
    p = Path(path)
    head = _header(p)
    return str(p.parent.resolve()), str(getattr(head, "SeriesInstanceUID", p.name))


def _slide_files(path: Path, where: str) -> list[str] | str:
    """The files of one slide: those sharing the given file's Series Instance UID; for a
    folder, its WSI files when they are one slide (several are refused, listed)."""
    try:
        import pydicom  # noqa: F401
    except ImportError:
        return str(path.parent if path.is_file() else path)
    folder = path.parent if path.is_file() else path
    series: dict[str, list[str]] = {}
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() != ".dcm":
            continue
        head = _header(f)
        if head is None or str(getattr(head, "SOPClassUID", "")) != WSI_SOP_CLASS:
            continue
        series.setdefault(str(getattr(head, "SeriesInstanceUID", "")), []).append(str(f))
    if path.is_file():
        head = _header(path)
        if head is None:
            raise ImageIOError(f"{where}: not a DICOM file")
        uid = str(getattr(head, "SeriesInstanceUID", ""))
        if uid not in series:
            raise ImageIOError(f"{where}: not a DICOM whole-slide image (SOP class "
                               f"{getattr(head, 'SOPClassUID', '?')})")
        return series[uid]
    if len(series) > 1:
        listed = "; ".join(f"{uid} ({len(fs)} files, e.g. {Path(fs[0]).name})"
                           for uid, fs in series.items())
        raise ImageIOError(f"{where}: holds {len(series)} slides (series {listed}); open one "
                           "of its .dcm files to choose")
    if not series:
        raise ImageIOError(f"{where}: no DICOM whole-slide image files in the folder")
    return next(iter(series.values()))


_MODES = {"RGB": (3, np.uint8), "RGBA": (3, np.uint8), "YCbCr": (3, np.uint8),
          "L": (1, np.uint8), "I;16": (1, np.uint16), "I": (1, np.uint16)}


def _path_channels(wsi: Any, path: str, where: str) -> tuple[int, np.dtype]:
    """(channels, dtype) of one optical path, from a one-pixel read of its smallest level."""
    level = int(wsi.levels[-1].level)
    mode = wsi.read_region((0, 0), level, (1, 1), path=path).mode
    if mode not in _MODES:
        raise ImageIOError(f"{where}: optical path {path!r} has pixels of mode {mode!r}, "
                           "which napari-xt does not read")
    channels, dtype = _MODES[mode]
    return channels, np.dtype(dtype)


class _Level:
    """One pyramid level as an array-like (H, W, C) for `lazy_array`: the optical paths'
    channels side by side (an RGB path gives 3, a monochrome one 1)."""

    def __init__(self, wsi: Any, level: Any, lock: threading.Lock,
                 paths: list[tuple[str, int]], dtype: np.dtype) -> None:
        self.wsi, self.level = wsi, int(level.level)
        self.paths = paths  # (optical path identifier, its channels)
        self.shape = (int(level.size.height), int(level.size.width),
                      sum(c for _, c in paths))
        self.dtype = np.dtype(dtype)
        self.ndim = 3
        self._lock = lock

    def __getitem__(self, key: Any) -> np.ndarray:
        y0, y1, x0, x1, rest = window_of(key, self.shape)
        out = np.zeros((max(0, y1 - y0), max(0, x1 - x0), self.shape[2]), self.dtype)
        if y1 <= y0 or x1 <= x0:
            return out[rest]
        start = 0
        for path, channels in self.paths:
            with self._lock:
                region = self.wsi.read_region((x0, y0), self.level, (x1 - x0, y1 - y0),
                                              path=path if len(self.paths) > 1 else None)
            pixels = np.asarray(region.convert("RGB") if channels == 3 else region)
            out[..., start:start + channels] = pixels.reshape(*out.shape[:2], channels)
            start += channels
        return out[rest]


def _channel_names(wsi: Any, paths: list[tuple[str, int]]) -> tuple[str, ...] | None:
    """Names of the channels of several optical paths (their descriptions, else their
    identifiers; R, G, B for an RGB path); None for one RGB path."""
    if len(paths) == 1:
        return None
    described = {}
    for instance in getattr(wsi.levels[0], "instances", {}).values():
        try:
            for item in instance.datasets[0].OpticalPathSequence:
                text = str(getattr(item, "OpticalPathDescription", "") or "")
                if text:
                    described[str(item.OpticalPathIdentifier)] = text
        except (AttributeError, IndexError, TypeError):
            continue
    names = []
    for path, channels in paths:
        name = described.get(path, f"optical path {path}")
        names += [f"{name} {c}" for c in "RGB"] if channels == 3 else [name]
    return tuple(names)


def open_dicom(path: str | os.PathLike, *, where: str | None = None) -> MultiscaleImage:
    """The DICOM WSI at `path` (a folder, or a .dcm file in it)."""
    where = where or str(path)
    try:
        from wsidicom import WsiDicom
    except ImportError as err:
        raise ImageIOError(f"{where}: reading DICOM whole-slide images needs wsidicom "
                           f"({EXTRA}): {err}") from err
    files = _slide_files(Path(path), where)
    folder = Path(path).parent if Path(path).is_file() else Path(path)
    try:
        wsi = WsiDicom.open(files)
    except Exception as err:  # WsiDicomNotFoundError, pydicom errors, ...
        raise ImageIOError(f"{where}: not a readable DICOM whole-slide image: "
                           f"{type(err).__name__}: {err}") from err
    lock = threading.Lock()
    ids = sorted((str(p) for p in (wsi.levels[0].optical_paths or ["0"])),
                 key=lambda p: (not p.isdigit(), int(p) if p.isdigit() else 0, p))
    paths, dtypes = [], []
    for path in ids:  # optical paths as channels (one RGB path: the usual brightfield slide)
        channels, dtype = _path_channels(wsi, path, where) if len(ids) > 1 else (3, np.uint8)
        paths.append((path, channels))
        dtypes.append(dtype)
    dtype = np.result_type(*dtypes)
    levels = []
    for level in wsi.levels:
        arr = _Level(wsi, level, lock, paths, dtype)
        tile = level.tile_size
        chunks = (min(int(tile.height), arr.shape[0]), min(int(tile.width), arr.shape[1]),
                  arr.shape[2])
        levels.append(lazy_array(arr, f"{where} level {arr.level}", chunks))
    spacing = wsi.levels[0].pixel_spacing  # millimetres
    pixel_size = None
    if spacing is not None:
        pixel_size = (float(spacing.height) * 1000.0, float(spacing.width) * 1000.0)
    associated = {}
    for name, read in (("label", wsi.read_label), ("overview", wsi.read_overview)):
        try:
            associated[name] = np.asarray(read().convert("RGB"))
        except Exception:  # noqa: BLE001 - a slide without one
            continue
    return MultiscaleImage(levels, "YXC", dtype, channel_names=_channel_names(wsi, paths),
                           pixel_size=pixel_size,
                           unit="micrometer" if pixel_size else None,
                           source=f"DICOM WSI ({where})", paths=(os.path.abspath(folder),),
                           resources=(wsi,), associated=associated)
