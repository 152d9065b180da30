"""napari glue for the io package: reader, writers and sample data (see napari.yaml).

Images become multiscale Image layers: scale from the physical pixel size, `rgb=True` for
8-bit RGB (including OME-Zarr stores whose three 8-bit channels are red/green/blue),
`channel_axis` for other multi-channel images, contrast limits from the file's windows or
from the smallest pyramid level (never from level 0). Results stored beside an OME-Zarr
image (`labels/<name>`, `tables/<name>`) open as Labels and Points layers.

Stores of napari-xt runs on a pyramid level are placed on the input image's level 0
(`store_shift`, `level_offset`), classification records become a labelled rectangle. The SAR
sample is the demo task's scene with its truth (`napari_xt.train.scene_image`).

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
from .sample_data import slide_scene

LayerData = tuple[Any, dict[str, Any], str]
SUFFIXES = (".zarr", ".tif", ".tiff", ".svs", ".ndpi", ".npy", ".mrxs", ".vms", ".vmu", ".scn",
            ".bif", ".svslide", ".dcm")
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
    from napari_xt.io.dicom_reader import is_dicom_folder

    return text.endswith(SUFFIXES) or looks_like_zarr(path) or is_dicom_folder(path)


def read_paths(path: str | Sequence[str]) -> list[LayerData]:
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    layers: list[LayerData] = []
    slides: set[Any] = set()  # DICOM slides opened (several of one slide's files chosen)
    for p in paths:
        name = _stem(p)
        if str(p).lower().endswith(".dcm"):
            from napari_xt.io.dicom_reader import slide_key

            key = slide_key(p)
            if key in slides:
                continue
            slides.add(key)
        if looks_like_zarr(p) and _has_results(p):
            layers.extend(store_layers(p, name))
            continue
        series = _tiff_series(p)
        if len(series) > 1:  # every image series of the file, each its own layer
            for n, i in enumerate(series):  # (the file's label/macro beside the first)
                layers.extend(image_layers(open_image(p, series=i), f"{name} series {i}",
                                           associated=n == 0))
            continue
        image = open_image(p, series=series[0] if series else 0)
        layers.extend(image_layers(image, name))
    return layers


def _tiff_series(path: Any) -> list[int]:
    from napari_xt.io.tiff_reader import image_series, is_tiff_path

    return image_series(path) if is_tiff_path(Path(str(path))) else []


def _has_results(path: Any) -> bool:
    """A zarr store holding results (labels, tables, probabilities) or a napari-xt run."""
    attrs = store_attrs(path)
    if "run_signature" in attrs:
        return True
    found = list_results(path)
    return any(found[k] for k in ("labels", "tables", "probabilities"))


def _root_attrs(path: Any) -> dict[str, Any]:
    """The attributes of a store's root group ({} when it has none or cannot be read)."""
    from .io.result_store import group_attrs, zarr_format

    fmt = zarr_format(Path(path))
    try:
        return group_attrs(Path(path), fmt) if fmt else {}
    except (OSError, ValueError):
        return {}


def _declares_image(path: Any) -> bool:
    """The root group declares multiscale images (OME-Zarr 0.5 `ome.multiscales`, or 0.4
    `multiscales`)."""
    attrs = _root_attrs(path)
    ome = attrs.get("ome")
    return bool(attrs.get("multiscales") or (isinstance(ome, dict) and ome.get("multiscales")))


def store_attrs(path: Any) -> dict[str, Any]:
    """The "napari-xt" attributes of a store's root group ({} when none)."""
    value = _root_attrs(path).get("napari-xt", {})
    return value if isinstance(value, dict) else {}


def store_layers(path: Any, name: str) -> list[LayerData]:
    """Layers of a store of results: its own image (for a napari-xt result store, the
    preview of the input), then every label image (Labels, with class names and colours),
    probability image (one Image per class), detection table (Points with their features)
    and classification record (a labelled rectangle), all placed in the same world
    coordinates: those of the input image's level 0 (`store_shift`)."""
    attrs = store_attrs(path)
    layers: list[LayerData] = []
    # results without an image of their own (e.g. saved from napari's Labels/Points
    # writers) show their results alone; an image the root declares and that cannot be
    # read is an error (ImageIOError) the reader reports, not a missing layer
    image = open_image(path) if _declares_image(path) else None
    if image is not None:
        suffix = " (input preview)" if "run_signature" in attrs else ""
        layers.extend(image_layers(image, f"{name}{suffix}"))
    layers.extend(result_layers(path, image, attrs))
    shift = store_shift(path, attrs, image)
    if any(shift):
        for _, kwargs, _ in layers:
            ty, tx = kwargs.get("translate", (0.0, 0.0))
            kwargs["translate"] = (float(ty) + shift[0], float(tx) + shift[1])
    return layers


