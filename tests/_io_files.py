"""Writers of test images with the real libraries (zarr, tifffile); the NGFF metadata is
written here by hand, following the specification, independently of napari_xt.io."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import zarr

AXIS_TYPE = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


def write_ngff(
    path: Path,
    levels: list[np.ndarray],
    axes: str,
    *,
    version: str,
    pixel_size: float = 0.25,
    unit: str = "micrometer",
    translation: tuple[float, float] | None = None,
    omero: dict | None = None,
    chunks: int = 64,
) -> Path:
    """An NGFF image: version "0.4" on zarr v2 (.zattrs) or "0.5" on zarr v3 (zarr.json)."""
    fmt = 2 if version == "0.4" else 3
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    datasets = []
    for i, level in enumerate(levels):
        chunk_shape = tuple(min(s, chunks) if a in "yx" else 1 for s, a in zip(level.shape, axes))
        kwargs = {"dimension_names": list(axes)} if fmt == 3 else {}
        arr = root.create_array(str(i), shape=level.shape, chunks=chunk_shape,
                                dtype=level.dtype, **kwargs)
        arr[...] = level
        scale = [pixel_size * 2**i if a in "yx" else 1.0 for a in axes]
        transforms = [{"type": "scale", "scale": scale}]
        if translation is not None:
            t = iter(translation)
            transforms.append({"type": "translation",
                               "translation": [next(t) if a in "yx" else 0.0 for a in axes]})
        datasets.append({"path": str(i), "coordinateTransformations": transforms})
    axes_meta = [
        {"name": a, "type": AXIS_TYPE[a], **({"unit": unit} if a in "yx" else {})} for a in axes
    ]
    ms = {"axes": axes_meta, "datasets": datasets, "name": "test"}
    if version == "0.4":
        ms["version"] = "0.4"
        attrs = {"multiscales": [ms]}
        if omero:
            attrs["omero"] = omero
    else:
        block = {"version": "0.5", "multiscales": [ms]}
        if omero:
            block["omero"] = omero
        attrs = {"ome": block}
    root.attrs.update(attrs)
    return path


def halve(a: np.ndarray, axes: str) -> np.ndarray:
    index = tuple(slice(0, None, 2) if ax in "yx" else slice(None) for ax in axes)
    return a[index]


def write_pyramidal_ome_tiff(path: Path, data: np.ndarray, *, levels: int = 3,
                             tile: int = 128) -> list[np.ndarray]:
    """RGB (Y, X, 3) OME-TIFF with reduced levels in SubIFDs; returns the levels written."""
    pyramid = [data]
    for _ in range(levels - 1):
        pyramid.append(pyramid[-1][::2, ::2])
    opts = dict(tile=(tile, tile), photometric="rgb", compression="zlib")
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(pyramid[0], subifds=levels - 1, metadata={
            "axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5,
            "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}, **opts)
        for level in pyramid[1:]:
            tw.write(level, subfiletype=1, **opts)
    return pyramid


def write_svs_like(path: Path, data: np.ndarray, *, mpp: float = 0.499,
                   tile: int = 128) -> list[np.ndarray]:
    """An Aperio-layout TIFF: tiled baseline, stripped thumbnail, tiled 4x level, label,
    macro; the first description starts with "Aperio" and carries MPP."""
    h, w = data.shape[:2]
    head = "Aperio Image Library v12.0.15 \r\n"
    kw = dict(photometric="rgb", compression="zlib", metadata=None)
    reduced = data[::4, ::4]
    with tifffile.TiffWriter(path) as tw:
        tw.write(data, tile=(tile, tile), **kw,
                 description=f"{head}{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) RAW|AppMag = 20|"
                             f"MPP = {mpp}|Filename = synthetic")
        tw.write(data[::8, ::8], description=f"{head}thumbnail", **kw)
        tw.write(reduced, tile=(tile, tile), description=f"{head}level 1", **kw)
        tw.write(data[::16, ::16], subfiletype=1, description=f"{head}label", **kw)
        tw.write(data[::16, ::16], subfiletype=9, description=f"{head}macro", **kw)
    return [data, reduced]


def rgb_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
