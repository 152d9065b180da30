"""Training losses: cross-entropy for classes, focal heatmap loss and L1 size for detection.

Every loss returns a (sum, count) pair so that a scene streamed in pieces adds up to exactly
the loss of the whole scene: the caller divides the summed sums by the summed counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms; `class_weights` (K,) or None; focal exponents as CenterNet."""

    class_weights: tuple[float, ...] | None = None
    heatmap_weight: float = 1.0
    size_weight: float = 0.1
    focal_alpha: float = 2.0
    focal_beta: float = 4.0
    centre_prior: float = 0.01  # initial centre probability (bias of the centre map at start)
    # deep supervision of the token sequence: a training-only Linear(D -> K) on the tokens the
    # head receives, against the class fractions of each token's pixels (0 disables it)
    token_weight: float = 0.0
    # whole-image training with scene detectors: a training-only Linear(K -> 1) on a scene's
    # detector peaks against the scene's kind where it is known (a beacon scene: ring or
    # cross), binary cross-entropy, mean over the step's beacon scenes, logged weighted as
    # "scene" (0 disables it)
    scene_weight: float = 0.0
    # whole-image training: the weight of class k's pixels in a scene of side L (the square
    # root of its area) grows as max(1, L / growth_from) ** class_growth[k] (on top of
    # class_weights). A class of fixed extent (a coastal strip of fixed depth) covers a
    # smaller share of a larger scene, so its IoU pays more for every pixel of another class
    # read as it; growing the other classes' weights teaches that size-dependent prior.
    class_growth: tuple[float, ...] | None = None
    growth_from: int = 512
    logits_map: str = "logits"
    centre_map: str = "centre"
    size_map: str = "size"

    def __post_init__(self) -> None:
        if self.class_growth is not None:
            growth = tuple(float(g) for g in self.class_growth)
            if any(not g >= 0 for g in growth):  # NaN too
                raise ValueError(f"loss.class_growth must be >= 0 per class: {growth}")
            object.__setattr__(self, "class_growth", growth)
        if isinstance(self.growth_from, bool) or not isinstance(self.growth_from, int) \
                or self.growth_from <= 0:
            raise ValueError(f"loss.growth_from must be a positive number of pixels, got "
                             f"{self.growth_from!r}")

    def class_scale(self, side: float, num_classes: int) -> torch.Tensor | None:
        """Per-class weights (K,) of a scene of side `side` px (class_weights times the
        growth), or None when neither is set."""
        if self.class_weights is None and self.class_growth is None:
            return None
        w = torch.ones(num_classes) if self.class_weights is None else \
            torch.tensor(self.class_weights, dtype=torch.float32)
        if self.class_growth is not None:
            g = torch.tensor(self.class_growth, dtype=torch.float32)
            w = w * max(1.0, float(side) / self.growth_from) ** g
        return w


def pixel_weights(mask: torch.Tensor, cfg: LossConfig,
                  class_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """Cross-entropy weights of the pixels of `mask` (N, h, w), 0 where ignored: each
    sample's `class_scale` (N, K) when given, else `cfg.class_weights`; None when neither
    (every pixel that counts weighs 1)."""
    if class_scale is None:
        if cfg.class_weights is None:
            return None
        class_scale = torch.tensor(cfg.class_weights, dtype=torch.float32,
                                   device=mask.device)[None].expand(mask.shape[0], -1)
    scale = class_scale.to(device=mask.device, dtype=torch.float32)
    pixel = scale.gather(1, mask.clamp(0, scale.shape[1] - 1).flatten(1)).view(mask.shape)
    return pixel * (mask != IGNORE_INDEX)


def focal_heatmap_sum(logits: torch.Tensor, target: torch.Tensor, alpha: float, beta: float,
                      valid: torch.Tensor | None = None):
    """Penalty-reduced pixel focal loss; logits/target (N, 1, H, W) -> (sum, number of centres).

    Centres are pixels where target == 1; elsewhere the loss is down-weighted by
    (1 - target) ** beta near a centre. `valid` (N, 1, H, W) bool: pixels that count (a
    mask's ignored pixels are unknown ground, not "no object").
    """
    prob = torch.sigmoid(logits.float())
    log_p = F.logsigmoid(logits.float())
    log_not_p = F.logsigmoid(-logits.float())
    centre = target >= 1.0
    pos = -((1 - prob) ** alpha) * log_p
    neg = -((1 - target) ** beta) * (prob**alpha) * log_not_p
    per_pixel = torch.where(centre, pos, neg)
    if valid is not None:
        per_pixel = per_pixel * valid
        centre = centre & valid
    return per_pixel.sum(), centre.sum()


def loss_terms(
    maps: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], cfg: LossConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """maps {name: (N, K, h, w)} against batch targets of the same layout -> {term: (sum, n)}.

    batch: "mask" (N, h, w) int64, and when the model predicts them "centre", "size",
    "size_weight" (N, 1, h, w) float32; optionally "class_scale" (N, K) float32, the
    per-class weights of each sample (`LossConfig.class_scale`), which then replace
    class_weights.
    """
    terms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    logits = maps[cfg.logits_map]
    mask = batch["mask"]
    valid = mask != IGNORE_INDEX
    ce = F.cross_entropy(logits.float(), mask, ignore_index=IGNORE_INDEX, reduction="none")
    pixel = pixel_weights(mask, cfg, batch.get("class_scale"))
    if pixel is None:
        terms["ce"] = (ce.sum(), valid.sum().to(torch.float32))
    else:
        terms["ce"] = ((ce * pixel.to(ce)).sum(), pixel.sum())
    if cfg.centre_map in maps and cfg.heatmap_weight > 0:
        s, n = focal_heatmap_sum(maps[cfg.centre_map], batch["centre"], cfg.focal_alpha,
                                 cfg.focal_beta, valid[:, None] if not valid.all() else None)
        terms["heatmap"] = (cfg.heatmap_weight * s, n.to(torch.float32))
    if cfg.size_map in maps and cfg.size_weight > 0:
        w = batch["size_weight"]
        l1 = (maps[cfg.size_map].float() - batch["size"]).abs() * w
        terms["size"] = (cfg.size_weight * l1.sum(), w.sum())
    return terms


def combine(totals: dict[str, tuple[torch.Tensor, torch.Tensor]], counts: dict[str, float]):
    """Scalar loss: sum over terms of sum / max(count, 1), with counts of the whole scene."""
    loss = None
    for name, (s, _) in totals.items():
        part = s / max(float(counts[name]), 1.0)
        loss = part if loss is None else loss + part
    return loss


def token_class_targets(mask: torch.Tensor, stride: int, num_classes: int) -> torch.Tensor:
    """mask (B, H, W) -> class fractions per token cell (B, K, H / stride, W / stride);
    ignored pixels count for no class (a cell of padding has all zeros)."""
    valid = mask != IGNORE_INDEX
    onehot = F.one_hot(mask.masked_fill(~valid, 0), num_classes).permute(0, 3, 1, 2).float()
    onehot = onehot * valid[:, None]
    return F.avg_pool2d(onehot, stride, ceil_mode=True)


def token_loss_sum(
    logits: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Soft cross-entropy of token logits (B, N, K) against `token_class_targets` (B, K, h, w)
    read at the tokens' global (row, col) positions (B, N, 2); summed over tokens."""
    b = torch.arange(logits.shape[0], device=logits.device)[:, None]
    rows, cols = positions[..., 0], positions[..., 1]
    target = targets.permute(0, 2, 3, 1)[b, rows, cols]  # (B, N, K)
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum()