def store_shift(path: Any, attrs: dict[str, Any], image: MultiscaleImage | None = None
                ) -> tuple[float, float]:
    """World offset of a napari-xt store run on a pyramid level downsampled by f
    (`level_scale`): its arrays are the level's pixel grid with the level's pixel size, whose
    pixel i napari draws over the input's level-0 pixels f*i .. f*i + f - 1 (the detection
    table's level-0 coordinates are f times level pixels), so everything moves by
    (f - 1) / 2 level-0 pixels to sit on the input image."""
    level_scale = attrs.get("level_scale")
    if not level_scale:
        return 0.0, 0.0
    fy, fx = (float(v) for v in level_scale)
    px = _run_pixel_size(path, attrs, image)
    if px is None:
        return 0.0, 0.0
    return (fy - 1) / 2 * px[0] / fy, (fx - 1) / 2 * px[1] / fx


def _run_pixel_size(path: Any, attrs: dict[str, Any], image: MultiscaleImage | None
                    ) -> tuple[float, float] | None:
    """World size of one pixel of the level the store's run processed."""
    from .io import read_probabilities

    found = list_results(path)
    try:
        if found["labels"]:
            px = read_labels(path, found["labels"][0]).pixel_size
        elif found.get("probabilities"):
            px = read_probabilities(path, found["probabilities"][0]).pixel_size
        else:
            px = None
    except ImageIOError:
        px = None
    if px is None and image is not None and image.pixel_size:
        tiling = attrs.get("tiling") or {}
        if tiling.get("height") and tiling.get("width"):
            h, w = image.level_shape(0)
            px = (image.pixel_size[0] * h / float(tiling["height"]),
                  image.pixel_size[1] * w / float(tiling["width"]))
    if px is None:
        level_scale = attrs.get("level_scale") or (1.0, 1.0)
        px = tuple(float(v) for v in level_scale)  # stores without a physical pixel size
    return float(px[0]), float(px[1])
