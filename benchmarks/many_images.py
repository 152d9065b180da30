"""Throughput of many images: `predict_many` with worker processes against one process.

Writes `--count` synthetic SAR scenes of `--size` px as .npy files, then predicts them with
the shipped demo model three ways, each into fresh stores: one process with all
`--threads` torch threads (the baseline), and `--workers` processes with
`threads / workers` threads each. Prints seconds, images per minute and megapixels per
second of each, and the ratio to the baseline.

Run: python benchmarks/many_images.py [--count 4] [--size 2048] [--workers 2] [--threads 2]
     [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=4)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads in all")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from napari_xt.distributed import predict_many
    from napari_xt.train.synthetic import SceneConfig, make_scene

    work = Path(tempfile.mkdtemp(prefix="xt-many-"))
    images = []
    for seed in range(args.count):
        image, _, _ = make_scene(seed, SceneConfig(height=args.size, width=args.size))
        np.save(work / f"scene{seed}.npy", image)
        images.append(str(work / f"scene{seed}.npy"))
    mp = args.count * args.size**2 / 1e6
    rows = []
    for label, workers, threads in (
            ("1 process", 1, args.threads),
            (f"{args.workers} workers", args.workers, max(1, args.threads // args.workers))):
        out = work / label.replace(" ", "_")
        t0 = time.perf_counter()
        outcomes = list(predict_many(images, "demo", out, workers=workers, threads=threads,
                                     cache=False))
        seconds = time.perf_counter() - t0
        assert all(o.outcome == "finished" for o in outcomes), outcomes
        rows.append({"mode": label, "workers": workers, "threads_each": threads,
                     "seconds": seconds, "images_per_min": 60 * args.count / seconds,
                     "mp_per_s": mp / seconds})
    base = rows[0]["seconds"]
    print(f"{args.count} scenes of {args.size}^2 ({mp:.0f} MP), demo model, "
          f"{args.threads} torch threads in all")
    for r in rows:
        print(f"{r['mode']:<12} {r['seconds']:7.1f} s  {r['images_per_min']:6.2f} images/min  "
              f"{r['mp_per_s']:5.2f} MP/s  speed x{base / r['seconds']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
