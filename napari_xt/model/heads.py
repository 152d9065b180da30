"""Heads: class logits from the cls token, stride-1 dense maps, and points from heatmaps.

- `ClassificationHead`: cls token (B, D) -> logits (B, K). Module `cls` =
  Sequential(LayerNorm(D), Linear(D, K)), keys `cls.0.*`, `cls.1.*` as in official xT.
- `SegmentationHead`: UNet-style decoder over the multi-level region features, the deepest level
  being the contextualized tokens reshaped to (N, D, h, w). It upsamples step by step through
  every shallower level (skip connection: concatenation) and on down to output stride 1, then
  gives one 1x1 convolution per output map: dict name -> (N, K_i, S, S). The primary map is
  `logits` (num_classes channels) for segmentation.
- `DetectionHead`: the same decoder with the primary map `heatmap` (per-class centre logits);
  `points()` turns its maps into points through `points_from_heatmap`.

Points are a numpy structured array of dtype `POINT_DTYPE`: fields batch, y, x (pixel indices,
float64 so offsets and scales apply in place), class, score, size (NaN without a size map).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HEAD_KINDS = ("classification", "segmentation", "detection")
PRIMARY_MAP = {"segmentation": "logits", "detection": "heatmap"}
POINT_DTYPE = np.dtype(
    [("batch", np.int64), ("y", np.float64), ("x", np.float64), ("class", np.int64),
     ("score", np.float32), ("size", np.float32)]
)


@dataclass(frozen=True)
class HeadConfig:
    """What the model predicts.

    outputs: extra maps as (name, channels), e.g. (("centre", 1), ("size", 1)).
    decoder_channels: one width per upsampling step of the decoder, deepest first; empty means
    automatic (16 x target stride, clamped to [16, 256]).
    dim: width D of the contextualized tokens.
    class_names: names of the classes (label values 0..K-1), shown in result layers and
    written into result stores; empty: "class 0", "class 1", ...
    point_names: names of the detection classes of a centre/heatmap map, same rule.
    """

    kind: str = "classification"
    num_classes: int = 2
    outputs: tuple[tuple[str, int], ...] = ()
    decoder_channels: tuple[int, ...] = ()
    dim: int = 768
    class_names: tuple[str, ...] = ()
    point_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {self.kind!r}; expected one of {HEAD_KINDS}")
        for name in ("num_classes", "dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        outputs = tuple((str(n), int(c)) for n, c in self.outputs)
        names = [n for n, _ in outputs]
        primary = PRIMARY_MAP.get(self.kind)
        if len(set(names)) != len(names) or primary in names:
            raise ValueError(f"output names must be unique and not {primary!r}: {names}")
        if any(c <= 0 for _, c in outputs):
            raise ValueError(f"every output needs at least one channel: {outputs}")
        if outputs and self.kind == "classification":
            raise ValueError("extra output maps need a segmentation or detection head")
        channels = tuple(int(c) for c in self.decoder_channels)
        if any(c <= 0 for c in channels):
            raise ValueError(f"decoder_channels must be positive: {channels}")
        object.__setattr__(self, "outputs", outputs)
        object.__setattr__(self, "decoder_channels", channels)
        names = tuple(str(n) for n in self.class_names)
        if names and len(names) != self.num_classes:
            raise ValueError(f"class_names has {len(names)} names for {self.num_classes} "
                             "classes")
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "point_names", tuple(str(n) for n in self.point_names))

    @property
    def maps(self) -> tuple[tuple[str, int], ...]:
        """All dense output maps (name, channels), the primary one first."""
        if self.kind == "classification":
            return ()
        return ((PRIMARY_MAP[self.kind], self.num_classes), *self.outputs)


class ClassificationHead(nn.Module):
    """cls token (B, D) -> logits (B, K). Given tokens (B, N, D), the last one is the cls."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.cls = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K) of cls tokens (B, D), or of tokens (B, N, D) whose last
        one is the cls; raises `ValueError` for other shapes."""
        if x.ndim == 3:
            x = x[:, -1]  # (B, N, D) -> (B, D): the cls token is appended last
        if x.ndim != 2:
            raise ValueError(f"expected a cls token (B, D) or tokens (B, N, D), got {x.shape}")
        return self.cls(x)


def _norm(channels: int) -> nn.GroupNorm:
    # batch-independent normalization: regions stream through in batches of any size
    return nn.GroupNorm(math.gcd(8, channels), channels)


class _DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.conv1(x)))
        return F.gelu(self.norm2(self.conv2(x)))


def _decoder_steps(strides: Sequence[int]) -> list[tuple[int, int | None]]:
    """(target stride, index of the skip level or None) for each upsampling step."""
    steps: list[tuple[int, int | None]] = [(strides[i], i) for i in range(len(strides) - 2, -1, -1)]
    s = strides[0]
    while s > 1:
        s = s // 2 if s % 2 == 0 else 1
        steps.append((s, None))
    return steps


class SegmentationHead(nn.Module):
    """UNet-style decoder to output stride 1.

    forward: features [(N, C_l, S / s_l, S / s_l)] shallow -> deep, the deepest with C = dim
    (contextualized tokens) -> dict name -> (N, K_i, S, S).
    """

    def __init__(
        self,
        cfg: HeadConfig,
        feature_channels: Sequence[int],
        dim: int | None = None,
        feature_strides: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if cfg.kind == "classification":
            raise ValueError("a classification config has no dense maps to decode")
        if not feature_channels:
            raise ValueError("feature_channels must name at least one level")
        n = len(feature_channels)
        strides = list(feature_strides or [2 ** (i + 2) for i in range(n)])
        if len(strides) != n or any(b <= a for a, b in zip(strides, strides[1:])):
            raise ValueError(f"feature_strides {strides} must increase, one per level ({n})")
        self.cfg = cfg
        self.in_channels = [int(c) for c in feature_channels[:-1]] + [int(dim or cfg.dim)]
        self.feature_strides = strides
        self._steps = _decoder_steps(strides)
        widths = cfg.decoder_channels or tuple(max(16, min(256, 16 * t)) for t, _ in self._steps)
        if len(widths) != len(self._steps):
            raise ValueError(
                f"decoder_channels needs {len(self._steps)} widths (one per upsampling step to "
                f"strides {[t for t, _ in self._steps]}), got {len(widths)}"
            )
        blocks, prev = [], self.in_channels[-1]
        for (_, skip), width in zip(self._steps, widths):
            extra = self.in_channels[skip] if skip is not None else 0
            blocks.append(_DecoderBlock(prev + extra, width))
            prev = width
        self.blocks = nn.ModuleList(blocks)
        self.outputs = nn.ModuleDict({name: nn.Conv2d(prev, k, 1) for name, k in cfg.maps})

    def forward(self, features: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Decode `features` [(N, C_l, S / s_l, S / s_l)], shallow to deep, to
        `{name: (N, K_i, S, S)}` (`cfg.maps`); raises `ValueError` when the number of levels or
        their channels do not match the head."""
        if len(features) != len(self.in_channels):
            raise ValueError(
                f"expected {len(self.in_channels)} feature levels, got {len(features)}"
            )
        got = [int(f.shape[1]) for f in features]
        if got != self.in_channels:
            raise ValueError(f"feature channels {got} do not match the head's {self.in_channels}")
        x = features[-1]  # (N, D, h, w)
        h, w = x.shape[-2:]
        full = (h * self.feature_strides[-1], w * self.feature_strides[-1])  # (S, S)
        for (stride, skip), block in zip(self._steps, self.blocks):
            if skip is not None:
                size = tuple(features[skip].shape[-2:])
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                x = torch.cat([x, features[skip]], dim=1)
            else:
                size = (full[0] // stride, full[1] // stride)
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x = block(x)
        return {name: conv(x) for name, conv in self.outputs.items()}  # (N, K_i, S, S) each


class DetectionHead(SegmentationHead):
    """Stride-1 maps with a per-class centre `heatmap` (logits) -> points."""

    def points(
        self,
        maps: Mapping[str, torch.Tensor],
        threshold: float = 0.5,
        min_distance: int = 2,
        max_points: int | None = None,
        size_map: str | None = "size",
    ) -> np.ndarray:
        """Points of `POINT_DTYPE` from `forward`'s maps (sigmoid of the heatmap as score)."""
        sizes = maps.get(size_map) if size_map else None
        return points_from_heatmap(
            torch.sigmoid(maps["heatmap"]), sizes, threshold, min_distance, max_points
        )


def build_head(
    cfg: HeadConfig,
    feature_channels: Sequence[int],
    dim: int | None = None,
    feature_strides: Sequence[int] | None = None,
) -> nn.Module:
    """Head for `cfg.kind`; `dim` (default cfg.dim) is the width of the contextualized tokens."""
    dim = int(dim or cfg.dim)
    if cfg.kind == "classification":
        return ClassificationHead(dim, cfg.num_classes)
    cls = DetectionHead if cfg.kind == "detection" else SegmentationHead
    return cls(cfg, feature_channels, dim, feature_strides)


def _as_batched(name: str, a: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(a).detach()
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ValueError(f"{name} must be (K, H, W) or (B, K, H, W), got {tuple(t.shape)}")
    return t.float()


def points_from_heatmap(
    heatmap: torch.Tensor | np.ndarray,
    size_map: torch.Tensor | np.ndarray | None = None,
    threshold: float = 0.5,
    min_distance: int = 2,
    max_points: int | None = None,
    per_class: bool = True,
) -> np.ndarray:
    """Local maxima of a score map as points.

    heatmap: (K, H, W) or (B, K, H, W) scores (e.g. sigmoid of centre logits).
    size_map: (1 | K, H, W) or (B, 1 | K, H, W), read at each point (per class when K maps).
    A point is a pixel >= threshold that is the maximum of its (2 * min_distance + 1)^2
    window (max-pool NMS); on a plateau only its first pixel in raster order is kept, so kept
    points of one class are more than min_distance apart (Chebyshev). per_class=False
    suppresses across classes (each pixel's best class). At most max_points per batch item.
    Returns a structured array (POINT_DTYPE) sorted by batch, score (descending), class, y, x.
    """
    h = _as_batched("heatmap", heatmap)  # (B, K, H, W)
    if isinstance(min_distance, bool) or int(min_distance) != min_distance or min_distance < 0:
        raise ValueError(f"min_distance must be a non-negative integer, got {min_distance!r}")
    if max_points is not None and max_points < 0:
        raise ValueError(f"max_points must be >= 0, got {max_points}")
    md = int(min_distance)
    b, k, height, width = h.shape
    classes = None
    if not per_class:
        h, classes = h.max(dim=1, keepdim=True)  # (B, 1, H, W) score and best class
    keep = h >= threshold
    if md > 0:
        window = 2 * md + 1
        keep &= h == F.max_pool2d(h, window, stride=1, padding=md)
        dtype = torch.float32 if height * width < 2**24 else torch.float64
        order = torch.arange(height * width, device=h.device, dtype=dtype).view(1, 1, height, width)
        key = (-order).expand_as(h).masked_fill(~keep, -math.inf)  # first pixel wins a plateau
        keep &= key == F.max_pool2d(key, window, stride=1, padding=md)
    bi, ci, yi, xi = keep.nonzero(as_tuple=True)
    score = h[bi, ci, yi, xi]
    if classes is not None:
        ci = classes[bi, 0, yi, xi]
    if size_map is not None:
        sm = _as_batched("size_map", size_map).to(h.device)
        if sm.shape[0] != b or sm.shape[-2:] != (height, width) or sm.shape[1] not in (1, k):
            raise ValueError(
                f"size_map {tuple(sm.shape)} does not fit heatmap {(b, k, height, width)}"
            )
        size = sm[bi, ci if sm.shape[1] == k else torch.zeros_like(ci), yi, xi]
    else:
        size = torch.full_like(score, math.nan)
    out = np.empty(len(score), dtype=POINT_DTYPE)
    for name, values in zip(("batch", "y", "x", "class", "score", "size"),
                            (bi, yi, xi, ci, score, size)):
        out[name] = values.cpu().numpy()
    out = out[np.lexsort((out["x"], out["y"], out["class"], -out["score"], out["batch"]))]
    if max_points is not None:
        rank = np.arange(len(out)) - np.searchsorted(out["batch"], out["batch"])
        out = out[rank < max_points]
    return out
