"""Can region-level detectors read the beacon at every scene size? A probe outside the model.

Per-region scene summaries of beacon scenes are taken from a whole-image model with its
region encoder as the scene pass makes them (`napari_xt.train.whole_image.scene_summary`,
every summary kept). On the training scenes (1024 and 2048 px by default) a detector of
the shape of `SceneDetectors` (standardized summary -> Linear -> GELU -> Linear(K)) and a
linear map of its peaks (the maximum of each score over a scene's regions, or over its
cells with `--cells`) learn the scene's mark, ring or cross, directly (binary
cross-entropy on the scene's kind: a scene-level target, not the model's pixel loss).
Printed per held-out size: the share of scenes read right and each scene's margin (logit,
positive = right), for several seeds of the probe.

Run: python benchmarks/beacon_probe.py [--model demo-beacon] [--train-sizes 1024,2048]
     [--train-count 200,80] [--test-sizes 1024,2048,4096,8192] [--test-count 4]

With `--run RUN` (a training run with `loss.scene_weight`, e.g. of
configs/demo_beacon_detect.yaml) nothing is trained here: the run's own detectors and its
training-only reader of their peaks (from its latest training state) read the same
held-out scenes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from napari_xt.train.demo import HELD_OUT_SEED

FIRST_HELD_OUT = HELD_OUT_SEED + 700_000  # the held-out beacon scenes of `napari-xt bench context`


def _right(margins: dict) -> dict:
    """Per size, the share of scenes read right (margin > 0)."""
    return {size: sum(m > 0 for m in ms) / len(ms) for size, ms in margins.items()}


def summaries(model, normalization, size: int, seed: int):
    """(vectors (N, C') in raster order, kind, grid) of beacon scene `seed` of side `size`."""
    from napari_xt.train.synthetic import SceneConfig, SyntheticScene
    from napari_xt.train.whole_image import scene_summary

    scene = SyntheticScene(seed, SceneConfig(height=size, width=size, channels=2, beacon=True))
    summary = scene_summary(model, scene, normalization, keep=True)
    return summary.kept(), int(scene.beacon[0]), summary.grid


def cell_vectors(vectors, grid):
    """Per-region summaries -> the scene's cells (M, 2C'), as `SceneSummary.cells`."""
    import numpy as np
    import torch

    from napari_xt.model.global_context import SceneSummary

    summary = SceneSummary(grid, vectors.shape[1])
    rc = np.stack(np.meshgrid(np.arange(grid.rows), np.arange(grid.cols), indexing="ij"), -1)
    summary.add(torch.from_numpy(rc.reshape(-1, 2)), vectors)
    cells = summary.cells()
    return cells.reshape(-1, cells.shape[-1])


def read_run(a) -> int:
    """Margins of a training run's detectors and scene reader on the held-out scenes."""
    from pathlib import Path

    import torch

    from napari_xt.train.config import load_config
    from napari_xt.train.loop import Trainer

    torch.set_num_threads(a.threads)
    run = Path(a.run)
    trainer = Trainer(load_config(run / "train_config.yaml"), run)
    if trainer.scene_head is None:
        print(f"{run}: its config has no loss.scene_weight (no scene reader to read with)",
              file=sys.stderr)
        return 2
    step = trainer.resume()
    trainer.model.eval()
    margins: dict[int, list[float]] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for size in (int(v) for v in a.test_sizes.split(",")):
            for i in range(a.test_count):
                v, kind, _ = summaries(trainer.model, trainer.normalization, size,
                                       FIRST_HELD_OUT + i)
                detect = trainer.model.global_context.whole.detect
                peaks = detect.scores(v.to(detect.shift.device)).amax(0)
                z = float(trainer.scene_head(peaks)[0])
                margins.setdefault(size, []).append(round(z if kind == 1 else -z, 2))
            print(f"{size} px: {_right(margins)[size]:.0%} right, margins "
                  f"{margins[size]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"run": str(run), "step": step, "threads": a.threads,
                       "held_out_seeds": [FIRST_HELD_OUT, FIRST_HELD_OUT + a.test_count - 1],
                       "margins": margins, "right": _right(margins)}, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo-beacon")
    p.add_argument("--train-sizes", default="1024,2048")
    p.add_argument("--train-count", default="200,80", help="scenes per training size")
    p.add_argument("--test-sizes", default="1024,2048,4096,8192")
    p.add_argument("--test-count", type=int, default=4)
    p.add_argument("--detectors", type=int, default=16)
    p.add_argument("--steps", type=int, default=320)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--cells", action="store_true", help="score cells, not regions")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--run", default=None, help="a training run's folder: read its own "
                   "detectors and scene reader, train nothing")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.run:
        return read_run(a)

    import numpy as np
    import torch

    from napari_xt.model.choice import load_model
    from napari_xt.train.data import Normalization

    torch.set_num_threads(a.threads)
    model, _, norm = load_model(a.model)
    model.eval()
    if isinstance(norm, dict):
        norm = (norm["mean"], norm["std"])
    normalization = Normalization(tuple(norm[0]), tuple(norm[1]))
    train_sizes = [int(v) for v in a.train_sizes.split(",")]
    counts = [int(v) for v in a.train_count.split(",")]
    if len(counts) != len(train_sizes):
        p.error("--train-count needs one count per --train-sizes entry")

    def scene(size, seed):
        v, kind, grid = summaries(model, normalization, size, seed)
        return (cell_vectors(v, grid) if a.cells else v), kind, size

    t0 = time.perf_counter()
    with torch.no_grad():
        train = [scene(size, 60_000_000 + size * 1000 + i)
                 for size, n in zip(train_sizes, counts) for i in range(n)]
        test = [scene(int(size), FIRST_HELD_OUT + i)
                for size in a.test_sizes.split(",") for i in range(a.test_count)]
    print(f"{len(train)} training and {len(test)} held-out scenes summarized in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    every = torch.cat([v for v, _, _ in train[:60]])
    mu, sd = every.mean(0), every.std(0)
    sd = sd.clamp_min(max(0.1 * float(sd.median()), 1e-3))
    results = []
    for seed in range(a.seeds):
        torch.manual_seed(seed)
        det = torch.nn.Sequential(torch.nn.Linear(every.shape[1], 64), torch.nn.GELU(),
                                  torch.nn.Linear(64, a.detectors))
        head = torch.nn.Linear(a.detectors, 1)
        opt = torch.optim.AdamW([*det.parameters(), *head.parameters()], 1e-3,
                                weight_decay=0.05)

        def logit(v, det=det, head=head):
            return head(det((v - mu) / sd).amax(0))[0]

        rng = np.random.default_rng(seed)
        for _ in range(a.steps):
            batch = rng.choice(len(train), a.batch, replace=False)
            loss = sum(torch.nn.functional.binary_cross_entropy_with_logits(
                logit(train[i][0]), torch.tensor(float(train[i][1]))) for i in batch)
            opt.zero_grad()
            (loss / a.batch).backward()
            opt.step()
        with torch.no_grad():
            margins: dict[int, list[float]] = {}
            for v, kind, size in test:
                z = float(logit(v))
                margins.setdefault(size, []).append(round(z if kind == 1 else -z, 2))
        row = {"seed": seed, "margins": margins, "right": _right(margins)}
        results.append(row)
        print(f"probe seed {seed}: " + ", ".join(
            f"{s} px {row['right'][s]:.0%} {m}" for s, m in sorted(margins.items())),
            flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "cells": a.cells, "train_sizes": train_sizes,
                       "train_count": counts, "steps": a.steps, "batch": a.batch,
                       "threads": a.threads, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
