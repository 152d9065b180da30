"""What a run writes: the dense map layout and the finalisation of regions.

Dense heads give named maps (`model.cfg.head.maps`). Each crop's maps are turned into
blendable quantities first (softmax over the class logits, sigmoid of centre/heatmap
logits, raw values otherwise), multiplied by the crop window and summed per region; a final
region is `sum / weight`. From it: labels = argmax of the class probabilities (uint8, or
uint16 above 255 classes), probabilities (float16), and for detections the centre heatmap
and size map (float32), from which the store takes the peaks (equal to max-pool NMS over the
whole image, `engine.store.peaks`). Non-finite input pixels are 0 in labels, probabilities
and heatmaps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

OUTPUT_KINDS = ("labels", "probabilities", "detections", "classification")


@dataclass(frozen=True)
class MapLayout:
    """Channel slices of the blended per-region stack (C_tot, S, S)."""

    transforms: tuple[tuple[str, int, int, str], ...]  # (map name, start, stop, transform)
    probs: tuple[int, int] | None  # class probabilities (segmentation)
    heat: tuple[int, int] | None  # centre / heatmap scores (detection)
    size: tuple[int, int] | None
    channels: int
    num_classes: int
    label_dtype: np.dtype = field(default=np.dtype(np.uint8))


def map_layout(head_cfg: Any) -> MapLayout:
    """The `MapLayout` of a dense head's maps (`head_cfg.maps`: (name, channels) in order):
    "logits" get a softmax (class probabilities), "heatmap" / "centre" / "center" a sigmoid
    (detection scores), "size" and any other map stay raw. Labels are uint8 up to 255 classes,
    uint16 above."""
    transforms, start = [], 0
    probs = heat = size = None
    for name, k in head_cfg.maps:
        kind = "raw"
        if name == "logits":
            kind, probs = "softmax", (start, start + k)
        elif name in ("heatmap", "centre", "center"):
            kind, heat = "sigmoid", (start, start + k)
        elif name == "size":
            size = (start, start + k)
        transforms.append((name, start, start + k, kind))
        start += k
    dtype = np.dtype(np.uint8 if head_cfg.num_classes <= 255 else np.uint16)
    return MapLayout(tuple(transforms), probs, heat, size, start, head_cfg.num_classes, dtype)


def blendable(maps: dict[str, torch.Tensor], layout: MapLayout) -> torch.Tensor:
    """{name: (R, K_i, S, S)} logits -> (R, C_tot, S, S) float32 values to average."""
    parts = []
    for name, _, _, kind in layout.transforms:
        x = maps[name].float()
        if kind == "softmax":
            x = torch.softmax(x, dim=1)
        elif kind == "sigmoid":
            x = torch.sigmoid(x)
        parts.append(x)
    return torch.cat(parts, dim=1)


def finalize_regions(values: torch.Tensor, bad: list[np.ndarray | None], layout: MapLayout,
                     outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
    """values (R, C_tot, S, S) blended maps of R final regions (already divided by their
    window weights), bad: per region an (S, S) mask of non-finite input pixels or None
    -> numpy tiles: labels (R, S, S), probabilities (R, K, S, S) float16, heat
    (R, K_h [+ 1 size], S, S) float32. One pass for the whole batch."""
    if any(m is not None for m in bad):
        mask = torch.zeros((values.shape[0], *values.shape[-2:]), dtype=torch.bool,
                           device=values.device)
        for n, m in enumerate(bad):
            if m is not None:
                mask[n] = torch.from_numpy(m).to(values.device)
        values = values.masked_fill(mask[:, None], 0.0)
    else:
        mask = None
    tiles: dict[str, np.ndarray] = {}
    if layout.probs is not None:
        probs = values[:, layout.probs[0]:layout.probs[1]]
        if "labels" in outputs:
            labels = probs.max(1).indices  # = argmax (first maximum), many times faster
            if mask is not None:
                labels = labels.masked_fill(mask, 0)
            tiles["labels"] = labels.to(torch.int32).cpu().numpy().astype(layout.label_dtype)
        if "probabilities" in outputs:
            tiles["probabilities"] = probs.half().cpu().numpy()
    if "detections" in outputs and layout.heat is not None:
        parts = [values[:, layout.heat[0]:layout.heat[1]]]
        if layout.size is not None:
            parts.append(values[:, layout.size[0]:layout.size[0] + 1])
        heat = torch.cat(parts, 1)
        tiles["heat"] = heat.float().cpu().numpy()
    return tiles
