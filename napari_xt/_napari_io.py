"""napari glue for the io package: reader, writers and sample data (see napari.yaml).

Images become multiscale Image layers: scale from the physical pixel size, `rgb=True` for
8-bit RGB (including OME-Zarr stores whose three 8-bit channels are red/green/blue),
`channel_axis` for other multi-channel images, contrast limits from the file's windows or
from the smallest pyramid level (never from level 0). Results stored beside an OME-Zarr
image (`labels/<name>`, `tables/<name>`) open as Labels and Points layers.

napari itself is imported lazily (only for colormaps), so importing this module is cheap.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io import (
    ImageIOError,
    MultiscaleImage,
    contrast_limits,
    list_results,
    open_image,
    read_detections,
    read_labels,
    write_detections,
    write_labels,
)
from .io.zarr_reader import looks_like_zarr
from .sample_data import sar_scene, slide_scene

LayerData = tuple[Any, dict[str, Any], str]
SUFFIXES = (".zarr", ".tif", ".tiff", ".svs", ".ndpi", ".npy")
_NAMED_COLORS = {"FF0000": "red", "00FF00": "green", "0000FF": "blue", "FFFFFF": "gray",
                 "FF00FF": "magenta", "FFFF00": "yellow", "00FFFF": "cyan"}


# ------------------------------------------------------------------------------ reader
def get_reader(path: str | Sequence[str]) -> Callable[[Any], list[LayerData]] | None:
    """The reader function when every path is something napari-xt opens, else None."""
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not paths or not all(_supported(p) for p in paths):
        return None
    return read_paths


def _supported(path: Any) -> bool:
    if not isinstance(path, str | os.PathLike):
        return False
    text = str(path).rstrip("/\\").lower()
    return text.endswith(SUFFIXES) or looks_like_zarr(path)


def read_paths(path: str | Sequence[str]) -> list[LayerData]:
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        name = _stem(p)
        if looks_like_zarr(p) and _has_results(p):
            layers.extend(store_layers(p, name))
            continue
        image = open_image(p)
        layers.extend(image_layers(image, name))
    return layers


def _has_results(path: Any) -> bool:
    """A zarr store holding results (labels, tables, probabilities) or a napari-xt run."""
    attrs = _store_attrs(path)
    if "run_signature" in attrs:
        return True
    found = list_results(path)
    return any(found[k] for k in ("labels", "tables", "probabilities"))


def _store_attrs(path: Any) -> dict[str, Any]:
    """The "napari-xt" attributes of a store's root group ({} when none)."""
    from .io.result_store import group_attrs, zarr_format

    fmt = zarr_format(Path(path))
    try:
        value = group_attrs(Path(path), fmt).get("napari-xt", {}) if fmt else {}
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def store_layers(path: Any, name: str) -> list[LayerData]:
    """Layers of a store of results: its own image (for a napari-xt result store, the
    preview of the input), then every label image (Labels, with class names and colours),
    probability image (one Image per class) and detection table (Points with their
    features), all placed in the same world coordinates."""
    attrs = _store_attrs(path)
    layers: list[LayerData] = []
    image = None
    try:
        image = open_image(path)
    except ImageIOError:
        pass  # results without an image (e.g. saved from napari's Labels/Points writers)
    if image is not None:
        suffix = " (input preview)" if "run_signature" in attrs else ""
        layers.extend(image_layers(image, f"{name}{suffix}"))
    layers.extend(result_layers(path, image, attrs))
    return layers
