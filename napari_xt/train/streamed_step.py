"""Loss and gradients of one batch, streamed: the forward/backward half of `Trainer`.

Memory stays bounded by three options of `RunSpec`:

- `stream_rows`: the crop is processed in bands of region rows; the context state (e.g. the
  Transformer-XL memory, already detached by the encoder) is carried from band to band and
  every band is backpropagated on its own, so activations of one band live at a time. The loss
  of every band is normalized by the counts of the whole crop, so the summed gradients are
  those of the whole-crop loss (truncated through the carried state).
- `grad_ratio`: a random fraction of the regions (drawn from (seed, step)) run the region
  encoder with gradients, the rest under no_grad.
- `checkpointing`: region encoder activations are recomputed in the backward pass.

With several data-parallel ranks (`train.ddp`) every band's forward runs through the DDP
module, the loss is normalized by the counts of the global batch, and the gradients are
averaged over the ranks after the step's last backward.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint as recompute

from napari_xt.model.tokenizer import split_regions

from .data import IGNORE_INDEX
from .losses import combine, loss_terms, pixel_weights, token_class_targets, token_loss_sum


class StreamedStep:
    """`Trainer`'s forward and backward passes (a mixin: it reads the trainer's `cfg`, `model`,
    `model_config`, `token_head`, `device`, `world`, `ddp` and `region_encoder_frozen()`)."""

    def _encode(self, regions: torch.Tensor, gen: torch.Generator,
                part: tuple[int, int] = (0, 1)) -> list[torch.Tensor]:
        """regions (N, C, S, S) -> features [(N, C_l, h_l, w_l)], honouring grad_ratio.

        `part` (index, count): the regions are part `index` of `count` equal, consecutive
        parts of the regions of the step (the ranks' shares); the regions that keep
        gradients are drawn among all of them and each part keeps its own."""
        run = self.cfg.run
        encode = self.model.encode_regions

        def with_grad(x: torch.Tensor) -> list[torch.Tensor]:
            if run.checkpointing:
                return list(recompute(encode, x, use_reentrant=False))
            return encode(x)

        n = regions.shape[0]
        if self.region_encoder_frozen():  # nothing to train there: no activations kept
            with torch.no_grad():
                return encode(regions)
        if run.grad_ratio >= 1.0:
            return with_grad(regions)
        index, count = part
        k = max(1, int(round(run.grad_ratio * n * count)))
        perm = torch.randperm(n * count, generator=gen)
        sel, rest = (_in_part(p, index * n, n).to(regions.device) for p in (perm[:k], perm[k:]))
        if len(sel) == 0:  # none of this part's regions keeps gradients
            with torch.no_grad():
                return encode(regions)
        live = with_grad(regions[sel])
        if len(rest) == 0:
            return [f.index_select(0, torch.argsort(sel)) for f in live]
        with torch.no_grad():
            frozen = encode(regions[rest])
        out = []
        for a, b in zip(live, frozen):
            full = a.new_zeros((n, *a.shape[1:]))
            full = full.index_copy(0, rest, b).index_copy(0, sel, a)
            out.append(full)
        return out

    def _targets_by_region(self, batch: dict, size: int) -> dict[str, torch.Tensor]:
        """Batch maps (B, K, H, W) -> (B, R, K, S, S) in raster order; padding ignored."""
        out = {}
        mask = batch["mask"][:, None]
        regions, valid, _ = split_regions(mask, size)
        out["mask"] = regions.masked_fill(~valid, IGNORE_INDEX)[:, :, 0]  # (B, R, S, S)
        for key in ("centre", "size", "size_weight"):
            out[key] = split_regions(batch[key], size)[0]
        if "class_scale" in batch:  # (B, K) -> every region of a sample: (B, R, K)
            scale = batch["class_scale"]
            out["class_scale"] = scale[:, None].expand(-1, out["mask"].shape[1], -1)
        return out

    def loss_counts(self, batch: dict) -> dict[str, float]:
        """What each loss term of `batch` is normalized by (pixels, centres, tokens)."""
        size = self.model_config.region.region_size
        targets = self._targets_by_region(batch, size)
        counts = {
            "ce": float((targets["mask"] != IGNORE_INDEX).sum()),
            "heatmap": float((targets["centre"] >= 1.0).sum()),
            "size": float(targets["size_weight"].sum()),
        }
        if self.token_head is not None:
            stride = self.model.region_encoder.feature_strides[-1]
            counts["token"] = float(token_class_targets(
                batch["mask"], stride, self.model_config.num_classes).sum())
        scale = targets.get("class_scale")  # (B, R, K) or None
        pixel = pixel_weights(targets["mask"].flatten(0, 1), self.cfg.loss,
                              None if scale is None else scale.flatten(0, 1))
        if pixel is not None:
            counts["ce"] = float(pixel.sum())
        return counts

    def forward_backward(self, batch: dict, step: int, counts: dict[str, float] | None = None,
                         scene=None, origins: np.ndarray | None = None,
                         part: tuple[int, int] = (0, 1), sync: bool = True
                         ) -> tuple[float, dict[str, float]]:
        """Loss of one batch with gradients accumulated into the parameters (streamed).

        With whole-image context, `scene` (the `SceneTokens` of the image the batch's crops
        come from) is read by every token, at its place in the image: `origins` (B, 2) is
        each crop's first region (row, col). `counts` normalize the loss terms (default: the
        batch's own, summed over the ranks), so several calls can make up one step's loss.

        With several ranks: the returned loss is this rank's share of the step's loss;
        `part` (index, count) says the batch is part `index` of `count` equal parts of a
        batch drawn as one (random draws span all of it); `sync`: this call holds the
        step's last backward, after which DDP averages the ranks' gradients."""
        model, size = self.model, self.model_config.region.region_size
        gen = torch.Generator().manual_seed(int(self.cfg.run.seed) * 1_000_003 + step)
        image = batch["image"].to(self.device)  # (B, C, H, W)
        regions, _, grid = split_regions(image, size)  # (B, R, C, S, S)
        b = regions.shape[0]
        targets = {k: v.to(self.device) for k, v in self._targets_by_region(batch, size).items()}
        if counts is None:
            counts = self.loss_counts(batch)
            if self.world is not None:
                counts = self.world.sum_counts(counts)
        # DDP averages the ranks' gradients: W times each share makes the mean their sum
        scale = 1.0 if self.world is None else float(self.world.size)
        stride = self.model.region_encoder.feature_strides[-1]
        token_targets = None
        if self.token_head is not None:
            token_targets = token_class_targets(
                batch["mask"].to(self.device), stride, self.model_config.num_classes
            )  # (B, K, H / stride, W / stride)
        band = self.cfg.run.stream_rows or grid.rows
        rc_all = grid.order("raster")  # (R, 2)

        def band_loss(idx: np.ndarray, state):
            """One band of region rows -> (loss normalized by `counts`, terms, state)."""
            rc = rc_all[idx]
            tidx = torch.from_numpy(idx).to(self.device)
            feats = self._encode(regions[:, tidx].flatten(0, 1), gen, part)
            last = feats[-1]
            tokens, pos = model.region_tokens(last.reshape(b, len(idx), *last.shape[1:]), rc)
            if scene is not None:
                h, w = last.shape[-2:]
                at = torch.as_tensor(np.asarray(origins) * (h, w), device=pos.device)
                tokens = model.read_scene(tokens, pos + at[:, None], (h, w), scene)
            tokens, state = model.contextualize(tokens, state)
            maps = model.decode(tokens, feats, rc)  # {name: (B, r, K, S, S)}
            maps = {k: v.flatten(0, 1) for k, v in maps.items()}  # (B*r, K, S, S)
            piece = {k: v[:, tidx].flatten(0, 1) for k, v in targets.items()}
            terms = loss_terms(maps, piece, self.cfg.loss)
            if token_targets is not None:
                t_sum = token_loss_sum(self.token_head(tokens), token_targets, pos)
                terms["token"] = (self.cfg.loss.token_weight * t_sum, t_sum.new_tensor(0.0))
            return combine(terms, counts), terms, state

        state = None
        total, parts = 0.0, {}
        for r0 in range(0, grid.rows, band):
            idx = np.arange(r0 * grid.cols, min(grid.rows, r0 + band) * grid.cols)
            last_backward = sync and r0 + band >= grid.rows
            with (self.ddp.no_sync() if self.ddp is not None and not last_backward
                  else nullcontext()):
                if self.ddp is None:
                    loss, terms, state = band_loss(idx, state)
                else:
                    loss, terms, state = self.ddp(band_loss, idx, state)
                # the scene is read by every band
                (loss * scale if scale != 1.0 else loss).backward(retain_graph=scene is not None)
            total += float(loss.detach())
            for name, (s, _) in terms.items():
                parts[name] = parts.get(name, 0.0) + float(s.detach()) / max(counts[name], 1.0)
        return total, parts


def _in_part(index: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """The entries of `index` in [start, start + n), less `start`, in their order."""
    if start == 0 and len(index) and int(index.max()) < n:
        return index
    return index[(index >= start) & (index < start + n)] - start
