"""Training with whole-image context, memory bounded whatever the scene size.

A model with `global_context` learns to read an encoding of the whole image (see
`napari_xt.model.global_context`). Each step takes `optim.batch_size` synthetic scenes
(sizes from `data.scene_sizes` in turn, a share `data.beacon_fraction` of them in the beacon
variant) and for each:

1. the scene summary: the whole scene is rendered in bands of rows, its regions go through
   the region encoder under no_grad and are summed into the scene cells (`SceneSummary`),
   exactly as the engine's scene pass does. With a frozen region encoder
   (`run.freeze: [region_encoder]`) a scene's summary never changes, so it is kept and a
   pool of `data.scene_pool` scenes per size is reused (0: fresh scenes, summaries made
   every time; `data.scene_pools`: a pool per size);
2. the scene tokens, with gradients (`XT.encode_scene`); with `scene_detectors` the summary
   keeps every region's vector and the detectors score them all with gradients (their
   maximum over regions is what the engine's scene pass keeps); when the region encoder trains,
   the summaries of the step's crop regions are computed again with gradients and passed
   through the cells (`crop_cells`: same values, so the step's scene is the engine's), so
   the region encoder learns what the scene should hold, not only what the crops need;
3. `data.crops_per_scene` crops of k x k regions (k = the model's `crop_regions`) at random
   places, rendered alone (the scene renders any window lazily), run as in ordinary
   training but reading the scene at their place (`Trainer.forward_backward(..., scene,
   origins)`), and backpropagated; then the next scene. The loss is normalized by the
   counts of the whole step, so it is the mean over every crop of the step. With
   `loss.scene_weight` a beacon scene's detector peaks are also read by a training-only
   `Trainer.scene_head` against the scene's kind (ring or cross), a scene-level target
   that trains the detectors directly, not only through the pixels of the step's crops;
   with `data.crops_per_scene` 0 it is the only loss (the detectors learn the scene's
   kind before a second run teaches the model to use them), and a step summarizes only
   its beacon scenes.

What a step holds at once: one scene's cells (at most grid^2), one scene's crops and their
activations; never the scene's pixels beyond one band of rows, nor its regions' features
(with `scene_detectors`: their summaries, C' numbers per region).
Determinism: scenes and crop places derive from (run.seed, step).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from napari_xt.engine.plan import crop_starts, default_stride
from napari_xt.model.global_context import SceneSummary, pooled_cells
from napari_xt.model.tokenizer import split_regions

from .data import Sample, collate
from .synthetic import SceneConfig, SyntheticScene

BAND = 512  # pixel rows rendered at a time for a scene summary
ENCODE_BATCH = 64  # regions per no-grad encoder call of a scene summary


def scene_summary(model: Any, scene: SyntheticScene, normalization: Any,
                  keep: bool | None = None) -> SceneSummary:
    """The summary of a whole synthetic scene, as the engine's scene pass makes it; `keep`
    every region's summary too, in raster order (default: when the model has scene
    detectors)."""
    if keep is None:
        keep = detectors(model) is not None
    s = model.cfg.region.region_size
    h, w = scene.shape
    rows, cols = -(-h // s), -(-w // s)
    summary: SceneSummary | None = None
    band = max(s, BAND // s * s)
    device = next(model.parameters()).device
    with torch.no_grad():
        for y0 in range(0, h, band):
            y1 = min(h, y0 + band)
            img, _ = scene.read(y0, 0, y1, w)
            x = torch.from_numpy(normalization(img))[None]
            regions, _, grid = split_regions(x, s)  # (1, r*cols, C, S, S), zero padded
            regions = regions[0]
            rc = grid.order("raster") + np.array([y0 // s, 0])
            for start in range(0, len(regions), ENCODE_BATCH):
                part = regions[start:start + ENCODE_BATCH].to(device)
                vectors = model.summarize(model.encode_regions(part))
                if summary is None:
                    summary = model.new_summary(rows, cols, vectors.shape[1], keep=keep)
                summary.add(rc[start:start + ENCODE_BATCH], vectors)
    return summary


def detectors(model: Any) -> Any:
    """The model's `SceneDetectors`, or None."""
    whole = model.global_context.whole
    return None if whole is None else whole.detect


