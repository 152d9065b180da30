"""Training memory against scene size: whole-image context training (scene summary under
no_grad, the scene encoder and 2 crops with gradients) against the naive step that
backpropagates through the whole scene at once, in the same invocation.

Measured per step: the bytes of every tensor autograd saves for backward (what grows with
the activations; counted by a saved-tensors hook) and the wall time. The naive step stops at
`--naive-max` px (it grows with the scene area).

Run: python benchmarks/train_memory.py [--sizes 512,1024,2048,4096] [--naive-max 1024]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _trainer(size: int, out: Path):
    from napari_xt.train.config import TrainConfig
    from napari_xt.train.loop import Trainer

    cfg = TrainConfig.from_dict({
        "model": {"checkpoint": "demo", "overrides": {"global_context": {"grid": 64}}},
        "data": {"scene": {"height": size, "width": size}, "scene_sizes": [size],
                 "beacon_fraction": 0.5, "scene_pool": 1, "crops_per_scene": 2,
                 "val_count": 1},
        "optim": {"steps": 1, "batch_size": 1},
        "loss": {"token_weight": 0.5},
        "run": {"threads": 2, "freeze": ["region_encoder"], "checkpoint_every": 0,
                "eval_every": 0},
    })
    return Trainer(cfg, out)


def _saved_bytes(step) -> tuple[int, float]:
    import torch

    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total[0], time.perf_counter() - t0


def measure(sizes: list[int], naive_max: int) -> list[dict]:
    from napari_xt.train.data import collate

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            trainer = _trainer(size, Path(tmp) / str(size))
            trainer.model.train()
            trainer._keep_frozen_eval()
            trainer.scenes.forward_backward(trainer, 0)  # the scene summary, kept
            saved, seconds = _saved_bytes(
                lambda t=trainer: t.scenes.forward_backward(t, 0))
            rows.append({"size": size, "mode": "whole-image (2 crops)", "saved_mb": saved / 2**20,
                         "seconds": seconds})
            print(f"{size:>6} whole-image  {saved / 2**20:9.1f} MB saved  {seconds:6.2f} s",
                  flush=True)
            if size <= naive_max:
                from napari_xt.train.data import SyntheticDataset

                data = SyntheticDataset(trainer.cfg.data.scene, 0, 1, trainer.normalization)
                batch = collate([data[0]], 2.0)
                saved, seconds = _saved_bytes(
                    lambda t=trainer, b=batch: t.forward_backward(b, 0))
                rows.append({"size": size, "mode": "whole scene backward",
                             "saved_mb": saved / 2**20, "seconds": seconds})
                print(f"{size:>6} whole scene  {saved / 2**20:9.1f} MB saved  {seconds:6.2f} s",
                      flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="512,1024,2048,4096")
    p.add_argument("--naive-max", type=int, default=1024)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    rows = measure([int(s) for s in args.sizes.split(",")], args.naive_max)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
