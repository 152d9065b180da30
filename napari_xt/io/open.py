"""`open_image`: one entry point from any supported source to a `MultiscaleImage`.

Sources: OME-Zarr (0.4 / 0.5) and plain zarr arrays (local, URL through fsspec, store or zarr
object), TIFF family files (OME-TIFF, SVS, NDPI, tiled/pyramidal TIFF), `.npy` files
(memory-mapped), numpy and dask arrays, a list of arrays as pyramid levels, or an existing
`MultiscaleImage`. Nothing is decoded when opening. An `ImagePath` is a path together with
how to read it (TIFF series, plane, axes): what the engine and the command line pass when
an image must be read in a particular way but still be known by its path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr
from dask.base import tokenize

from .axes import guess_axes, select_plane
from .chunks import default_chunks
from .errors import ImageIOError
from .image import MultiscaleImage, check_dtype
from .tiff_reader import is_tiff_path, open_tiff
from .zarr_reader import is_url, looks_like_zarr, open_zarr

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class ImagePath(os.PathLike):
    """A local path or URL with how to read it; `open_image` applies these options, and
    everything that records where an image came from sees the plain path.

    series: the TIFF series (None: the file's only image series; several are refused).
    plane: (axis, index) pairs for axes other than Y, X and channels, e.g. (("z", 0),).
    axes: the native axes when they cannot be read or guessed.
    """

    path: str
    series: int | None = None
    plane: tuple[tuple[str, int], ...] | None = None
    axes: str | None = None

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path


def open_image(
    path_or_array: Any,
    level: int | None = None,
    plane: Mapping[str, int] | None = None,
    *,
    series: int | None = 0,
    axes: str | None = None,
) -> MultiscaleImage:
    """Open an image lazily as a `MultiscaleImage` (levels are dask arrays, level 0 = full).

    level: start the pyramid at this file level (its pixel size becomes the image's).
    plane: the index to take along axes other than Y, X and channels, e.g.
        `{"t": 0, "z": 3}`; singleton axes are dropped without being named.
    series: which TIFF series (SVS: 0 = baseline slide; label/macro images follow); None:
        the file's only image series (a slide's label, macro and thumbnail images and a
        pyramid's levels do not count), refusing a file that holds several.
    axes: the native axes of a bare array or zarr array when they cannot be read or guessed
        (`"YX"`, `"YXC"`, `"CYX"`, `"TCZYX"`, ...).
    An `ImagePath` brings its own series, plane and axes (they replace these arguments).

    Raises `ImageIOError` (a `ValueError`) with the path and the reason when the source does
    not exist, is not an image, has unsupported axes, zero size or a bool/complex dtype.
    """
    if isinstance(path_or_array, ImagePath):
        request = path_or_array
        series, axes = request.series, request.axes or axes
        plane = dict(request.plane) if request.plane else plane
        path_or_array = request.path
    image = _open(path_or_array, plane=plane, series=series, axes=axes)
    where = _local_path(path_or_array)
    if where is not None and not image.paths:
        image = replace(image, paths=(where,))
    if level is not None:
        image = _from_level(image, level)
    return image


def _open(source: Any, *, plane, series, axes) -> MultiscaleImage:
    if isinstance(source, MultiscaleImage):
        if plane:
            raise ImageIOError(f"{source.source}: already a 2-D image; plane does not apply")
        return source
    if isinstance(source, np.ndarray | da.Array):
        return from_arrays([source], axes=axes, plane=plane)
    if isinstance(source, list | tuple) and source and all(
        isinstance(a, np.ndarray | da.Array) for a in source
    ):
        return from_arrays(list(source), axes=axes, plane=plane)
    if isinstance(source, zarr.Array | zarr.Group):
        return open_zarr(source, plane=plane, axes=axes, where=f"zarr {source.store_path}")
    if _is_store(source):
        return open_zarr(source, plane=plane, axes=axes, where=f"zarr store {source}")
    if isinstance(source, str | os.PathLike):
        return _open_path(source, plane=plane, series=series, axes=axes)
    raise ImageIOError(
        f"cannot open an object of type {type(source).__name__} as an image; pass a path, "
        "URL, numpy/dask array or zarr array/group"
    )


def _open_path(source, *, plane, series, axes) -> MultiscaleImage:
    where = str(source)
    if is_url(source):
        return open_zarr(source, plane=plane, axes=axes, where=where)
    path = Path(source)
    if not path.exists():
        raise ImageIOError(f"{where}: no such file or directory")
    if path.is_dir():
        if looks_like_zarr(path):
            return open_zarr(path, plane=plane, axes=axes, where=where)
        from .dicom_reader import is_dicom_folder, open_dicom

        if is_dicom_folder(path):
            return _no_plane(open_dicom(path, where=where), plane, where)
        raise ImageIOError(f"{where}: a directory but neither a zarr store (no "
                           "zarr.json/.zgroup) nor a DICOM slide (no .dcm files)")
    if path.stat().st_size == 0:
        raise ImageIOError(f"{where}: empty file (zero bytes)")
    from .openslide_reader import SUFFIXES as SLIDE_SUFFIXES

    if path.suffix.lower() in SLIDE_SUFFIXES:  # slide formats only OpenSlide reads
        from .openslide_reader import open_openslide

        if series not in (None, 0):
            raise ImageIOError(f"{where}: an OpenSlide slide has one image; --series applies "
                               "to TIFF files")
        return _no_plane(open_openslide(path, where=where), plane, where)
    if path.suffix.lower() == ".dcm":  # one file of a DICOM slide: its slide
        from .dicom_reader import open_dicom

        if series not in (None, 0):
            raise ImageIOError(f"{where}: --series applies to TIFF files")
        return _no_plane(open_dicom(path, where=where), plane, where)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(_NPY_MAGIC):
        return open_npy(path, plane=plane, axes=axes)
    if head[:4] in _TIFF_MAGIC:
        return open_tiff(path, series=series, plane=plane, axes=axes, where=where)
    if is_tiff_path(path) or path.suffix.lower() == ".npy":
        raise ImageIOError(f"{where}: not a {path.suffix} file (its first bytes are {head!r})")
    raise ImageIOError(
        f"{where}: not a supported image; expected OME-Zarr/zarr, (OME-)TIFF/SVS/NDPI, .npy, "
        "a slide OpenSlide reads (.mrxs, .scn, .vms, .bif, ...) or a DICOM slide folder"
    )


def _no_plane(image: MultiscaleImage, plane, where: str) -> MultiscaleImage:
    if plane:
        raise ImageIOError(f"{where}: a 2-D slide; --plane does not apply")
    return image


def open_npy(path: str | os.PathLike, *, plane=None, axes=None) -> MultiscaleImage:
    """A `.npy` file, memory-mapped: regions are read from disk when sliced."""
    where = str(path)
    try:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:
        msg = f"{where}: not a readable .npy file: {type(err).__name__}: {err}"
        raise ImageIOError(msg) from err
    check_dtype(mm.dtype, where)
    native_axes = axes or guess_axes(mm.shape, where)
    if 0 in mm.shape:
        raise ImageIOError(f"{where}: array has zero size (shape {mm.shape})")
    stamp = (os.path.abspath(path), os.path.getmtime(path), mm.shape, mm.dtype.str)
    name = "xt-npy-" + tokenize(*stamp)
    level = da.from_array(
        mm, chunks=default_chunks(mm.shape, native_axes), name=name, lock=False,
        meta=np.empty((0,) * mm.ndim, dtype=mm.dtype),
    )
    levels, out_axes = select_plane([level], native_axes, plane, where)
    return MultiscaleImage(levels, out_axes, mm.dtype, source=f".npy ({where})")


def from_arrays(
    arrays: Sequence[np.ndarray | da.Array],
    *,
    axes: str | None = None,
    plane: Mapping[str, int] | None = None,
    pixel_size: tuple[float, float] | None = None,
    unit: str | None = None,
    channel_names: Sequence[str] | None = None,
    source: str = "array",
) -> MultiscaleImage:
    """Arrays in memory (or dask) as an image; several arrays are pyramid levels, largest first."""
    levels = []
    for i, arr in enumerate(arrays):
        check_dtype(arr.dtype, source)
        if 0 in arr.shape:
            raise ImageIOError(f"{source}: level {i} has zero size (shape {arr.shape})")
        native_axes = axes or guess_axes(arrays[0].shape, source)
        if isinstance(arr, np.ndarray):
            arr = da.from_array(arr, chunks=default_chunks(arr.shape, native_axes), name=False)
        levels.append(arr)
    levels, out_axes = select_plane(levels, native_axes, plane, source)
    return MultiscaleImage(
        levels, out_axes, levels[0].dtype, pixel_size=pixel_size, unit=unit,
        channel_names=tuple(channel_names) if channel_names else None, source=source,
    )


def _from_level(image: MultiscaleImage, level: int) -> MultiscaleImage:
    n = image.num_levels
    if not 0 <= level < n:
        raise ImageIOError(f"{image.source}: level {level} does not exist ({n} levels)")
    if level == 0:
        return image
    fy, fx = image.downsample(level)
    pixel_size = None
    if image.pixel_size is not None:
        pixel_size = (image.pixel_size[0] * fy, image.pixel_size[1] * fx)
    return replace(image, levels=image.levels[level:], pixel_size=pixel_size,
                   source=f"{image.source} from level {level}")


def _local_path(source: Any) -> str | None:
    """The local file or folder an image source is read from, when there is one."""
    if isinstance(source, str | os.PathLike) and not is_url(source):
        return os.path.abspath(os.fspath(source))
    if isinstance(source, np.memmap) and getattr(source, "filename", None):
        return os.path.abspath(source.filename)
    if isinstance(source, zarr.Array | zarr.Group):
        root = getattr(source.store, "root", None)
        if root is not None:
            return os.path.abspath(os.path.join(str(root), source.path))
    return None


def _is_store(obj: Any) -> bool:
    from zarr.abc.store import Store

    return isinstance(obj, Store)