def scene_peaks(model: Any, summary: SceneSummary) -> torch.Tensor | None:
    """The detector peaks of a scene (K,), with gradients into the detectors: every kept
    region summary scored, the maximum over regions (None without detectors)."""
    detect = detectors(model)
    if detect is None:
        return None
    device = next(detect.parameters()).device
    return detect.scores(summary.kept().to(device)).amax(0)


def scene_kind_loss(head: torch.nn.Module, peaks: torch.Tensor, kind: int) -> torch.Tensor:
    """Binary cross-entropy of the scene-kind reader `head` (Linear(K -> 1)) on a scene's
    detector peaks (K,) against its beacon kind (1 ring, 0 cross)."""
    logit = head(peaks.to(head.weight.dtype))[0]
    return torch.nn.functional.binary_cross_entropy_with_logits(
        logit, logit.new_tensor(float(kind)))


def crop_cells(model: Any, summary: SceneSummary, images: torch.Tensor,
               origins: np.ndarray) -> torch.Tensor:
    """The scene's cells with gradients through the summaries of the crops' regions (the
    region encoder run again on them, with gradients): equal in value to the scene pass's
    cells, so the region encoder learns what the scene should hold from every crop that
    reads it. images (B, C, H, W) normalized crops, origins (B, 2) first region of each."""
    s = model.cfg.region.region_size
    device = next(model.parameters()).device
    regions, _, grid = split_regions(images.to(device), s)  # (B, R, C, S, S)
    rc = np.concatenate([grid.order("raster") + o for o in np.asarray(origins)])
    _, first = np.unique(rc, axis=0, return_index=True)  # a region shared by crops once
    first = np.sort(first)
    part = regions.flatten(0, 1)[torch.from_numpy(first).to(device)]
    vectors = model.summarize(model.encode_regions(part))
    return summary.cells_through(rc[first], vectors)


