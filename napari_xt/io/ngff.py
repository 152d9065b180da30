"""OME-NGFF metadata (versions 0.1-0.5): parse `multiscales`/`omero`, build them for writing.

Version 0.4 keeps its keys at the top of the zarr v2 group attributes
(`.zattrs`: `multiscales`, `omero`, `image-label`); version 0.5 nests them under `ome` in the
zarr v3 `zarr.json` attributes and drops the per-multiscale `version` key. Only the metadata
lives here; reading arrays is `zarr_reader.py`'s job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .axes import axes_from_names
from .errors import ImageIOError

#: NGFF/UDUNITS-2 names for the abbreviations files commonly carry.
UNIT_NAMES = {
    "µm": "micrometer",
    "um": "micrometer",
    "μm": "micrometer",
    "micron": "micrometer",
    "nm": "nanometer",
    "mm": "millimeter",
    "cm": "centimeter",
    "m": "meter",
    "km": "kilometer",
}
_AXIS_TYPES = {"Y": "space", "X": "space", "Z": "space", "C": "channel", "T": "time"}


def unit_name(unit: str | None) -> str | None:
    """The NGFF/UDUNITS-2 name of a unit (`"um"` -> `"micrometer"`, see `UNIT_NAMES`);
    other names are returned stripped, and None or a blank unit gives None."""
    if unit is None or str(unit).strip() == "":
        return None
    return UNIT_NAMES.get(str(unit).strip(), str(unit).strip())


@dataclass(frozen=True)
class NgffImage:
    """The parts of an NGFF image group's metadata that reading needs."""

    version: str
    axes: str
    paths: tuple[str, ...]
    scale: tuple[float, ...]  # level 0 pixel size along every axis (global scale applied)
    translation: tuple[float, ...]
    units: Mapping[str, str]
    name: str | None
    channel_names: tuple[str, ...] | None
    channel_colors: tuple[str, ...] | None
    windows: tuple[tuple[float, float], ...] | None


def ome_attrs(attrs: Mapping[str, Any]) -> tuple[Mapping[str, Any], str | None]:
    """The NGFF attribute block and its version: `attrs["ome"]` (0.5) or `attrs` (<= 0.4)."""
    if isinstance(attrs.get("ome"), Mapping):
        ome = attrs["ome"]
        return ome, str(ome.get("version")) if ome.get("version") is not None else None
    ms = attrs.get("multiscales")
    version = None
    if isinstance(ms, list) and ms and isinstance(ms[0], Mapping):
        version = ms[0].get("version")
    elif isinstance(attrs.get("image-label"), Mapping):
        version = attrs["image-label"].get("version")
    return attrs, str(version) if version is not None else None


def has_multiscales(attrs: Mapping[str, Any]) -> bool:
    """Whether NGFF group attributes (any version) hold a non-empty `multiscales` list."""
    ome, _ = ome_attrs(attrs)
    return isinstance(ome.get("multiscales"), list) and len(ome["multiscales"]) > 0


def parse_image(attrs: Mapping[str, Any], where: str, index: int = 0) -> NgffImage:
    """Parse multiscale `index` of an NGFF image group's attributes."""
    ome, version = ome_attrs(attrs)
    multiscales = ome.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales:
        raise ImageIOError(f"{where}: no OME-NGFF 'multiscales' metadata")
    if not 0 <= index < len(multiscales):
        raise ImageIOError(f"{where}: multiscale {index} does not exist ({len(multiscales)})")
    ms = multiscales[index]
    version = version or str(ms.get("version", "0.4"))
    datasets = ms.get("datasets") or []
    if not datasets:
        raise ImageIOError(f"{where}: 'multiscales' lists no datasets")
    axes, units = _parse_axes(ms.get("axes"), where)
    ndim = len(axes)
    scale, translation = _dataset_transform(datasets[0], ndim, where)
    g_scale, g_trans = _transform_list(ms.get("coordinateTransformations"), ndim, where)
    scale = [s * g for s, g in zip(scale, g_scale)]
    translation = [t * g + gt for t, g, gt in zip(translation, g_scale, g_trans)]
    names, colors, windows = _parse_omero(ome.get("omero"))
    return NgffImage(
        version=version,
        axes=axes,
        paths=tuple(str(d["path"]) for d in datasets),
        scale=tuple(scale),
        translation=tuple(translation),
        units=units,
        name=ms.get("name"),
        channel_names=names,
        channel_colors=colors,
        windows=windows,
    )


def _parse_axes(raw: Any, where: str) -> tuple[str, dict[str, str]]:
    if raw is None:  # versions 0.1 / 0.2 are always 5-D
        return "TCZYX", {}
    names = [a.get("name") if isinstance(a, Mapping) else a for a in raw]
    axes = axes_from_names(names)
    if axes is None:
        raise ImageIOError(f"{where}: NGFF axes {names} are not t/c/z/y/x")
    units: dict[str, str] = {}
    for letter, a in zip(axes, raw):
        if isinstance(a, Mapping) and a.get("unit"):
            units[letter] = str(a["unit"])
    return axes, units


