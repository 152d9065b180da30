"""Which regions made a region's answer: contribution maps over the region grid.

`contribution_map(model, source, (row, col), method)` answers, for one region of an image
(or one pixel of it), how much every other region of the context it saw influenced its
output, as a `ContributionMap` over the whole region grid (NaN where the region saw
nothing). It recomputes the crops the engine ran for that region (same plan, same crop
size and stride, same blending weights) and, per crop:

- ``attention``: the softmax attention of the region's tokens to every token, summed per
  source region, of one layer (default the last) and one head (default their mean);
- ``rollout``: attention rolled out across the layers, so indirect paths count: each
  layer's head-mean attention mixed with the identity of the residual stream in proportion
  to what the layer adds to each token (the norm of its attention output against the norm
  of the token it adds to), multiplied from the first layer up;
- ``gradient``: gradient x (input - blank) on the context tokens (|sum over channels| per
  token, summed per region) of the log-probability of the classes the region predicts (the
  first-order estimate of occlusion, one backward pass);
- ``occlusion``: each region's tokens replaced by the token of a region with no content
  (the projection of zero features plus the region's own position), one batch of copies of
  the crop at a time; the change of the chosen region's class probabilities (total
  variation, averaged over its pixels).

Attention and rollout need an attention encoder (Hyper, Transformer-XL with its memory);
gradient and occlusion work for every encoder (Mamba included) and, for whole-image context
models, over the whole image (through the scene every crop reads: `whole_image.py`). A
region-only model has no context: every method gives the region itself all the weight.
No Qt here; the Inspect context widget and `napari-xt inspect` call it.

`view.labels_without_context(...)` re-decodes the regions of a view with the context
encoder skipped, from the run's embedding cache where it has them (only the head reruns).
"""

from __future__ import annotations

from .contributions import (
    METHODS,
    ContributionMap,
    attention_matrices,
    contribution_map,
    crop_contribution,
)

__all__ = ["METHODS", "ContributionMap", "attention_matrices", "contribution_map",
           "crop_contribution"]