def _holding(starts: Any, k: int, region: int, centre: float, half: float) -> list[int]:
    """The crop starts along one axis whose k regions hold [centre - half, centre + half]
    (the whole beacon mark); those holding its centre when no crop holds all of it."""
    whole = [s for s in starts if s * region <= centre - half and centre + half <= (s + k) * region]
    return whole or [s for s in starts if s <= centre // region < s + k]


class SceneCrops:
    """The scenes, summaries and crops of whole-image training (see the module docstring)."""

    def __init__(self, trainer: Any) -> None:
        cfg = trainer.cfg
        if cfg.data.kind != "synthetic":
            raise ValueError("whole-image context training needs data.kind 'synthetic' "
                             "(scenes it can render window by window)")
        k = trainer.model_config.crop_regions
        if k is None:
            raise ValueError("whole-image context training needs the model's crop_regions")
        self.crop_px = k * trainer.model_config.region.region_size
        self.data = cfg.data
        self.sizes = [int(n) for n in cfg.data.scene_sizes] or [cfg.data.scene.height]
        self.normalization = trainer.normalization
        self.seed = int(cfg.run.seed)
        self.kept: dict[tuple[int, int], SceneSummary] = {}

    def ensure_whole_statistics(self, trainer: Any) -> None:
        """Standardize a fresh whole-scene map (`WholeScene`) with the pooled cells of the
        first steps' scenes (`optim.batch_size` of every size; the same on every rank), and
        fresh scene detectors (`SceneDetectors`) with those scenes' region summaries; a map that has
        statistics (from its checkpoint, or a resumed run) keeps them. Called by the first
        step, so a resumed run does not compute what it loads."""
        whole = trainer.model.global_context.whole
        if whole is None:
            return
        detect = whole.detect
        need_pooled = not whole.has_statistics
        need_regions = detect is not None and not detect.has_statistics
        if not (need_pooled or need_regions):
            return
        count = max(2, trainer.cfg.optim.batch_size)
        pooled, every_region = [], []
        model = trainer.model
        modes = [(m, m.training) for m in model.modules()]  # frozen parts stay in eval
        model.eval()  # the summaries the engine makes (no dropout, no norm statistics kept)
        try:
            for step in range(len(self.sizes)):
                for size, seed in self.scenes_for_step(step, count):
                    scene = SyntheticScene(seed, self.scene_config(size, seed))
                    summary = self.summary(trainer, size, seed, scene)
                    cells = summary.cells()
                    pooled.append(pooled_cells(cells.reshape(1, -1, cells.shape[-1]))[0])
                    if need_regions:
                        every_region.append(summary.kept())
        finally:
            for m, training in modes:
                m.training = training
        if need_pooled:
            whole.set_statistics(torch.stack(pooled))
        if need_regions:
            detect.set_statistics(torch.cat(every_region))

    def scene_config(self, size: int, seed: int) -> SceneConfig:
        """Scene `seed` of side `size`, in the beacon variant for a share of the seeds."""
        beacon = bool(np.random.default_rng([seed, 7]).uniform() < self.data.beacon_fraction)
        return replace(self.data.scene, height=size, width=size, beacon=beacon)

    def scenes_for_step(self, step: int, count: int) -> list[tuple[int, int]]:
        """(size, seed) of the step's scenes."""
        size = self.sizes[step % len(self.sizes)]
        rng = np.random.default_rng([self.seed, step, 11])
        pool = self.data.pool_for(size) or self.data.train_count
        picks = rng.integers(0, pool, count)
        base = self.data.train_seed + 10_000_000 * self.sizes.index(size)
        return [(size, base + int(i)) for i in picks]

    def summary(self, trainer: Any, size: int, seed: int, scene: SyntheticScene) -> SceneSummary:
        """The summary of scene `scene` (`size`, `seed`) under the trainer's model,
        computed over the whole scene; kept for reuse when the region encoder is frozen and the
        scenes come from a pool (`data.scene_pool`)."""
        key = (size, seed)
        if key in self.kept:
            return self.kept[key]
        out = scene_summary(trainer.model, scene, self.normalization)
        if trainer.region_encoder_frozen() and self.data.pool_for(size):
            self.kept[key] = out
        return out

    def crops(self, scene: SyntheticScene, rng: np.random.Generator, n: int,
              region: int) -> tuple[list[Sample], np.ndarray]:
        """n crops of the scene at random places (`data.crop_places`: any region-aligned
        place, or one of the engine's crop starts; with `data.beacon_crop` the first crop of
        a beacon scene holds the beacon): samples and origins (n, 2) (first region row,
        col)."""
        h, w = scene.shape
        side_y, side_x = min(self.crop_px, h), min(self.crop_px, w)
        rows, cols = -(-h // region), -(-w // region)
        k_y, k_x = -(-side_y // region), -(-side_x // region)
        samples, origins = [], []
        if self.data.crop_places == "tiling":
            row_starts = crop_starts(rows, k_y, default_stride(k_y))
            col_starts = crop_starts(cols, k_x, default_stride(k_x))
        else:
            row_starts, col_starts = range(rows - k_y + 1), range(cols - k_x + 1)
        for i in range(n):
            rows_i, cols_i = row_starts, col_starts
            if i == 0 and self.data.beacon_crop and scene.beacon is not None:
                _, cy, cx = scene.beacon
                half = scene.config.beacon_px / 2
                rows_i = _holding(row_starts, k_y, region, cy, half)
                cols_i = _holding(col_starts, k_x, region, cx, half)
            r0 = int(rows_i[int(rng.integers(0, len(rows_i)))])
            c0 = int(cols_i[int(rng.integers(0, len(cols_i)))])
            y0, x0 = r0 * region, c0 * region
            y1, x1 = min(h, y0 + side_y), min(w, x0 + side_x)
            img, mask = scene.read(y0, x0, y1, x1)
            t = scene.targets(y0, x0, y1, x1)
            vessel = t["cls"] == 1
            points = np.stack([t["y"][vessel] - y0, t["x"][vessel] - x0], -1).reshape(-1, 2)
            samples.append(Sample(self.normalization(img), mask.astype(np.int64), points,
                                  t["size"][vessel]))
            origins.append((r0, c0))
        return samples, np.array(origins, np.int64)

    def forward_backward(self, trainer: Any, step: int, world: Any = None
                         ) -> tuple[float, dict[str, float]]:
        """One step's loss over every crop of its scenes, gradients accumulated.

        `world` (`train.ddp.World`, several processes): the step's scenes and crop places
        stay those of the 1-process run (every rank draws the crops of every scene in order,
        as the draws follow one another), each rank summarizes and backpropagates only its
        share of the scenes, the loss is normalized by the counts of all the step's crops
        (summed over the ranks), and gradients are reduced after its last scene."""
        self.ensure_whole_statistics(trainer)
        region = trainer.model_config.region.region_size
        rng = np.random.default_rng([self.seed, step, 13])
        picks = self.scenes_for_step(step, trainer.cfg.optim.batch_size)
        mine = range(len(picks)) if world is None else range(len(picks))[world.share(len(picks))]
        work = []
        n_crops = self.data.crops_per_scene
        for i, (size, seed) in enumerate(picks):
            scene = SyntheticScene(seed, self.scene_config(size, seed))
            samples, origins = self.crops(scene, rng, n_crops, region)
            if i in mine and (n_crops or scene.beacon is not None):
                batch = collate(samples, trainer.cfg.data.heatmap_sigma) if n_crops else None
                if batch is not None and trainer.cfg.loss.class_growth is not None:
                    side = math.sqrt(scene.shape[0] * scene.shape[1])
                    scale = trainer.cfg.loss.class_scale(side, trainer.model_config.num_classes)
                    batch["class_scale"] = scale[None].expand(len(samples), -1)
                work.append((size, seed, scene, batch, origins))
        head = trainer.scene_head
        beacons = sum(scene.beacon is not None for _, _, scene, _, _ in work)
        if not n_crops:  # the scene-level target alone: the detectors and their reader
            return self._scene_kinds(trainer, work, beacons)
        counts: dict[str, float] = {}
        for *_, batch, _ in work:
            for name, v in trainer.loss_counts(batch).items():
                counts[name] = counts.get(name, 0.0) + v
        if world is not None:
            counts = world.sum_counts(counts)
        total, parts = 0.0, {}
        for k, (size, seed, scene, batch, origins) in enumerate(work):
            summary = self.summary(trainer, size, seed, scene)
            cells = None
            if not trainer.region_encoder_frozen():
                cells = crop_cells(trainer.model, summary, batch["image"], origins)
            peaks = scene_peaks(trainer.model, summary)
            if head is not None and scene.beacon is not None:
                weighted = _scene_kind_backward(trainer, peaks, scene, beacons, retain=True)
                total += weighted
                parts["scene"] = parts.get("scene", 0.0) + weighted
            tokens = trainer.model.encode_scene(summary, cells, peaks)
            extra = {} if world is None else {"sync": k == len(work) - 1}
            loss, terms = trainer.forward_backward(batch, step, counts, tokens, origins, **extra)
            total += loss
            for name, v in terms.items():
                parts[name] = parts.get(name, 0.0) + v
        return total, parts

    def _scene_kinds(self, trainer: Any, work: list, beacons: int
                     ) -> tuple[float, dict[str, float]]:
        """The step's loss with `data.crops_per_scene` 0: the scene-kind term of its
        beacon scenes alone (`loss.scene_weight`), gradients into the detectors only."""
        total = 0.0
        for size, seed, scene, _, _ in work:
            peaks = scene_peaks(trainer.model, self.summary(trainer, size, seed, scene))
            total += _scene_kind_backward(trainer, peaks, scene, beacons, retain=False)
        return total, ({"scene": total} if work else {})  # no beacon scene: no term


def _scene_kind_backward(trainer: Any, peaks: torch.Tensor, scene: SyntheticScene,
                         beacons: int, retain: bool) -> float:
    """Backpropagate a beacon scene's share of the step's scene-kind term (weighted by
    `loss.scene_weight`, divided by the step's `beacons`); `retain` the graph of `peaks`
    for the crops that read them. Returns the weighted share."""
    kind = scene_kind_loss(trainer.scene_head, peaks, scene.beacon[0])
    share = trainer.cfg.loss.scene_weight * kind / beacons
    share.backward(retain_graph=retain)
    return float(share.detach())
