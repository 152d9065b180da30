"""Training data: synthetic scenes or (image, mask, points) pairs stored in zarr.

A training pair store is a zarr group with

- ``image``: (C, H, W) or (H, W) array (any numeric dtype; read as float32),
- ``mask``: (H, W) integer class map (``ignore_index``, 255 by default, is not scored),
- optionally ``points``: a group of 1-D arrays ``y`` and ``x`` (pixel centres of detection
  targets) and optionally ``size`` (object length in pixels).
`write_pair` writes one. Crops are read lazily: only the crop's chunks are touched.

A `Sample` holds a normalized image (C, H, W) float32, the mask (H, W) int64 and the points
(N, 2) float (y, x) with sizes (N,). `collate` stacks samples into a batch of tensors with the
detection targets rendered as stride-1 maps.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .synthetic import SceneConfig, SyntheticScene

IGNORE_INDEX = 255


@dataclass(frozen=True)
class Normalization:
    """Per-channel `(x - mean) / std` applied to images before the model sees them."""

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """image (C, H, W) -> normalized (C, H, W) float32."""
        c = image.shape[0]
        mean = np.resize(np.asarray(self.mean, np.float32), c)[:, None, None]
        std = np.resize(np.asarray(self.std, np.float32), c)[:, None, None]
        return ((image.astype(np.float32) - mean) / std).astype(np.float32)

    def to_dict(self) -> dict:
        """`{"mean": [...], "std": [...]}`, as saved in checkpoints."""
        return {"mean": list(self.mean), "std": list(self.std)}


@dataclass
class Sample:
    """One training example: `image` (C, H, W) float32, normalised; `mask` (H, W) int64
    class labels (`IGNORE_INDEX` where there is no truth); `points` (N, 2) float64 (y, x)
    pixel coordinates of the detection targets and their `sizes` (N,)."""

    image: np.ndarray  # (C, H, W) float32, normalized
    mask: np.ndarray  # (H, W) int64
    points: np.ndarray  # (N, 2) float64 (y, x)
    sizes: np.ndarray  # (N,) float64


class SyntheticDataset:
    """Scene `i` is the synthetic scene of seed `first_seed + i`; vessels are the points."""

    def __init__(
        self,
        scene: SceneConfig,
        first_seed: int,
        count: int,
        normalization: Normalization,
    ) -> None:
        self.scene = scene
        self.first_seed = int(first_seed)
        self.count = int(count)
        self.normalization = normalization

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.count:
            raise IndexError(index)
        scene = SyntheticScene(self.first_seed + index, self.scene)
        image, mask = scene.read()
        targets = scene.targets()
        vessel = targets["cls"] == 1
        points = np.stack([targets["y"][vessel], targets["x"][vessel]], axis=-1).reshape(-1, 2)
        return Sample(self.normalization(image), mask.astype(np.int64), points,
                      targets["size"][vessel])


def _open_group(path: str | os.PathLike, mode: str = "r"):
    import zarr

    return zarr.open_group(str(path), mode=mode)


def write_pair(
    path: str | os.PathLike,
    image: np.ndarray,
    mask: np.ndarray,
    points: np.ndarray | None = None,
    sizes: np.ndarray | None = None,
    chunk: int = 256,
) -> Path:
    """Store image (C, H, W) or (H, W), mask (H, W) and points (N, 2) (y, x) as a training pair."""
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.shape[-2:] != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} differ in size")
    group = _open_group(path, mode="w")
    chunks = (*image.shape[:-2], chunk, chunk)
    group.create_array("image", data=image, chunks=tuple(min(a, b) for a, b in
                                                          zip(chunks, image.shape)))
    group.create_array("mask", data=mask, chunks=(min(chunk, mask.shape[0]),
                                                  min(chunk, mask.shape[1])))
    if points is not None:
        points = np.asarray(points, np.float64).reshape(-1, 2)
        table = group.create_group("points")
        table.create_array("y", data=points[:, 0])
        table.create_array("x", data=points[:, 1])
        if sizes is not None:
            table.create_array("size", data=np.asarray(sizes, np.float64).reshape(-1))
    return Path(path)


def _store_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """A folder of ``*.zarr`` stores, one store, or a list of either."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "image").exists() and (p / "mask").exists():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix == ".zarr"))
        else:
            raise FileNotFoundError(f"no training pair store at {p}")
    if not out:
        raise FileNotFoundError(f"no training pair stores in {[str(p) for p in paths]}")
    return out