def _stem(path: Any) -> str:
    name = Path(str(path).rstrip("/\\")).name
    for suffix in (".ome.zarr", ".ome.tiff", ".ome.tif", ".zarr", ".tiff", ".tif", ".svs",
                   ".ndpi", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def image_layers(image: MultiscaleImage, name: str, *, units: bool = True,
                 associated: bool = True) -> list[LayerData]:
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
    layers: list[LayerData] = [(levels if multiscale else levels[0], kwargs, "image")]
    return layers + (_associated_layers(image, name) if associated else [])


def _associated_layers(image: MultiscaleImage, name: str) -> list[LayerData]:
    """A slide's label, macro and thumbnail images as hidden RGB layers beside the slide
    (right of it, one above the other, each at its own pixel size)."""
    out: list[LayerData] = []
    if not image.associated:
        return out
    sy, sx = image.pixel_size or (1.0, 1.0)
    h, w = image.height, image.width
    y, x = 0.0, (w + w // 20) * sx
    for key, rgb in sorted(image.associated.items()):
        arr = np.asarray(rgb)
        f = max(h * sy / max(arr.shape[0], 1), 1e-9) / max(1, len(image.associated))
        out.append((arr, {"name": f"{name} {key}", "rgb": True, "visible": False,
                          "scale": (f, f), "translate": (y, x),
                          "metadata": {"source": image.source, "associated": key}}, "image"))
        y += arr.shape[0] * f * 1.05
    return out


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
    tiling = attrs.get("tiling") or {}
    for name in results.get("classifications", []):
        from .io import read_classification

        record = read_classification(store, name)
        if not (tiling.get("height") and tiling.get("width")):
            continue  # not a napari-xt run: no image extent to draw the record on
        run_px = label_px or _run_pixel_size(store, attrs, image) or (1.0, 1.0)
        data, kwargs = classification_shapes(record, int(tiling["height"]),
                                             int(tiling["width"]))
        kwargs.update(name=f"{name} class", scale=run_px)
        layers.append((data, kwargs, "shapes"))
    return layers


def classification_text(record: dict[str, Any], names: Sequence[str] = ()) -> str:
    """"name (score)" of a classification record (names: the model's class names)."""
    k = int(record.get("class", 0))
    name = record.get("class_name") or (names[k] if 0 <= k < len(names) else f"class {k}")
    return f"{name} ({float(record.get('score', float('nan'))):.2f})"


def classification_shapes(record: dict[str, Any], height: int, width: int,
                          names: Sequence[str] = ()) -> tuple[list, dict[str, Any]]:
    """Shapes layer data for a classification record: one rectangle around the `height` x
    `width` pixels the classifier saw, labelled "name (score)"; features `class`,
    `class_name`, `score`, `crops`; the record in `metadata["classification"]`."""
    k = int(record.get("class", 0))
    text = classification_text(record, names)
    box = np.array([[-0.5, -0.5], [-0.5, width - 0.5], [height - 0.5, width - 0.5],
                    [height - 0.5, -0.5]])
    features = {"class": [k], "class_name": [text.rsplit(" (", 1)[0]],
                "score": [float(record.get("score", float("nan")))],
                "crops": [int(record.get("crops", 1))], "label": [text]}
    kwargs = {"shape_type": "rectangle", "edge_color": "yellow", "face_color": "transparent",
              "edge_width": max(2.0, 0.004 * max(height, width)), "features": features,
              "text": {"string": "{label}", "size": 14, "color": "yellow",
                       "anchor": "upper_left"},
              "metadata": {"classification": dict(record)}}
    return [box], kwargs


def level_offset(factor: Sequence[float], scale: Sequence[float],
                 translate: Sequence[float] = (0.0, 0.0)):
    """(scale, translate) in world units of the pixels of a level downsampled by `factor`
    (fy, fx) from a level 0 whose pixels have world `scale` and `translate`. napari draws
    pixel i of such a level over level-0 pixels f*i .. f*i + f - 1, so its centre lies
    (f - 1) / 2 level-0 pixels beyond f*i."""
    fy, fx = (float(v) for v in factor)
    sy, sx = (float(v) for v in scale)
    ty, tx = (float(v) for v in translate)
    return (sy * fy, sx * fx), (ty + (fy - 1) / 2 * sy, tx + (fx - 1) / 2 * sx)


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


SAMPLE_SAR_SIZE = 2048


def sample_sar(size: int | None = None, seed: int = 0) -> list[LayerData]:
    """The demo task's scene (what the built-in model was trained on), `size` px a side
    (default `SAMPLE_SAR_SIZE`), generated lazily: VV and VH in dB as a pyramid, then its
    truth, hidden: a Labels pyramid (land / sea / lake) and the vessels as Points."""
    from napari.utils.colormaps import DirectLabelColormap

    from .train.scene_image import CLASS_COLORS, scene_image

    scene = scene_image(SAMPLE_SAR_SIZE if size is None else size, seed)
    name = "synthetic SAR"
    layers = image_layers(scene.image, name, units=False)
    names = scene.class_names
    colors = {None: (0, 0, 0, 0), **{k: tuple(c / 255.0 for c in v)
                                     for k, v in CLASS_COLORS.items()}}
    truth = scene.labels if len(scene.labels) > 1 else scene.labels[0]
    layers.append((truth, {
        "name": f"{name} truth", "multiscale": len(scene.labels) > 1, "visible": False,
        "opacity": 0.5, "colormap": DirectLabelColormap(color_dict=colors),
        "features": {"index": list(range(len(names))), "class": list(names)},
        "metadata": {"source": scene.image.source, "truth": "classes"}}, "labels"))
    v = scene.vessels
    layers.append((np.stack([v["y"], v["x"]], 1).reshape(-1, 2), {
        "name": f"{name} truth vessels", "visible": False, "size": np.clip(v["size"], 6, None),
        "face_color": "transparent", "border_color": "red", "border_width": 0.15,
        "features": {"class_name": ["vessel"] * len(v["y"]), "length": v["size"]},
        "metadata": {"source": scene.image.source, "truth": "vessels"}}, "points"))
    return layers
