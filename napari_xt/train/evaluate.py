"""Held-out evaluation: per-class IoU, mIoU (all classes and the context-dependent ones) and
detection precision / recall / F1 with greedy distance matching."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .data import Sample
from .metrics import ConfusionMatrix, DetectionCounts


@torch.no_grad()
def predict_maps(model: torch.nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """image (B, C, H, W) normalized -> {name: (B, K, H, W)} on the CPU, eval mode."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        maps = model(image.to(device))
    finally:
        model.train(was_training)
    return {k: v.float().cpu() for k, v in maps.items()}


def predicted_points(
    maps: dict[str, torch.Tensor],
    threshold: float,
    min_distance: int,
    centre_map: str = "centre",
    size_map: str = "size",
) -> np.ndarray:
    """Points (POINT_DTYPE: batch, y, x, class, score, size) from a centre-logit map."""
    from napari_xt.model.heads import points_from_heatmap

    return points_from_heatmap(
        torch.sigmoid(maps[centre_map]), maps.get(size_map), threshold=threshold,
        min_distance=min_distance,
    )


def evaluate(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    num_classes: int,
    class_names: Sequence[str] | None = None,
    context_classes: Sequence[int] = (),
    radius: float = 4.0,
    threshold: float = 0.3,
    min_distance: int = 3,
    batch_size: int = 2,
    centre_map: str = "centre",
    size_map: str = "size",
) -> dict[str, float]:
    """Metrics of `model` on `samples` (whole images; detection when the model has the
    `centre_map` output, sizes from `size_map`: the names the loss trained them under).

    Returns `iou_<name>` per class, miou, miou_context (mean over `context_classes`),
    pixel_accuracy and, for detection, det_precision, det_recall, det_f1.
    """
    confusion = ConfusionMatrix(num_classes)
    detection = DetectionCounts(radius=radius)
    has_centre = False
    for start in range(0, len(samples), batch_size):
        chunk = list(samples[start : start + batch_size])
        image = torch.from_numpy(np.stack([s.image for s in chunk]))  # (B, C, H, W)
        maps = predict_maps(model, image)
        pred = maps["logits"].argmax(dim=1).numpy()  # (B, H, W)
        for s, p in zip(chunk, pred):
            confusion.update(s.mask, p)
        if centre_map in maps:
            has_centre = True
            points = predicted_points(maps, threshold, min_distance, centre_map, size_map)
            for b, s in enumerate(chunk):
                mine = points[points["batch"] == b]
                detection.update(
                    np.stack([mine["y"] + 0.5, mine["x"] + 0.5], axis=-1), mine["score"], s.points
                )
    names = list(class_names or [f"class_{k}" for k in range(num_classes)])
    iou = confusion.iou()
    metrics = {f"iou_{n}": float(v) for n, v in zip(names, iou)}
    metrics["miou"] = confusion.miou()
    if context_classes:
        metrics["miou_context"] = confusion.miou(list(context_classes))
    metrics["pixel_accuracy"] = confusion.accuracy()
    if has_centre:
        metrics.update(
            det_precision=detection.precision, det_recall=detection.recall, det_f1=detection.f1,
            det_tp=float(detection.tp), det_fp=float(detection.fp), det_fn=float(detection.fn),
        )
    return metrics
