"""How overlapping crops are merged, measured: the shipped demo model on held-out synthetic
SAR scenes larger than its training crop, run through the engine with blend="tokens"
(each region decoded once from window-averaged tokens) and blend="outputs" (every covering
crop decodes the region, output maps averaged), and with no overlap (crop_stride = k) as
the baseline. Prints sea/lake mIoU, vessel F1 (the task's context-dependent classes),
all-class mIoU, seconds per scene and decodes per region for each, and the ratio of each
to the no-overlap run of the same invocation.

Run: python benchmarks/blend_quality.py [--size 1024] [--count 8] [--threads 1]
     [--model demo|region-only|CKPT] [--modes "no overlap,tokens,outputs"] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np
import torch


def load(choice: str):
    """'demo', 'region-only' or a checkpoint path."""
    from napari_xt.model import load_checkpoint
    from napari_xt.train.demo import load_demo_model

    if choice in ("demo", "region-only"):
        return load_demo_model(region_only=choice == "region-only")
    return load_checkpoint(choice)


def measure(size: int, count: int, model_choice: str = "demo",
            modes: tuple[str, ...] = ("no overlap", "tokens", "outputs")) -> list[dict]:
    from napari_xt.engine import Finished, run
    from napari_xt.train.data import SyntheticDataset
    from napari_xt.train.demo import HELD_OUT_SEED, demo_training_config
    from napari_xt.train.metrics import ConfusionMatrix, DetectionCounts
    from napari_xt.train.synthetic import CLASS_NAMES

    cfg = demo_training_config()
    scene = dataclasses.replace(cfg.data.scene, height=size, width=size)
    data = SyntheticDataset(scene, HELD_OUT_SEED + 500_000, count, cfg.data.normalize)
    model = load(model_choice)
    k = model.cfg.crop_regions or 1
    e = cfg.eval
    known = {"no overlap": {"crop_stride": k, "blend": "tokens"},
             "tokens": {"blend": "tokens"}, "outputs": {"blend": "outputs"}}
    rows = []
    for label in modes:
        options = known[label]
        conf, det = ConfusionMatrix(len(CLASS_NAMES)), DetectionCounts(radius=e.radius)
        seconds, decoded, regions = 0.0, 0, 0
        for i in range(count):
            s = data[i]
            t = time.perf_counter()
            fin = None
            for event in run(s.image, model, None, cache=False, device="cpu", axes="CYX",
                             outputs=("labels", "detections"), threshold=e.threshold,
                             min_distance=e.min_distance, **options):
                fin = event
            seconds += time.perf_counter() - t
            assert isinstance(fin, Finished), fin
            decoded += fin.counts["decoded"]
            regions += fin.counts["regions"]
            arrays = fin.summary["arrays"]
            conf.update(s.mask, arrays["labels"])
            table = arrays["detections"]
            det.update(np.stack([table["y"], table["x"]], -1).reshape(-1, 2), table["score"],
                       s.points)
        rows.append({"mode": label, **options, "miou_sea_lake": conf.miou(list(e.context_classes)),
                     "vessel_f1": det.f1, "miou": conf.miou(), "seconds_per_scene": seconds / count,
                     "decodes_per_region": decoded / regions})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="demo",
                   help="demo (default), region-only, or a checkpoint path")
    p.add_argument("--modes", default="no overlap,tokens,outputs",
                   help="comma list of: no overlap, tokens, outputs (ratios: the first)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.size, args.count, args.model,
                   tuple(m.strip() for m in args.modes.split(",")))
    base = rows[0]
    print(f"{args.count} held-out scenes of {args.size}^2 px, model {args.model}, CPU, "
          f"{args.threads} thread(s); ratios against '{base['mode']}'")
    print(f"{'mode':>11} {'sea/lake mIoU':>14} {'vessel F1':>10} {'mIoU':>7} {'s/scene':>8} "
          f"{'ratio':>6} {'decodes/region':>15}")
    for r in rows:
        print(f"{r['mode']:>11} {100 * r['miou_sea_lake']:14.1f} {100 * r['vessel_f1']:10.1f} "
              f"{100 * r['miou']:7.1f} {r['seconds_per_scene']:8.2f} "
              f"{r['seconds_per_scene'] / base['seconds_per_scene']:6.2f} "
              f"{r['decodes_per_region']:15.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "count": args.count, "threads": args.threads,
                       "model": args.model, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
