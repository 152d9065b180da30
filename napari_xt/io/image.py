"""`MultiscaleImage`: a lazily read image pyramid with its axes and physical metadata.

Level 0 is full resolution; every level is a dask array with the same axes and dtype, chunked
like the file's own tiles/chunks, so slicing a region reads only the tiles it covers.
Axes are one of `YX`, `YXC`, `CYX` (T/Z planes are chosen when opening).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np

from .errors import ImageIOError

AXES = ("YX", "YXC", "CYX")


@dataclass(frozen=True)
class MultiscaleImage:
    """An image pyramid: `levels[0]` is full resolution, each later level smaller.

    `pixel_size` is the physical (y, x) size of a level-0 pixel in `unit` when the file says
    so, else `None`. `contrast_limits` holds one `(low, high)` per channel (a single pair for
    `YX` and RGB images) when the file carries display windows. `resources` keeps open file
    handles alive as long as the image is used; `close()` releases them.
    """

    levels: list[da.Array]
    axes: str
    dtype: np.dtype
    channel_names: tuple[str, ...] | None = None
    pixel_size: tuple[float, float] | None = None
    unit: str | None = None
    contrast_limits: tuple[tuple[float, float], ...] | None = None
    channel_colors: tuple[str, ...] | None = None
    translation: tuple[float, float] | None = None
    source: str = "array"
    paths: tuple[str, ...] = ()  # local files or folders the levels are read from
    resources: tuple[Any, ...] = field(default=(), repr=False, compare=False)
    # a slide's label, macro and thumbnail images (RGB uint8), by name
    associated: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        levels = list(self.levels)
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        where = f"{self.source}"
        if not levels:
            raise ImageIOError(f"{where}: an image needs at least one level")
        if self.axes not in AXES:
            raise ImageIOError(f"{where}: axes {self.axes!r} are not one of {', '.join(AXES)}")
        check_dtype(self.dtype, where)
        for i, level in enumerate(levels):
            if level.ndim != len(self.axes):
                raise ImageIOError(
                    f"{where}: level {i} has {level.ndim} dimensions, axes are {self.axes!r}"
                )
            if level.dtype != self.dtype:
                raise ImageIOError(f"{where}: level {i} has dtype {level.dtype}, not {self.dtype}")
            if 0 in level.shape:
                raise ImageIOError(f"{where}: level {i} has zero size (shape {level.shape})")
        c = self.num_channels
        ci = self.channel_axis
        if ci is not None and any(lv.shape[ci] != c for lv in levels[1:]):
            raise ImageIOError(f"{where}: levels disagree on the number of channels")
        if self.channel_names is not None and len(self.channel_names) != c:
            raise ImageIOError(
                f"{where}: {len(self.channel_names)} channel names for {c} channel(s)"
            )
        if self.contrast_limits is not None:
            limits = tuple((float(lo), float(hi)) for lo, hi in self.contrast_limits)
            object.__setattr__(self, "contrast_limits", limits)

    # ----------------------------------------------------------------- shape helpers
    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of level 0, in the order of `axes`."""
        return tuple(self.levels[0].shape)

    @property
    def ndim(self) -> int:
        """Number of axes (2 for `YX`, 3 for `YXC` and `CYX`)."""
        return len(self.axes)

    @property
    def num_levels(self) -> int:
        """Number of pyramid levels."""
        return len(self.levels)

    @property
    def height(self) -> int:
        """Level-0 height in pixels."""
        return int(self.shape[self.axes.index("Y")])

    @property
    def width(self) -> int:
        """Level-0 width in pixels."""
        return int(self.shape[self.axes.index("X")])

    @property
    def channel_axis(self) -> int | None:
        """Index of the `C` axis in `axes`, or None for `YX` images."""
        return self.axes.index("C") if "C" in self.axes else None

    @property
    def num_channels(self) -> int:
        """Number of channels (1 for `YX` images)."""
        axis = self.channel_axis
        return 1 if axis is None else int(self.shape[axis])

    @property
    def is_rgb(self) -> bool:
        """Interleaved 8-bit RGB(A), displayed as colour rather than as separate channels."""
        return self.axes == "YXC" and self.num_channels in (3, 4) and self.dtype == np.uint8

    def level_shape(self, level: int) -> tuple[int, int]:
        """(height, width) of a level."""
        arr = self._level(level)
        return int(arr.shape[self.axes.index("Y")]), int(arr.shape[self.axes.index("X")])

    def downsample(self, level: int) -> tuple[float, float]:
        """(y, x) factor between level 0 and `level` pixels (1.0 for level 0)."""
        h0, w0 = self.level_shape(0)
        h, w = self.level_shape(level)
        return h0 / h, w0 / w

    def level_pixel_size(self, level: int) -> tuple[float, float] | None:
        """Physical (y, x) size of a pixel of `level` in `unit`, or None when the
        image has no pixel size."""
        if self.pixel_size is None:
            return None
        fy, fx = self.downsample(level)
        return self.pixel_size[0] * fy, self.pixel_size[1] * fx

    # ----------------------------------------------------------------- layouts
    def to_yxc(self, level: int = 0) -> da.Array:
        """The level as `(Y, X, C)` (a single channel for `YX` images)."""
        arr = self._level(level)
        if self.axes == "YX":
            return arr[..., None]
        if self.axes == "CYX":
            return arr.transpose(1, 2, 0)
        return arr

    def to_cyx(self, level: int = 0) -> da.Array:
        """The level as `(C, Y, X)` (a single channel for `YX` images)."""
        arr = self._level(level)
        if self.axes == "YX":
            return arr[None]
        if self.axes == "YXC":
            return arr.transpose(2, 0, 1)
        return arr

    def close(self) -> None:
        """Release open file handles (TIFF files); the levels can no longer be read."""
        for res in self.resources:
            closer = getattr(res, "close", None)
            if callable(closer):
                closer()

    def _level(self, level: int) -> da.Array:
        if not -len(self.levels) <= level < len(self.levels):
            raise ImageIOError(
                f"{self.source}: level {level} does not exist ({len(self.levels)} levels)"
            )
        return self.levels[level]


def check_dtype(dtype: np.dtype, where: str) -> None:
    """Refuse dtypes that are not images: bool, complex, object, strings, structured."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        raise ImageIOError(
            f"{where}: boolean data is a mask, not an image; cast it to uint8 to open it as one"
        )
    if dtype.kind == "c":
        raise ImageIOError(
            f"{where}: complex data ({dtype}) is not an image; take its magnitude or phase first"
        )
    if dtype.kind not in "uif":
        raise ImageIOError(f"{where}: dtype {dtype} is not a numeric image type")
