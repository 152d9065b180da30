"""Images the run widget can process, read from the viewer's layers (main thread only).

Each 2-D Image layer is a choice (grey, RGB, multiscale: a level is picked separately). Image
layers that napari split from one multi-channel file (same `metadata["source"]`, same shape,
no RGB), such as the VV and VH channels of a SAR scene, are also offered together as one
`C x Y x X` stack, because multi-channel models need all channels at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ImageChoice:
    """A runnable image: one layer, or several same-shape channel layers stacked."""

    label: str
    layers: tuple  # napari Image layers, first one gives scale/translate/path

    @property
    def layer(self):
        return self.layers[0]

    @property
    def multiscale(self) -> bool:
        return bool(self.layer.multiscale)

    def level_shapes(self) -> list[tuple[int, int]]:
        """(height, width) of every level."""
        rgb = bool(self.layer.rgb)
        levels = self.layer.data if self.multiscale else [self.layer.data]
        return [tuple(int(n) for n in (lv.shape[-3:-1] if rgb else lv.shape[-2:]))
                for lv in levels]

    def level_array(self, level: int):
        """(array, axes) of `level`: YX, YXC (RGB layers or stacks are CYX) — lazy."""
        def one(layer):
            return layer.data[level] if layer.multiscale else layer.data

        if len(self.layers) == 1:
            return one(self.layer), "YXC" if self.layer.rgb else "YX"
        import dask.array as da

        return da.stack([da.asarray(one(lay)) for lay in self.layers], axis=0), "CYX"

    def pyramid(self):
        """All levels as a `MultiscaleImage` (lazy), so a run on a level knows where it lies
        in the full image: its provenance records the level, the detection table is in
        level-0 pixels and the labels carry the level's world pixel size."""
        from napari_xt.io import from_arrays

        n = len(self.level_shapes())
        arrays, axes = zip(*(self.level_array(i) for i in range(n)))
        scale = tuple(float(v) for v in self.layer.scale[-2:])
        return from_arrays(list(arrays), axes=axes[0], pixel_size=scale,
                           source=self.source_path() or self.label)

    @property
    def channels(self) -> int:
        if len(self.layers) > 1:
            return len(self.layers)
        if self.layer.rgb:
            data = self.layer.data[0] if self.multiscale else self.layer.data
            return int(data.shape[-1])
        return 1

    def level_factor(self, level: int) -> tuple[float, float]:
        shapes = self.level_shapes()
        (h0, w0), (h, w) = shapes[0], shapes[level]
        return h0 / h, w0 / w

    def level_transform(self, level: int) -> tuple[tuple[float, float], tuple[float, float]]:
        """World (scale, translate) of a `level` pixel, as napari draws that level: a pixel
        of a level downsampled by f covers level-0 pixels f*i .. f*i + f - 1, so its centre
        lies (f - 1) / 2 level-0 pixels beyond f*i (see `level_offset`)."""
        from napari_xt._napari_io import level_offset

        return level_offset(self.level_factor(level), self.layer.scale[-2:],
                            self.layer.translate[-2:])

    def source_path(self) -> str | None:
        """The file the layer came from, if any (napari's `source.path` or reader metadata)."""
        path = getattr(getattr(self.layer, "source", None), "path", None)
        if path:
            return str(path)
        meta = self.layer.metadata.get("source") if isinstance(self.layer.metadata, dict) else None
        if isinstance(meta, str) and meta and Path(meta).exists():
            return meta
        return None


def _is_2d_image(layer) -> bool:
    from napari.layers import Image

    if not isinstance(layer, Image):
        return False
    return layer.ndim == 2


def image_choices(layers) -> list[ImageChoice]:
    """All runnable images among `layers` (viewer.layers): channel stacks first (a SAR
    scene's VV + VH, as multi-channel models need them), then each layer, in layer order."""
    images = [lay for lay in layers if _is_2d_image(lay)]
    singles = [ImageChoice(lay.name, (lay,)) for lay in images]
    choices: list[ImageChoice] = []
    groups: dict[tuple, list] = {}
    for lay in images:
        source = lay.metadata.get("source") if isinstance(lay.metadata, dict) else None
        if source and not lay.rgb:
            shape = tuple(np.shape(lay.data[0] if lay.multiscale else lay.data))
            groups.setdefault((str(source), shape, bool(lay.multiscale)), []).append(lay)
    for group in groups.values():
        if len(group) > 1:
            label = " + ".join(lay.name for lay in group) + f" ({len(group)} channels)"
            choices.append(ImageChoice(label, tuple(group)))
    return choices + singles
