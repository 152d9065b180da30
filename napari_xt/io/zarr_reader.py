"""Reading zarr: OME-NGFF image groups (0.4 on zarr v2, 0.5 on zarr v3) and plain arrays.

Sources: a local directory, a URL read through fsspec (`s3://`, `https://`, `file://`,
`memory://`, ... when fsspec and the filesystem's package are installed), a zarr store object,
or an opened zarr group/array. Nothing is decoded here; levels are dask arrays chunked like
the zarr chunks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zarr

from .axes import axes_from_names, guess_axes, select_plane
from .chunks import lazy_array
from .errors import ImageIOError
from .image import MultiscaleImage
from .ngff import has_multiscales, parse_image, unit_name


def is_url(source: Any) -> bool:
    """Whether `source` is a URL: a string with `://` that is not an existing local path."""
    return isinstance(source, str) and "://" in source and not os.path.exists(source)


def looks_like_zarr(path: str | os.PathLike) -> bool:
    """A local directory holding zarr v2 or v3 metadata at its top."""
    p = Path(path)
    return p.is_dir() and any((p / n).is_file() for n in ("zarr.json", ".zgroup", ".zarray"))


def open_zarr_node(source: Any, where: str) -> zarr.Array | zarr.Group:
    """Open a zarr group or array read-only from a path, URL, store or zarr object."""
    if isinstance(source, zarr.Array | zarr.Group):
        return source
    store: Any = source
    if is_url(source):
        extra = "pip install 'napari-xt[remote]'"
        try:
            import fsspec  # noqa: F401
        except ImportError as err:
            raise ImageIOError(f"{where}: reading a URL needs fsspec ({extra})") from err
        from zarr.storage import FsspecStore

        try:
            store = FsspecStore.from_url(source, read_only=True)
        except ImportError as err:  # the protocol's own package (aiohttp for http, s3fs, ...)
            raise ImageIOError(f"{where}: reading this URL needs {err.name or 'a package'} "
                               f"({extra}, s3fs for s3://): {err}") from err
        except Exception as err:
            raise ImageIOError(f"{where}: cannot open URL: {type(err).__name__}: {err}") from err
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.exists():
            raise ImageIOError(f"{where}: no such file or directory")
        if not looks_like_zarr(path):
            raise ImageIOError(f"{where}: not a zarr store (no zarr.json, .zgroup or .zarray)")
        store = str(path)
    try:
        return zarr.open(store=store, mode="r")
    except Exception as err:
        msg = f"{where}: not a readable zarr store: {type(err).__name__}: {err}"
        raise ImageIOError(msg) from err


def open_zarr(
    source: Any,
    *,
    plane: Mapping[str, int] | None = None,
    axes: str | None = None,
    multiscale: int = 0,
    where: str | None = None,
) -> MultiscaleImage:
    """Open an NGFF image group or a plain zarr array as a `MultiscaleImage`."""
    where = where or str(source)
    node = open_zarr_node(source, where)
    if isinstance(node, zarr.Array):
        return _plain_array(node, plane=plane, axes=axes, where=where)
    attrs = dict(node.attrs)
    if not has_multiscales(attrs):
        arrays = sorted(name for name, _ in node.arrays())
        groups = sorted(name for name, _ in node.groups())
        raise ImageIOError(
            f"{where}: zarr group without OME-NGFF 'multiscales' metadata "
            f"(arrays: {arrays or 'none'}, groups: {groups or 'none'}); open one of its "
            "arrays by path"
        )
    meta = parse_image(attrs, where, multiscale)
    native = []
    for i, path in enumerate(meta.paths):
        try:
            arr = node[path]
        except KeyError as err:
            msg = f"{where}: dataset {path!r} listed in multiscales is missing"
            raise ImageIOError(msg) from err
        if not isinstance(arr, zarr.Array):
            raise ImageIOError(f"{where}: dataset {path!r} is not an array")
        native.append(lazy_array(arr, f"{where} level {i} ('{path}')"))
    levels, out_axes = select_plane(native, axes or meta.axes, plane, where)
    iy, ix = meta.axes.index("Y"), meta.axes.index("X")
    unit_y, unit_x = meta.units.get("Y"), meta.units.get("X")
    names, colors, windows = _channel_meta(meta, out_axes, levels, plane)
    return MultiscaleImage(
        levels=levels,
        axes=out_axes,
        dtype=levels[0].dtype,
        channel_names=names,
        channel_colors=colors,
        contrast_limits=windows,
        pixel_size=(meta.scale[iy], meta.scale[ix]),
        unit=unit_name(unit_y) if unit_y == unit_x else None,
        translation=(meta.translation[iy], meta.translation[ix]),
        source=f"OME-Zarr {meta.version} ({where})",
    )


def _channel_meta(meta, out_axes: str, levels, plane):
    """omero names/colours/windows that fit the channels left after plane selection."""
    n = 1 if "C" not in out_axes else int(levels[0].shape[out_axes.index("C")])
    pick = None
    chosen = {str(k).upper(): int(v) for k, v in (plane or {}).items()}
    if "C" in meta.axes and "C" not in out_axes and "C" in chosen:
        pick = chosen["C"]

    def fit(values):
        if values is None:
            return None
        if pick is not None:
            return (values[pick],) if pick < len(values) else None
        return tuple(values) if len(values) == n else None

    return fit(meta.channel_names), fit(meta.channel_colors), fit(meta.windows)


def _plain_array(arr: zarr.Array, *, plane, axes, where: str) -> MultiscaleImage:
    native_axes = axes
    if native_axes is None:
        names = getattr(arr.metadata, "dimension_names", None)
        if names is None:
            names = arr.attrs.get("_ARRAY_DIMENSIONS")
        native_axes = axes_from_names(names) if names else None
    if native_axes is None:
        native_axes = guess_axes(arr.shape, where)
    level = lazy_array(arr, f"{where} (zarr array)")
    levels, out_axes = select_plane([level], native_axes, plane, where)
    return MultiscaleImage(
        levels=levels,
        axes=out_axes,
        dtype=level.dtype,
        source=f"zarr v{arr.metadata.zarr_format} array ({where})",
    )
