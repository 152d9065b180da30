"""Whole-slide images through OpenSlide (`napari-xt[openslide]`): MIRAX .mrxs, Hamamatsu
.vms/.vmu and Sakura .svslide are read here (TIFF-based slides - Aperio .svs, Hamamatsu
.ndpi, Leica .scn, Ventana .bif, Philips TIFF - go to tifffile, which reads their levels
exactly; `open_openslide` reads them too).

OpenSlide addresses a region by its level-0 corner: at a level whose downsample is not a
whole number (slides with odd sizes: 1.9992 for example) it resamples the level by a
fraction of a pixel, so such levels are close to, not equal to, the file's pixels; level 0
and whole-number downsamples are exact (tested on the Aperio slide).

`open_openslide(path)` gives a `MultiscaleImage` (YXC uint8 RGB): one lazy dask level per
slide level, chunked like OpenSlide's tiles where the slide says (`openslide.level[i].tile-*`
properties), else 512 px; RGBA premultiplied pixels composited over the slide's background
colour (white when it has none), as OpenSlide's own viewers show them; the pixel size from
`openslide.mpp-x/y` (micrometres); the slide's associated images (label, macro, thumbnail)
in `associated`, decoded when first asked for (an undecodable or huge one is left out), for
viewers to show beside it. Without the extra installed, one error names it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .chunks import lazy_array, window_of
from .errors import ImageIOError
from .image import MultiscaleImage

EXTRA = "pip install 'napari-xt[openslide]'"
# formats only OpenSlide reads here (TIFF-based slides go to tifffile)
SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide")
ASSOCIATED_MAX = 16 * 2**20  # pixels: larger "associated" images are not small pictures


def _module():
    try:
        import openslide
    except ImportError as err:  # the library or its binary wheel is missing
        raise ImageIOError(f"reading this slide needs OpenSlide ({EXTRA}): {err}") from err
    return openslide


class _Level:
    """One slide level as an array-like (H, W, 3) uint8 for `lazy_array`."""

    def __init__(self, slide: Any, level: int, background: tuple[int, int, int],
                 lock: threading.Lock) -> None:
        self.slide, self.level = slide, level
        w, h = slide.level_dimensions[level]
        self.shape = (int(h), int(w), 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self.downsample = float(slide.level_downsamples[level])
        self.background = np.asarray(background, np.float32)
        self._lock = lock

    def __getitem__(self, key: Any) -> np.ndarray:
        y0, y1, x0, x1, rest = window_of(key, self.shape)
        h, w = y1 - y0, x1 - x0
        if h <= 0 or w <= 0:
            return np.zeros((h, w, 3), np.uint8)[rest]
        origin = (int(round(x0 * self.downsample)), int(round(y0 * self.downsample)))
        with self._lock:  # one read at a time per slide handle
            rgba = np.asarray(self.slide.read_region(origin, self.level, (w, h)))
        return _composite(rgba, self.background)[rest]


class LazyAssociated(Mapping):
    """A slide's associated images by name, each decoded on first access (RGB uint8); the
    names list only those OpenSlide can decode within `ASSOCIATED_MAX` pixels (a damaged
    one is dropped when it fails, never failing the slide)."""

    def __init__(self, slide: Any, background: tuple[int, int, int]) -> None:
        self._slide, self._background = slide, np.asarray(background, np.float32)
        self._names = [n for n in slide.associated_images
                       if _associated_size(slide, n) <= ASSOCIATED_MAX]
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._cache:
            try:
                image = self._slide.associated_images[name]
                self._cache[name] = _composite(np.asarray(image.convert("RGBA")),
                                               self._background)
            except Exception as err:  # noqa: BLE001 - OpenSlideError, a corrupt JPEG, ...
                self._names.remove(name)
                raise KeyError(name) from err
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def items(self):  # skips the ones that fail to decode
        """(name, image) pairs of every associated image that decodes; the ones that
        fail are left out (and dropped from the names)."""
        out = []
        for name in list(self._names):
            try:
                out.append((name, self[name]))
            except KeyError:
                continue
        return out


def _associated_size(slide: Any, name: str) -> int:
    try:
        w, h = slide.properties.get(f"openslide.associated.{name}.width"), \
            slide.properties.get(f"openslide.associated.{name}.height")
        return int(w) * int(h)
    except (TypeError, ValueError):
        return 0


def _composite(rgba: np.ndarray, background: np.ndarray) -> np.ndarray:
    """OpenSlide's premultiplied RGBA (h, w, 4) over an RGB background -> RGB uint8."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    if bool((alpha == 1.0).all()):
        return np.ascontiguousarray(rgba[..., :3])
    rgb = rgba[..., :3].astype(np.float32) + background * (1.0 - alpha)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _background(props: Any) -> tuple[int, int, int]:
    text = str(props.get("openslide.background-color", "FFFFFF") or "FFFFFF")
    try:
        return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)
    except ValueError:
        return 255, 255, 255


def _tile(props: Any, level: int) -> tuple[int, int]:
    try:
        return (int(props[f"openslide.level[{level}].tile-height"]),
                int(props[f"openslide.level[{level}].tile-width"]))
    except (KeyError, ValueError):
        return 512, 512


def open_openslide(path: str | os.PathLike, *, where: str | None = None) -> MultiscaleImage:
    """The slide at `path` read through OpenSlide (see the module docstring)."""
    where = where or str(path)
    openslide = _module()
    if not Path(path).is_file():
        raise ImageIOError(f"{where}: no such file")
    try:
        slide = openslide.OpenSlide(str(path))
    except Exception as err:  # OpenSlideUnsupportedFormatError, OpenSlideError, OSError
        raise ImageIOError(f"{where}: OpenSlide cannot read it: {type(err).__name__}: "
                           f"{err}") from err
    props = slide.properties
    background = _background(props)
    lock = threading.Lock()
    levels = []
    for level in range(slide.level_count):
        arr = _Level(slide, level, background, lock)
        th, tw = _tile(props, level)
        chunks = (min(th, arr.shape[0]), min(tw, arr.shape[1]), 3)
        levels.append(lazy_array(arr, f"{where} level {level}", chunks))
    pixel_size = None
    try:
        pixel_size = (float(props["openslide.mpp-y"]), float(props["openslide.mpp-x"]))
    except (KeyError, ValueError):
        pass
    associated = LazyAssociated(slide, background)
    vendor = props.get("openslide.vendor", "slide")
    return MultiscaleImage(levels, "YXC", np.uint8, pixel_size=pixel_size,
                           unit="micrometer" if pixel_size else None,
                           source=f"OpenSlide {vendor} ({where})",
                           paths=(os.path.abspath(path),), resources=(slide,),
                           associated=associated)