def _transform_list(raw: Any, ndim: int, where: str) -> tuple[list[float], list[float]]:
    scale, translation = [1.0] * ndim, [0.0] * ndim
    for t in raw or []:
        kind = t.get("type")
        if kind == "identity":
            continue
        if kind not in ("scale", "translation"):
            raise ImageIOError(f"{where}: coordinate transformation {kind!r} is not supported")
        values = t.get(kind)
        if values is None or len(values) != ndim:
            raise ImageIOError(f"{where}: {kind} {values} does not have {ndim} values")
        if kind == "scale":
            scale = [float(v) for v in values]
        else:
            translation = [float(v) for v in values]
    return scale, translation


def _dataset_transform(ds: Mapping[str, Any], ndim: int, where: str):
    return _transform_list(ds.get("coordinateTransformations"), ndim, where)


def _parse_omero(omero: Any):
    if not isinstance(omero, Mapping) or not isinstance(omero.get("channels"), list):
        return None, None, None
    channels = omero["channels"]
    if not channels:
        return None, None, None
    names = tuple(str(c.get("label", f"channel {i}")) for i, c in enumerate(channels))
    colors = tuple(str(c.get("color", "FFFFFF")) for c in channels)
    windows = []
    for c in channels:
        w = c.get("window") or {}
        if "start" not in w or "end" not in w:
            windows = None
            break
        windows.append((float(w["start"]), float(w["end"])))
    return names, colors, tuple(windows) if windows else None


# ---------------------------------------------------------------------------- writing
def axes_metadata(axes: str, unit: str | None) -> list[dict[str, Any]]:
    """The NGFF `axes` list for `axes` letters (of `YXZCT`): name and type of each
    axis, with `unit` on the Y and X axes when given."""
    out = []
    for letter in axes:
        entry: dict[str, Any] = {"name": letter.lower(), "type": _AXIS_TYPES[letter]}
        if letter in "YX" and unit:
            entry["unit"] = unit
        out.append(entry)
    return out


def multiscale_metadata(
    axes: str,
    level_scales: Sequence[Sequence[float]],
    *,
    translation: Sequence[float] | None = None,
    unit: str | None = None,
    name: str | None = None,
    version: str = "0.5",
    paths: Sequence[str] | None = None,
    method: str | None = None,
) -> dict[str, Any]:
    """One `multiscales` entry: `level_scales[i]` is level i's pixel size per axis."""
    paths = list(paths) if paths is not None else [str(i) for i in range(len(level_scales))]
    datasets = []
    for path, scale in zip(paths, level_scales):
        transforms: list[dict[str, Any]] = [
            {"type": "scale", "scale": [float(s) for s in scale]}
        ]
        if translation is not None and any(translation):
            transforms.append({"type": "translation", "translation": list(map(float, translation))})
        datasets.append({"path": path, "coordinateTransformations": transforms})
    entry: dict[str, Any] = {"axes": axes_metadata(axes, unit_name(unit)), "datasets": datasets}
    if name:
        entry["name"] = name
    if method:
        entry["type"] = method
    if version != "0.5":
        entry["version"] = version
    return entry


def omero_metadata(
    names: Sequence[str],
    colors: Sequence[str] | None = None,
    windows: Sequence[tuple[float, float]] | None = None,
    ranges: Sequence[tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """An `omero` block: per-channel label, hex colour and display window."""
    channels = []
    for i, name in enumerate(names):
        ch: dict[str, Any] = {"label": str(name), "active": True}
        ch["color"] = (colors[i] if colors else "FFFFFF").lstrip("#").upper()
        if windows:
            lo, hi = windows[i]
            rlo, rhi = ranges[i] if ranges else (lo, hi)
            ch["window"] = {"start": float(lo), "end": float(hi), "min": float(rlo),
                            "max": float(rhi)}
        channels.append(ch)
    return {"channels": channels}


def image_attrs(
    multiscale: Mapping[str, Any],
    *,
    version: str = "0.5",
    omero: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Group attributes for an image in the layout of `version` ("0.4" or "0.5")."""
    block: dict[str, Any] = {"multiscales": [dict(multiscale)]}
    if omero:
        block["omero"] = dict(omero)
    if extra:
        block.update(extra)
    if version == "0.5":
        return {"ome": {"version": "0.5", **block}}
    return block


def wrap_ome(block: Mapping[str, Any], version: str) -> dict[str, Any]:
    """Put an NGFF block where `version` expects it (under `ome` for 0.5)."""
    if version == "0.5":
        return {"ome": {"version": "0.5", **block}}
    return dict(block)
