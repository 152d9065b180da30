"""Validation metrics: per-class IoU / mIoU from a confusion matrix, detection F1.

Detection matching is greedy by score: predictions are visited from the highest score down and
each takes the nearest still-unmatched ground-truth point within `radius` pixels; a matched
pair is a true positive, other predictions are false positives and unmatched ground truth false
negatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class ConfusionMatrix:
    """Accumulates a (K, K) confusion matrix (rows: truth, cols: prediction)."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), np.int64)

    def update(self, truth: np.ndarray, pred: np.ndarray) -> None:
        """truth, pred: integer arrays of one shape (any layout)."""
        truth = np.asarray(truth).ravel().astype(np.int64)
        pred = np.asarray(pred).ravel().astype(np.int64)
        if truth.shape != pred.shape:
            raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ")
        keep = (truth != self.ignore_index) & (truth >= 0) & (truth < self.num_classes)
        k = self.num_classes
        bad = keep & ((pred < 0) | (pred >= k))
        if bad.any():  # (it would be counted in another class's cell)
            raise ValueError(f"predictions must be classes 0..{k - 1}, got "
                             f"{int(pred[bad][0])}")
        self.matrix += np.bincount(truth[keep] * k + pred[keep], minlength=k * k).reshape(k, k)

    def iou(self) -> np.ndarray:
        """(K,) IoU per class; NaN for a class absent from both truth and prediction."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def miou(self, classes: list[int] | None = None) -> float:
        """Mean IoU over the classes that have one (NaN IoUs are skipped), over `classes`
        only when given; NaN when none has an IoU."""
        iou = self.iou()
        if classes is not None:
            iou = iou[list(classes)]
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def accuracy(self) -> float:
        """Fraction of the counted pixels whose prediction is right; NaN before any
        pixel is counted."""
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")


def match_points(
    pred_yx: np.ndarray, scores: np.ndarray, true_yx: np.ndarray, radius: float
) -> tuple[int, int, int]:
    """Greedy matching within `radius`.

    pred_yx (P, 2), scores (P,), true_yx (T, 2) -> (tp, fp, fn).
    """
    pred_yx = np.asarray(pred_yx, np.float64).reshape(-1, 2)
    true_yx = np.asarray(true_yx, np.float64).reshape(-1, 2)
    if len(pred_yx) == 0 or len(true_yx) == 0:
        return 0, len(pred_yx), len(true_yx)
    dist = np.linalg.norm(pred_yx[:, None, :] - true_yx[None, :, :], axis=-1)  # (P, T)
    taken = np.zeros(len(true_yx), bool)
    tp = 0
    for i in np.argsort(-np.asarray(scores, np.float64), kind="stable"):
        d = np.where(taken, np.inf, dist[i])
        j = int(np.argmin(d))
        if d[j] <= radius:
            taken[j] = True
            tp += 1
    return tp, len(pred_yx) - tp, len(true_yx) - tp


@dataclass
class DetectionCounts:
    """Running true/false positive and false negative counts; `f1`, `precision`, `recall`."""

    radius: float = 4.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def update(self, pred_yx: np.ndarray, scores: np.ndarray, true_yx: np.ndarray) -> None:
        """Match predictions `pred_yx` (P, 2) with `scores` (P,) to the truth `true_yx`
        (T, 2) (`match_points`) and add the counts."""
        tp, fp, fn = match_points(pred_yx, scores, true_yx, self.radius)
        self.tp += tp
        self.fp += fp
        self.fn += fn

    @property
    def precision(self) -> float:
        """`tp / (tp + fp)`; NaN when nothing was predicted."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        """`tp / (tp + fn)`; NaN when there is no ground-truth point."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def f1(self) -> float:
        """`2 tp / (2 tp + fp + fn)`; NaN when there are neither predictions nor truth."""
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else float("nan")
