"""Contribution maps of whole-image context models: over the whole image, not one crop.

A model with `global_context` lets every crop read a scene built from one summary vector
per region of the whole image (`napari_xt.model.global_context`). A region far outside the
chosen region's crop can therefore change its answer, through its summary. Here:

- ``occlusion``: region j blanked everywhere it is used: its summary in the scene (the
  summary of zero features) and, when it lies in the crop, its tokens; the scene is
  re-encoded for each occluded copy (batched), the crop then reads it and runs;
- ``gradient``: gradient x (input - blank) on both the crop's context tokens and every
  region's summary (through the scene's cell means and maxima and its encoder).

The scene is built as the engine builds it (every region's summary, the same cells), the
crop reads it with the crop's own origin. Attention methods are refused: a crop's
attention does not show what the scene brought.

Layouts: summaries (N, C) for the N = rows * cols regions in raster order; cells
(Gr, Gc, 2C); scene tokens (B, M, D).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from napari_xt.model.global_context import place_code


class Scene:
    """Every region's summary and what the scene of any set of them looks like."""

    def __init__(self, model: Any, source: Any, plan: Any, batch: int = 32) -> None:
        self.model, self.plan = model, plan
        g = model.global_context
        self.g = g
        self.grid = model.scene_grid(plan.rows, plan.cols)
        rows, cols = plan.rows, plan.cols
        self.rc = np.array([(r, c) for r in range(rows) for c in range(cols)], np.int64)
        device = next(model.parameters()).device
        sums = []
        s = plan.region_size
        with torch.no_grad():  # (the summary of a region with no content: zero features)
            for start in range(0, len(self.rc), batch):
                part = self.rc[start:start + batch]
                pix = np.stack([source.read(plan.box(int(r), int(c)), s)[0] for r, c in part])
                feats = model.encode_regions(torch.from_numpy(pix).to(device))
                sums.append(model.summarize(feats))
            self.blank_summary = model.summarize([torch.zeros_like(f[:1]) for f in feats])[0]
        self.summaries = torch.cat(sums)  # (N, C) float32
        self.cell = torch.as_tensor(self.grid.cell_of(torch.as_tensor(self.rc[:, 0]),
                                                      torch.as_tensor(self.rc[:, 1])),
                                    device=device)
        self.m = self.grid.shape[0] * self.grid.shape[1]
        self.place = place_code(self.grid.cell_centres(device), self.grid.rows,
                                self.grid.cols, g.dim)

    def tokens(self, summaries: torch.Tensor) -> torch.Tensor:
        """summaries (B, N, C) -> scene tokens (B, M, D) (M + 1 rows with `whole_scene`), as
        `GlobalContext.encode` makes them from `SceneSummary.cells` (differentiable)."""
        b, _, c = summaries.shape
        idx = self.cell[None, :, None].expand(b, -1, c)
        counts = torch.zeros(self.m, device=summaries.device).index_add_(
            0, self.cell, torch.ones_like(self.cell, dtype=torch.float32))
        empty = (counts == 0)[None, :, None]  # (a cell no region falls in: zeros)
        sums = summaries.new_zeros(b, self.m, c).scatter_add(1, idx, summaries)
        peak = summaries.new_full((b, self.m, c), float("-inf")).scatter_reduce(
            1, idx, summaries, "amax", include_self=True)
        mean = (sums / counts.clamp_min(1)[None, :, None]).masked_fill(empty, 0.0)
        peak = peak.masked_fill(empty, 0.0)
        cells = torch.cat([mean, peak], -1)  # (B, M, 2C)
        scorer = self.g.scorer()  # scene detectors: their maxima over the regions
        peaks = None if scorer is None else scorer(summaries).amax(1)
        return self.g.encode_cells(cells, self.place, peaks)


def _read(model: Any, inputs: Any, tokens: torch.Tensor, scene: Scene,
          scene_tokens: torch.Tensor) -> torch.Tensor:
    """Crop tokens (B, N, D) read the scene tokens (B or 1, M, D) at the crop's place in the
    image, as the engine does."""
    from napari_xt.model.global_context import SceneTokens

    h, w = inputs.feats[-1].shape[-2:]
    crop = inputs.crop
    _, pos = model.region_tokens(inputs.feats[-1][None], inputs.rc)
    origin = torch.tensor([crop.row0 * h, crop.col0 * w], device=pos.device)
    pos = (pos + origin).expand(tokens.shape[0], -1, -1)
    return model.global_context.read(tokens, pos, (h, w), SceneTokens(scene_tokens, scene.grid))


def image_contribution(model: Any, inputs: Any, scene: Scene, method: str,
                       probs_of: Any, blank: torch.Tensor) -> np.ndarray:
    """(rows, cols) raw influence of every region of the image on the chosen region's
    output through `inputs`' crop (unnormalised)."""
    n = len(scene.rc)
    crop = inputs.crop
    local = np.full(n, -1)  # crop-local index of each image region, -1 outside the crop
    for j, (r, c) in enumerate(scene.rc):
        if crop.contains(int(r), int(c)):
            local[j] = (r - crop.row0) * crop.cols + (c - crop.col0)
    tokens = inputs.tokens
    owner = torch.as_tensor(inputs.owner, device=tokens.device)
    if method == "gradient":
        t = tokens.detach().clone().requires_grad_(True)
        s = scene.summaries.detach().clone()[None].requires_grad_(True)
        with torch.enable_grad():
            read = _read(model, inputs, t, scene, scene.tokens(s))
            probs = probs_of(model.contextualize(read)[0])
            chosen = probs.detach().argmax(1, keepdim=True)
            score = torch.log(probs.gather(1, chosen).clamp_min(1e-12)).sum()
            g_t, g_s = torch.autograd.grad(score, (t, s))
        per_token = (g_t * (tokens - blank)).sum(-1).abs()[0]
        in_crop = np.bincount(inputs.owner, weights=per_token.double().cpu().numpy(),
                              minlength=len(inputs.rc))  # per crop region
        out = (g_s[0] * (scene.summaries - scene.blank_summary)).sum(-1).abs().double()
        out = out.cpu().numpy()
        inside = local >= 0
        out[inside] += in_crop[local[inside]]
        return out.reshape(scene.plan.rows, scene.plan.cols)
    out = np.zeros(n)
    with torch.no_grad():
        base = scene.tokens(scene.summaries[None])
        ref = probs_of(model.contextualize(_read(model, inputs, tokens, scene, base))[0])
        chunk = 16
        for start in range(0, n, chunk):
            js = list(range(start, min(n, start + chunk)))
            sums = scene.summaries[None].repeat(len(js), 1, 1)
            for b, j in enumerate(js):
                sums[b, j] = scene.blank_summary
            batch = tokens.expand(len(js), -1, -1).clone()
            for b, j in enumerate(js):
                if local[j] >= 0:
                    hide = owner == int(local[j])
                    batch[b, hide] = blank[0, hide]
            probs = probs_of(model.contextualize(_read(model, inputs, batch, scene,
                                                       scene.tokens(sums)))[0])
            change = 0.5 * (probs - ref).abs().sum(1).mean(1)
            out[start:start + len(js)] = change.double().cpu().numpy()
    return out.reshape(scene.plan.rows, scene.plan.cols)
