"""The demo task's synthetic scene (`synthetic.SyntheticScene`) as a lazy image pyramid
with its truth: what napari's sample "Synthetic SAR scene" opens, and what the built-in
demo model was trained on.

Only the scene's layout (its classes at `layout_cell` resolution) is built when the scene
is made; pixels are rendered per dask chunk when they are read, so opening costs the layout
alone (0.1 s at 2048 x 2048). Level 0 is the scene at the resolution the demo model learned;
each coarser level averages 2 x 2 pixels of the one above in linear intensity (a real
multi-look pyramid, exact but computed from level 0). The truth is a label pyramid
(land / sea / lake, nearest sample of each level pixel's block) and the vessel targets in
level-0 pixel coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np

from napari_xt.io.image import MultiscaleImage
from napari_xt.io.pyramid import pyramid_shapes

from .synthetic import CLASS_NAMES, SceneConfig, SyntheticScene

CLASS_COLORS = {0: (150, 120, 70, 255), 1: (40, 110, 230, 255), 2: (90, 220, 230, 255)}


@dataclass(frozen=True)
class SceneImage:
    """A demo scene: `image` (CYX dB, VV and VH), its truth `labels` (one dask array per
    level, classes `CLASS_NAMES`) and `vessels` (level-0 pixel coordinates y, x and size)."""

    scene: SyntheticScene
    image: MultiscaleImage
    labels: list[da.Array]
    vessels: dict[str, np.ndarray]

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the label values 0, 1, 2 (`CLASS_NAMES`: land, sea, lake)."""
        return CLASS_NAMES


def _split(size: int, chunk: int) -> tuple[int, ...]:
    full, rest = divmod(size, chunk)
    return (chunk,) * full + ((rest,) if rest else ())


def _image_block(scene: SyntheticScene, chunk: int, block_id=None, block_info=None):
    (_, iy, ix), (c, h, w) = block_id, block_info[None]["chunk-shape"]
    y0, x0 = iy * chunk, ix * chunk
    return scene.read(y0, x0, y0 + h, x0 + w)[0][:c]


def _mask_block(scene: SyntheticScene, factor: int, chunk: int, block_id=None,
                block_info=None):
    """Classes of level pixels: the layout at each pixel's nearest level-0 sample."""
    (iy, ix), (h, w) = block_id, block_info[None]["chunk-shape"]
    c = scene.config.layout_cell
    ys = ((np.arange(iy * chunk, iy * chunk + h) * factor) + factor // 2) // c
    xs = ((np.arange(ix * chunk, ix * chunk + w) * factor) + factor // 2) // c
    return scene.layout[ys[:, None], xs[None, :]]


def _mean_db(level: da.Array, chunk: int) -> da.Array:
    """The next level: 2 x 2 means of linear intensity, back in dB."""
    _, h, w = level.shape
    lin = 10.0 ** (level[:, : h - h % 2, : w - w % 2].astype(np.float64) / 10.0)
    mean = da.coarsen(np.mean, lin, {1: 2, 2: 2})
    return (10.0 * da.log10(mean)).astype(np.float32).rechunk((-1, chunk, chunk))


def scene_image(size: int = 2048, seed: int = 0, *, width: int | None = None,
                chunk: int = 512, min_size: int = 512) -> SceneImage:
    """The demo task's scene `seed` at `size` x `width` (default square) pixels, lazily."""
    height, width = int(size), int(size if width is None else width)
    scene = SyntheticScene(seed, SceneConfig(height=height, width=width))
    channels = scene.config.channels
    shapes = pyramid_shapes(height, width, min_size=min_size)
    levels = [da.map_blocks(
        _image_block, scene, chunk, dtype=np.float32,
        chunks=((channels,), _split(height, chunk), _split(width, chunk)),
        meta=np.empty((0, 0, 0), np.float32),
        name=f"xt-demo-scene-{seed}-{height}x{width}-{chunk}")]
    for _ in shapes[1:]:
        levels.append(_mean_db(levels[-1], chunk))
    labels = [da.map_blocks(
        _mask_block, scene, 2 ** i, chunk, dtype=np.uint8,
        chunks=(_split(h, chunk), _split(w, chunk)), meta=np.empty((0, 0), np.uint8),
        name=f"xt-demo-truth-{seed}-{height}x{width}-{chunk}-{i}")
        for i, (h, w) in enumerate((lv.shape[1], lv.shape[2]) for lv in levels)]
    targets = scene.targets()
    vessel = targets["cls"] == 1
    # targets are centred at pixel index + 0.5 (as rendered); napari centres pixels at i
    vessels = {"y": targets["y"][vessel] - 0.5, "x": targets["x"][vessel] - 0.5,
               "size": targets["size"][vessel]}
    names = ("VV", "VH")[:channels]
    image = MultiscaleImage(
        levels, "CYX", np.float32, channel_names=names, channel_colors=("FFFFFF",) * channels,
        contrast_limits=((-25.0, 5.0), (-32.0, -5.0))[:channels],
        source=f"synthetic SAR demo scene {height}x{width} seed {seed}")
    return SceneImage(scene, image, labels, vessels)