class ZarrPairDataset:
    """Crops of training pairs stored in zarr (see module doc).

    With `crop_size`, item `i` is a crop of store `i % len(stores)` at a position drawn from
    (seed, i): deterministic, any number of items (`length`). Without it, item `i` is the whole
    store `i`. Crops overhanging a small image are zero padded with mask `IGNORE_INDEX`.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        normalization: Normalization,
        crop_size: int | None = None,
        length: int | None = None,
        seed: int = 0,
    ) -> None:
        self.paths = _store_paths(paths)
        self.normalization = normalization
        self.crop_size = crop_size
        self.seed = int(seed)
        self.length = len(self.paths) if crop_size is None else int(length or len(self.paths))
        self._groups = [_open_group(p) for p in self.paths]
        for p, g in zip(self.paths, self._groups):
            if "image" not in g or "mask" not in g:
                raise ValueError(f"{p} needs 'image' and 'mask' arrays")
            if g["image"].shape[-2:] != g["mask"].shape:
                raise ValueError(f"{p}: image {g['image'].shape} and mask {g['mask'].shape} differ")

    def __len__(self) -> int:
        return self.length

    def _points(self, group) -> tuple[np.ndarray, np.ndarray]:
        if "points" not in group:
            return np.zeros((0, 2)), np.zeros(0)
        table = group["points"]
        y = np.asarray(table["y"][...], np.float64)
        x = np.asarray(table["x"][...], np.float64)
        size = np.asarray(table["size"][...], np.float64) if "size" in table else np.zeros_like(y)
        return np.stack([y, x], axis=-1).reshape(-1, 2), size

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.length:
            raise IndexError(index)
        group = self._groups[index % len(self._groups)]
        h, w = group["mask"].shape
        if self.crop_size is None:
            y0, x0, ch, cw = 0, 0, h, w
        else:
            rng = np.random.default_rng([self.seed, index])
            ch = cw = self.crop_size
            y0 = int(rng.integers(0, max(1, h - ch + 1)))
            x0 = int(rng.integers(0, max(1, w - cw + 1)))
        y1, x1 = min(h, y0 + ch), min(w, x0 + cw)
        img = np.asarray(group["image"][..., y0:y1, x0:x1], np.float32)
        if img.ndim == 2:
            img = img[None]
        msk = np.asarray(group["mask"][y0:y1, x0:x1]).astype(np.int64)
        image = np.zeros((img.shape[0], ch, cw), np.float32)
        mask = np.full((ch, cw), IGNORE_INDEX, np.int64)
        image[:, : y1 - y0, : x1 - x0] = self.normalization(img)
        mask[: y1 - y0, : x1 - x0] = msk
        points, sizes = self._points(group)
        inside = (
            (points[:, 0] >= y0) & (points[:, 0] < y1) & (points[:, 1] >= x0) & (points[:, 1] < x1)
        )
        return Sample(image, mask, points[inside] - [y0, x0], sizes[inside])


def target_maps(
    points: np.ndarray, sizes: np.ndarray, shape: tuple[int, int], sigma: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detection targets at stride 1.

    Returns centre heatmap (H, W) (max of Gaussians of `sigma` px, exactly 1 at each centre
    pixel), size (H, W) (object size at centre pixels, 0 elsewhere) and the size weight (H, W)
    (1 at centre pixels).
    """
    h, w = shape
    heat = np.zeros(shape, np.float32)
    size = np.zeros(shape, np.float32)
    weight = np.zeros(shape, np.float32)
    reach = int(np.ceil(3 * sigma))
    for (y, x), s in zip(np.asarray(points).reshape(-1, 2), np.asarray(sizes).reshape(-1)):
        cy, cx = int(np.clip(np.floor(y), 0, h - 1)), int(np.clip(np.floor(x), 0, w - 1))
        ya, yb = max(0, cy - reach), min(h, cy + reach + 1)
        xa, xb = max(0, cx - reach), min(w, cx + reach + 1)
        yy, xx = np.mgrid[ya:yb, xa:xb]
        g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)).astype(np.float32)
        heat[ya:yb, xa:xb] = np.maximum(heat[ya:yb, xa:xb], g)
        size[cy, cx] = s
        weight[cy, cx] = 1.0
    return heat, size, weight


def collate(samples: Sequence[Sample], sigma: float = 2.0) -> dict:
    """Stack samples: image (B, C, H, W), mask (B, H, W) int64, centre/size/size_weight
    (B, 1, H, W) float32, and `points` / `sizes` as lists of numpy arrays."""
    maps = [target_maps(s.points, s.sizes, s.mask.shape, sigma) for s in samples]
    return {
        "image": torch.from_numpy(np.stack([s.image for s in samples])),
        "mask": torch.from_numpy(np.stack([s.mask for s in samples])),
        "centre": torch.from_numpy(np.stack([m[0] for m in maps]))[:, None],
        "size": torch.from_numpy(np.stack([m[1] for m in maps]))[:, None],
        "size_weight": torch.from_numpy(np.stack([m[2] for m in maps]))[:, None],
        "points": [s.points for s in samples],
        "sizes": [s.sizes for s in samples],
    }
