"""Conversion of any supported image to OME-Zarr 0.5 (zarr v3) with a 2x pyramid.

Memory stays bounded: level 0 is copied from the source one output block at a time, then
every next level is computed from the level just written, block by block. The store is
built under a temporary name and renamed into place when complete, so a failed or
interrupted conversion leaves nothing at the destination. Progress is a stream of
`ProgressEvent`s (`iter_convert` yields them; `convert` passes them to a callback).

Axes follow NGFF ordering (channel before space): `YX` stays `YX`; `YXC` (e.g. RGB) and
`CYX` are written as `CYX` with one omero channel per component (RGB gets red/green/blue).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .errors import ImageIOError
from .image import MultiscaleImage
from .ngff import image_attrs, multiscale_metadata, omero_metadata
from .open import open_image
from .progress import ProgressCallback, ProgressEvent
from .pyramid import pyramid_shapes
from .stats import channel_ranges
from .store import atomic_directory, block_grid, codec, write_blocks, write_pyramid_level

RGB_COLORS = ("FF0000", "00FF00", "0000FF", "FFFFFF")
RGB_NAMES = ("R", "G", "B", "A")


def iter_convert(
    src: Any,
    dst: str | os.PathLike,
    *,
    level: int | None = None,
    plane: Mapping[str, int] | None = None,
    series: int = 0,
    axes: str | None = None,
    chunk: int = 1024,
    min_size: int = 1024,
    method: str = "mean",
    compressor: str = "zstd",
    compression_level: int = 3,
    overwrite: bool = False,
    workers: int = 2,
    name: str | None = None,
) -> Iterator[ProgressEvent]:
    """Convert `src` (anything `open_image` opens) into the OME-Zarr store `dst`, yielding a
    `ProgressEvent` after every written block (plus one with done == 0 first)."""
    if not 256 <= chunk <= 4096:
        raise ImageIOError(f"chunk must be between 256 and 4096 pixels, not {chunk}")
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ImageIOError(f"{dst}: already exists", remedy="overwrite_it")
    image = open_image(src, level=level, plane=plane, series=series, axes=axes)
    try:
        yield from _write_store(
            image, dst, chunk=chunk, min_size=min_size, method=method,
            compressor=codec(compressor, compression_level), overwrite=overwrite,
            workers=workers, name=name or _default_name(src, dst),
        )
    finally:
        if not isinstance(src, MultiscaleImage):
            image.close()


def _default_name(src: Any, dst: Path) -> str:
    if isinstance(src, str | os.PathLike):
        return Path(str(src).rstrip("/")).name
    return dst.name.removesuffix(".zarr").removesuffix(".ome")


def convert(
    src: Any,
    dst: str | os.PathLike,
    *,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> MultiscaleImage:
    """Convert `src` to OME-Zarr 0.5 at `dst` (see `iter_convert` for the options); call
    `progress(event)` for every event; return the written image, opened."""
    for event in iter_convert(src, dst, **options):
        if progress is not None:
            progress(event)
    return open_image(dst)


def _write_store(
    image: MultiscaleImage, dst: Path, *, chunk, min_size, method, compressor, overwrite,
    workers, name,
) -> Iterator[ProgressEvent]:
    out_axes = "YX" if image.axes == "YX" else "CYX"
    source = image.to_cyx(0) if out_axes == "CYX" else image.levels[0]
    shapes = pyramid_shapes(image.height, image.width, min_size=min_size)
    block = (chunk, chunk)
    counts = [len(block_grid(s, block)) for s in shapes]
    total, done, n = sum(counts), 0, len(shapes)
    yield ProgressEvent(0, total, 0, n, f"writing {n} levels, {total} blocks")
    channels = () if out_axes == "YX" else (int(source.shape[0]),)
    chunk_c = () if out_axes == "YX" else (channels[0] if channels[0] <= 8 else 1,)
    with atomic_directory(dst, overwrite=overwrite, what="output store") as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        arrays = []
        for i, (h, w) in enumerate(shapes):
            arrays.append(
                root.create_array(
                    str(i),
                    shape=(*channels, h, w),
                    chunks=(*chunk_c, min(chunk, h), min(chunk, w)),
                    dtype=image.dtype, compressors=compressor, fill_value=0,
                    dimension_names=[a.lower() for a in out_axes],
                )
            )
        for _ in write_blocks(source, arrays[0], out_axes, block=block, workers=workers):
            done += 1
            yield ProgressEvent(done, total, 0, n, "level 0")
        for i in range(1, n):
            for _ in write_pyramid_level(
                arrays[i - 1], arrays[i], out_axes, block=block, method=method, workers=workers
            ):
                done += 1
                yield ProgressEvent(done, total, i, n, f"level {i}")
        smallest = np.asarray(arrays[-1][...])
        root.attrs.update(_metadata(image, out_axes, shapes, name, smallest))
    yield ProgressEvent(done, total, n - 1, n, f"done: {dst}")


def _metadata(image: MultiscaleImage, axes: str, shapes, name: str, smallest) -> dict[str, Any]:
    py, px = image.pixel_size or (1.0, 1.0)
    scales = []
    for i in range(len(shapes)):
        f = 2.0**i
        scales.append(([1.0] if axes == "CYX" else []) + [py * f, px * f])
    translation = None
    if image.translation is not None and any(image.translation):
        translation = ([0.0] if axes == "CYX" else []) + list(image.translation)
    ms = multiscale_metadata(
        axes, scales, translation=translation, unit=image.unit if image.pixel_size else None,
        name=name, method="mean",
    )
    omero = None
    if axes == "CYX":
        n = image.num_channels
        rgb = image.is_rgb
        names = image.channel_names or (RGB_NAMES[:n] if rgb else tuple(f"c{i}" for i in range(n)))
        colors = image.channel_colors or (RGB_COLORS[:n] if rgb else None)
        if image.contrast_limits is not None and len(image.contrast_limits) == n:
            windows = image.contrast_limits
        elif rgb:
            windows = tuple((0.0, 255.0) for _ in range(n))
        else:
            windows = channel_ranges(smallest)
        omero = omero_metadata(names, colors, windows)
    else:
        windows = image.contrast_limits or channel_ranges(smallest[None])
        omero = omero_metadata(image.channel_names or ("c0",), image.channel_colors, windows)
    extra = {"napari-xt": {"source": image.source}}
    return {**image_attrs(ms, omero=omero), **extra}
