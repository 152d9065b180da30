"""Reading TIFF family files (OME-TIFF, SVS, NDPI, pyramidal and plain tiled TIFF).

tifffile parses the file layout (series, pyramid levels from SubIFDs or reduced pages) and
exposes each level as a zarr array over its tiles; those become dask arrays chunked by tile,
so nothing is decoded until a region is read. Physical pixel size comes from, in order:
OME-XML `PhysicalSizeX/Y`, the Aperio `MPP` field, GeoTIFF `ModelPixelScale`, ImageJ units,
and the resolution tags when they are in centimetres or dense inches.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr

from .axes import select_plane
from .chunks import lazy_array
from .errors import ImageIOError
from .image import MultiscaleImage
from .ngff import unit_name

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".btf", ".tf8", ".scn", ".bif", ".qptiff")
_LENGTH_TO_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "centimeter": 1e4,
                 "meter": 1e6}


def is_tiff_path(path: str | os.PathLike) -> bool:
    """Whether `path` has a TIFF family suffix (`TIFF_SUFFIXES`, any case)."""
    name = str(path).lower()
    return name.endswith(TIFF_SUFFIXES)


def open_tiff(
    path: str | os.PathLike,
    *,
    series: int | None = 0,
    plane: Mapping[str, int] | None = None,
    axes: str | None = None,
    where: str | None = None,
) -> MultiscaleImage:
    """Open series `series` of a TIFF file as a lazily read `MultiscaleImage`.

    `series=None` picks the file's one image series (several are refused); `plane` chooses the
    T/Z planes of a series that has them; `axes` replaces the axes tifffile reports; `where`
    names the file in messages. The image keeps the file open until its `close()`. Raises
    `ImageIOError` for a missing or unreadable file, or a series that does not exist."""
    where = where or str(path)
    if not Path(path).is_file():
        raise ImageIOError(f"{where}: no such file")
    try:
        tif = tifffile.TiffFile(path)
    except Exception as err:
        raise ImageIOError(f"{where}: not a readable TIFF: {type(err).__name__}: {err}") from err
    try:
        return _open_series(tif, series=series, plane=plane, axes=axes, where=where)
    except BaseException:
        tif.close()
        raise


def _open_series(tif: tifffile.TiffFile, *, series, plane, axes, where) -> MultiscaleImage:
    all_series = tif.series
    if not all_series:
        raise ImageIOError(f"{where}: TIFF holds no image series")
    if series is None:
        series = only_image_series(all_series, where)
    if not 0 <= series < len(all_series):
        names = [s.name or f"#{i}" for i, s in enumerate(all_series)]
        raise ImageIOError(f"{where}: series {series} does not exist; series are {names}")
    s = all_series[series]
    native = []
    for i in range(len(s.levels)):
        try:
            z = zarr.open(s.aszarr(level=i), mode="r")
        except Exception as err:
            raise ImageIOError(
                f"{where}: cannot map level {i} of series {series}: {type(err).__name__}: {err}"
            ) from err
        native.append(lazy_array(z, f"{where} series {series} level {i}"))
    levels, out_axes = select_plane(native, axes or s.axes, plane, where)
    pixel_size, unit = _pixel_size(tif, series)
    names = _ome_channel_names(tif, series)
    n = levels[0].shape[out_axes.index("C")] if "C" in out_axes else 1
    kind = _kind(tif)
    return MultiscaleImage(
        associated=_associated(tif, series),
        levels=levels,
        axes=out_axes,
        dtype=levels[0].dtype,
        channel_names=names if names and len(names) == n else None,
        pixel_size=pixel_size,
        unit=unit,
        contrast_limits=_imagej_window(tif, out_axes),
        source=f"{kind} series {series} '{s.name}' ({where})",
        resources=(tif,),
    )


ASSOCIATED = frozenset({"thumbnail", "label", "macro", "map", "overview"})
ASSOCIATED_MAX = 16 * 2**20  # bytes: larger "associated" series are not small pictures


def is_associated(s: Any) -> bool:
    """A series that is a slide's label, macro or thumbnail picture: so named and small (a
    big series under such a name is image data)."""
    return str(s.name).lower() in ASSOCIATED and int(np.prod(s.shape)) <= ASSOCIATED_MAX


def _associated(tif: tifffile.TiffFile, series: int) -> dict[str, np.ndarray]:
    """A slide's label, macro and thumbnail images (`is_associated`, 2-D RGB or grey 8-bit)
    as RGB uint8 arrays, by lower-case name; an unreadable one is left out."""
    out: dict[str, np.ndarray] = {}
    for i, s in enumerate(tif.series):
        name = str(s.name).lower()
        if i == series or not is_associated(s) or s.dtype != np.uint8:
            continue
        if s.axes not in ("YXS", "YX"):
            continue
        try:
            arr = np.asarray(s.asarray())
        except Exception:  # noqa: BLE001 - a damaged thumbnail never stops the slide
            continue
        out[name] = np.repeat(arr[..., None], 3, -1) if arr.ndim == 2 else arr[..., :3]
    return out


def image_series(path: str | os.PathLike) -> list[int]:
    """Indices of a TIFF file's image series (not a slide's label, macro or thumbnail);
    [] when the file cannot be read as TIFF."""
    try:
        with tifffile.TiffFile(path) as tif:
            return [i for i, s in enumerate(tif.series) if not is_associated(s)]
    except Exception:  # noqa: BLE001 - not a TIFF: the caller's reader says why
        return []


def only_image_series(all_series, where: str) -> int:
    """The index of the file's one image series. A slide's label, macro and thumbnail
    images (SVS, NDPI) are not image series, nor are a pyramid's levels (tifffile keeps them
    inside their series); two or more image series are ambiguous: refused, listing them."""
    images = [i for i, s in enumerate(all_series) if not is_associated(s)]
    if len(images) == 1:
        return images[0]
    if not images:
        return 0
    listed = ", ".join(f"{i}: {tuple(all_series[i].shape)} {all_series[i].axes} "
                       f"{all_series[i].dtype}" + (f" '{all_series[i].name}'"
                                                  if all_series[i].name else "")
                       for i in images)
    raise ImageIOError(f"{where}: the TIFF holds {len(images)} image series ({listed}) and "
                       "none was chosen", remedy="series")


def _kind(tif: tifffile.TiffFile) -> str:
    for flag, name in (("is_ome", "OME-TIFF"), ("is_svs", "SVS"), ("is_ndpi", "NDPI"),
                       ("is_imagej", "ImageJ TIFF"), ("is_geotiff", "GeoTIFF")):
        if getattr(tif, flag, False):
            return name
    return "TIFF"


def _ome_pixels(tif: tifffile.TiffFile, series: int):
    if not tif.is_ome or not tif.ome_metadata:
        return None
    try:
        root = ET.fromstring(tif.ome_metadata)
    except ET.ParseError:
        return None
    images = [el for el in root if el.tag.endswith("}Image") or el.tag == "Image"]
    if series >= len(images):
        return None
    for el in images[series]:
        if el.tag.endswith("Pixels"):
            return el
    return None


def _ome_channel_names(tif: tifffile.TiffFile, series: int) -> tuple[str, ...] | None:
    pixels = _ome_pixels(tif, series)
    if pixels is None:
        return None
    chans = [el for el in pixels if el.tag.endswith("Channel")]
    names = tuple(el.get("Name") or "" for el in chans)
    return names if names and all(names) else None


def _pixel_size(tif: tifffile.TiffFile, series: int) -> tuple[tuple | None, str | None]:
    pixels = _ome_pixels(tif, series)
    if pixels is not None and pixels.get("PhysicalSizeX") and pixels.get("PhysicalSizeY"):
        ux = unit_name(pixels.get("PhysicalSizeXUnit", "µm"))
        uy = unit_name(pixels.get("PhysicalSizeYUnit", "µm"))
        sx, sy = float(pixels.get("PhysicalSizeX")), float(pixels.get("PhysicalSizeY"))
        if ux == uy:
            return (sy, sx), ux
        if ux in _LENGTH_TO_UM and uy in _LENGTH_TO_UM:
            return (sy * _LENGTH_TO_UM[uy], sx * _LENGTH_TO_UM[ux]), "micrometer"
    page = tif.pages.first
    if tif.is_svs:
        mpp = svs_fields(page.description).get("MPP")
        if mpp:
            return (float(mpp), float(mpp)), "micrometer"
    geo = _geotiff_scale(page)
    if geo is not None:
        return geo
    if tif.is_imagej:
        ij = tif.imagej_metadata or {}
        res = _resolution(page)
        if res is not None and ij.get("unit"):
            return res, unit_name(str(ij["unit"]).replace("\\u00B5", "µ"))
    res = _resolution(page)
    unit_tag = page.tags.get("ResolutionUnit")
    unit_value = int(unit_tag.value) if unit_tag is not None else 2
    if res is not None and unit_value == 3:  # centimetre
        return (res[0] * 1e4, res[1] * 1e4), "micrometer"
    if res is not None and unit_value == 2 and res[0] < 1 / 1000:  # > 1000 dpi: a scanner
        return (res[0] * 25400, res[1] * 25400), "micrometer"
    return None, None


def _resolution(page) -> tuple[float, float] | None:
    """(y, x) size of a pixel in resolution units, from the X/YResolution tags."""
    xr, yr = page.tags.get("XResolution"), page.tags.get("YResolution")
    if xr is None or yr is None:
        return None
    xnum, xden = xr.value
    ynum, yden = yr.value
    if not (xnum and ynum and xden and yden):
        return None
    return yden / ynum, xden / xnum


def _geotiff_scale(page) -> tuple[tuple[float, float], str | None] | None:
    tag = page.tags.get("ModelPixelScaleTag")
    if tag is None:
        return None
    sx, sy = float(tag.value[0]), float(tag.value[1])
    unit = None
    keys = page.tags.get("GeoKeyDirectoryTag")
    if keys is not None:
        v = list(keys.value)
        for i in range(4, len(v) - 3, 4):
            if v[i] == 3076 and v[i + 1] == 0 and v[i + 3] == 9001:  # ProjLinearUnits = metre
                unit = "meter"
    return (sy, sx), unit


def _imagej_window(tif: tifffile.TiffFile, axes: str):
    if not tif.is_imagej or "C" in axes:
        return None
    ij = tif.imagej_metadata or {}
    if "min" in ij and "max" in ij and float(ij["max"]) > float(ij["min"]):
        return ((float(ij["min"]), float(ij["max"])),)
    return None


def svs_fields(description: str) -> dict[str, Any]:
    """`key = value` fields of an Aperio ImageDescription (`Header|AppMag = 20|MPP = 0.5`)."""
    out: dict[str, Any] = {}
    if not description or not description.startswith("Aperio"):
        return out
    for part in description.split("|")[1:]:
        if "=" not in part:
            continue
        key, value = (p.strip() for p in part.split("=", 1))
        try:
            out[key] = float(value) if "." in value else int(value)
        except ValueError:
            out[key] = value
    return out