def _stem(path: Any) -> str:
    name = Path(str(path).rstrip("/\\")).name
    for suffix in (".ome.zarr", ".ome.tiff", ".ome.tif", ".zarr", ".tiff", ".tif", ".svs",
                   ".ndpi", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def image_layers(image: MultiscaleImage, name: str, *, units: bool = True) -> list[LayerData]:
    """Image layer data for a `MultiscaleImage` (one layer; napari splits `channel_axis`).

    `units=False` leaves the physical unit out (the scale stays): napari converts layers with
    different units to one, and a metre-scale scene beside a micrometre slide then spans more
    slider steps than Qt can count.
    """
    kwargs: dict[str, Any] = {"name": name, "metadata": {"source": image.source}}
    scale = image.pixel_size or (1.0, 1.0)
    kwargs["scale"] = tuple(float(s) for s in scale)
    if image.translation is not None and any(image.translation):
        kwargs["translate"] = tuple(float(t) for t in image.translation)
    if units and image.unit and image.pixel_size:
        kwargs["units"] = (image.unit, image.unit)
    if image.is_rgb or _rgb_channels(image):
        levels = [image.to_yxc(i) for i in range(image.num_levels)]
        kwargs.update(rgb=True, contrast_limits=(0, 255))
    else:
        levels = list(image.levels)
        limits = contrast_limits(image)
        if image.channel_axis is not None and image.num_channels > 1:
            kwargs["channel_axis"] = image.channel_axis
            n = image.num_channels
            names = image.channel_names or tuple(f"{name} c{i}" for i in range(n))
            kwargs["name"] = [f"{name} {c}" if image.channel_names else c for c in names]
            kwargs["contrast_limits"] = [list(lim) for lim in _per_channel(limits, n)]
            if image.channel_colors:
                kwargs["colormap"] = [_colormap(c) for c in image.channel_colors]
            kwargs["blending"] = "additive"
            kwargs["metadata"] = [dict(kwargs["metadata"]) for _ in range(n)]
        else:
            kwargs["contrast_limits"] = list(limits[0])
    multiscale = len(levels) > 1
    kwargs["multiscale"] = multiscale
    return [(levels if multiscale else levels[0], kwargs, "image")]


def _rgb_channels(image: MultiscaleImage) -> bool:
    """A CYX 8-bit image whose 3 or 4 channels are coloured red, green, blue (alpha)."""
    return (
        image.axes == "CYX"
        and image.dtype == np.uint8
        and image.channel_colors is not None
        and tuple(c.upper() for c in image.channel_colors[:3]) == ("FF0000", "00FF00", "0000FF")
        and image.num_channels in (3, 4)
    )


def _per_channel(limits, n):
    return list(limits) if len(limits) == n else [limits[0]] * n


def _colormap(hex_color: str):
    key = hex_color.lstrip("#").upper()[:6]
    if key in _NAMED_COLORS:
        return _NAMED_COLORS[key]
    from napari.utils.colormaps import Colormap

    rgb = [int(key[i : i + 2], 16) / 255.0 for i in (0, 2, 4)]
    return Colormap([[0.0, 0.0, 0.0, 1.0], [*rgb, 1.0]], name=f"#{key}")


def result_layers(store: Any, image: MultiscaleImage | None,
                  attrs: dict[str, Any] | None = None) -> list[LayerData]:
    """Labels, probability images and Points layers for the results in a store.

    World coordinates: label and probability images carry their own pixel size; detection
    tables are in level-0 pixels of the input, placed with the labels' pixel size divided
    by the run's `level_scale` (napari-xt stores record it) or the image's pixel size."""
    from .io import read_probabilities

    attrs = attrs or {}
    results = list_results(store)
    base = tuple(float(s) for s in (image.pixel_size or (1.0, 1.0))) if image else (1.0, 1.0)
    layers: list[LayerData] = []
    label_px = None
    for name in results["labels"]:
        labels = read_labels(store, name)
        label_px = label_px or labels.pixel_size
        props = labels.properties
        kwargs: dict[str, Any] = {"name": name, "scale": labels.pixel_size or base,
                                  "multiscale": len(labels.levels) > 1,
                                  "metadata": {"source": labels.path, "properties": props}}
        if props:
            values = sorted(props)
            kwargs["features"] = {"index": values, **{
                key: [props[v].get(key) for v in values]
                for key in sorted({k for p in props.values() for k in p})}}
        data = labels.levels if len(labels.levels) > 1 else labels.levels[0]
        if labels.colors:
            from napari.utils.colormaps import DirectLabelColormap

            colors = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
            colors.update({k: tuple(c / 255.0 for c in v) for k, v in labels.colors.items()})
            kwargs["colormap"] = DirectLabelColormap(color_dict=colors)
        layers.append((data, kwargs, "labels"))
    for name in results.get("probabilities", []):
        probs = read_probabilities(store, name)
        label_px = label_px or probs.pixel_size
        levels = probs.levels
        kwargs = {"name": [f"{name} p({c})" for c in probs.class_names], "channel_axis": 0,
                  "scale": probs.pixel_size or base, "multiscale": len(levels) > 1,
                  "contrast_limits": [[0.0, 1.0]] * len(probs.class_names),
                  "blending": "additive", "visible": False,
                  "metadata": [{"source": probs.path} for _ in probs.class_names]}
        layers.append((levels if len(levels) > 1 else levels[0], kwargs, "image"))
    level_scale = attrs.get("level_scale")
    if label_px is not None and level_scale:
        point_scale = (label_px[0] / float(level_scale[0]), label_px[1] / float(level_scale[1]))
    else:
        point_scale = base
    for name in results["tables"]:
        table = read_detections(store, name)
        coords = np.stack([table["y"], table["x"]], axis=1).astype(float)
        features = {k: v for k, v in table.items() if k not in ("y", "x")}
        layer_name = f"{name} detections" if name in results["labels"] else name
        kwargs = {"name": layer_name, "scale": point_scale, "features": features,
                  "metadata": {"source": f"{store}/tables/{name}"}}
        if "class" in features and len(coords):
            from .io.results import PALETTE

            values = np.asarray(features["class"])
            codes = (values.astype(np.int64) if values.dtype.kind in "iu"
                     else np.unique(values.astype(str), return_inverse=True)[1])
            rgba = np.array([PALETTE[1 + int(k) % (len(PALETTE) - 1)] for k in codes],
                            float) / 255.0
            kwargs["face_color"] = rgba
        layers.append((coords, kwargs, "points"))
    return layers


# ------------------------------------------------------------------------------ writers
def write_labels_layer(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """napari writer: a Labels layer -> `labels/<layer name>` in the OME-Zarr store `path`."""
    if isinstance(data, list):  # multiscale labels: level 0 holds everything
        data = data[0]
    scale = tuple(meta.get("scale", (1.0, 1.0)))[-2:]
    has_scale = any(float(s) != 1.0 for s in scale)
    props = _label_properties(meta.get("features"))
    out = write_labels(
        path, _safe_name(meta.get("name", "labels")), _as_dask(data),
        properties=props or None,
        pixel_size=tuple(float(s) for s in scale) if has_scale else None,
    )
    return [str(out)]


def write_points_layer(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """napari writer: a Points layer -> `tables/<layer name>` (y, x + features columns)."""
    pts = np.asarray(data, dtype=float)
    if pts.ndim != 2 or pts.shape[1] < 2:
        raise ImageIOError(f"points must be (N, 2+) coordinates, not shape {pts.shape}")
    table: dict[str, Any] = {"y": pts[:, -2], "x": pts[:, -1]}
    features = meta.get("features")
    if features is not None and len(features):
        for col in list(features.columns if hasattr(features, "columns") else features):
            values = np.asarray(features[col])
            if values.dtype.kind in "biufOUS" and values.ndim == 1:
                table[str(col)] = values.astype(str) if values.dtype.kind == "O" else values
    if "size" not in table and meta.get("size") is not None:
        size = np.asarray(meta["size"], dtype=float)
        table["size"] = size if size.shape == (len(pts),) else np.full(len(pts), size.mean())
    out = write_detections(path, _safe_name(meta.get("name", "points")), table)
    return [str(out)]


def _label_properties(features: Any) -> dict[int, dict[str, Any]]:
    """Per-label properties from a Labels layer's features table (with an `index` column)."""
    if features is None or not len(features) or "index" not in getattr(features, "columns", ()):
        return {}
    out: dict[int, dict[str, Any]] = {}
    for _, row in features.iterrows():
        out[int(row["index"])] = {str(k): _plain(v) for k, v in row.items() if k != "index"}
    return out


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _safe_name(name: str) -> str:
    clean = "".join(c if c.isalnum() or c in "._-" else "_" for c in str(name)).lstrip("._-")
    return clean or "result"


def _as_dask(data: Any):
    import dask.array as da

    return data if isinstance(data, da.Array) else da.from_array(np.asarray(data), name=False)


# ------------------------------------------------------------------------------ samples
def sample_slide() -> list[LayerData]:
    """A lazily generated 32768 x 32768 RGB slide-like scene (0.5 um pixels)."""
    return image_layers(slide_scene(32768, 32768, seed=0), "synthetic slide", units=False)


def sample_sar() -> list[LayerData]:
    """A lazily generated 16384 x 16384 two-channel (VV, VH) SAR-like scene in dB."""
    return image_layers(sar_scene(16384, 16384, seed=0), "synthetic SAR", units=False)
