"""One image over workers: `run_distributed` with 1 and N worker processes against one
ordinary engine run, on the same image, model and store settings.

A synthetic SAR scene of `--size` px is predicted with the shipped demo model into fresh
stores (embedding cache on in every run, as a distributed run needs it):

- baseline: one process, `run`, all `--threads` torch threads;
- `run_distributed` on a local cluster of 1 worker with all threads (the cost of splitting
  the run into parts, with no parallelism to gain);
- `run_distributed` on `--workers` workers with `threads / workers` threads each.

The clusters are started, and every worker has loaded the model, before the clock starts
(that start-up, which a `--workers N` run pays once, is printed apart). Every
store is checked equal, bit for bit, to the baseline's labels. Prints seconds, megapixels
per second, the speed-up against the baseline and how long the coordinating process spent
finishing the store after the last part (pyramids, table, metadata).

Run: python benchmarks/distributed_image.py [--size 4096] [--workers 2] [--threads 2]
     [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _timed(events) -> dict:
    from napari_xt.engine import Finished, Written

    t0 = time.perf_counter()
    last_written = t0
    last = None
    for e in events:
        last = e
        if isinstance(e, Written):
            last_written = time.perf_counter()
    end = time.perf_counter()
    assert isinstance(last, Finished) and last.summary["complete"], last
    return {"seconds": end - t0, "finish_seconds": end - last_written,
            "counts": dict(last.counts)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads in all")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import distributed
    import torch

    from napari_xt.distributed import run_distributed
    from napari_xt.distributed.cluster import local_cluster, model_for
    from napari_xt.engine import run
    from napari_xt.io import read_labels
    from napari_xt.train.synthetic import SceneConfig, make_scene

    work = Path(tempfile.mkdtemp(prefix="xt-dist-"))
    image, _, _ = make_scene(0, SceneConfig(height=args.size, width=args.size))
    path = work / "scene.npy"
    np.save(path, image)
    del image
    mp = args.size**2 / 1e6
    model, norm = model_for("demo")
    torch.set_num_threads(args.threads)
    base = work / "single.zarr"
    rows = [{"mode": "1 process (run)", "workers": 0, "threads_each": args.threads,
             **_timed(run(str(path), model, base, normalize=norm))}]
    labels = np.asarray(read_labels(base, "prediction").levels[0])
    for workers in (1, args.workers):
        threads = max(1, args.threads // workers)
        t0 = time.perf_counter()
        cluster = local_cluster(distributed.LocalCluster, workers)
        with distributed.Client(cluster) as client:  # imports and the model, every worker
            client.run(model_for, "demo")
        startup = time.perf_counter() - t0
        try:
            out = work / f"dist{workers}.zarr"
            row = _timed(run_distributed(str(path), "demo", out,
                                         scheduler=cluster.scheduler_address,
                                         threads=threads))
        finally:
            cluster.close()
        same = np.array_equal(np.asarray(read_labels(out, "prediction").levels[0]), labels)
        assert same, f"{workers} workers: labels differ from the single-process run"
        rows.append({"mode": f"{workers} worker(s) (run_distributed)", "workers": workers,
                     "threads_each": threads, "cluster_start_seconds": startup,
                     "bit_identical": same, **row})
    base_s = rows[0]["seconds"]
    for r in rows:
        r["mp_per_s"] = mp / r["seconds"]
        r["speedup"] = base_s / r["seconds"]
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"one {args.size}^2 scene ({mp:.1f} MP), demo model, {args.threads} torch threads "
          f"in all, {machine}")
    for r in rows:
        extra = (f"  (cluster start {r['cluster_start_seconds']:.1f} s, not counted)"
                 if "cluster_start_seconds" in r else "")
        print(f"{r['mode']:<32} {r['seconds']:7.1f} s  {r['mp_per_s']:5.2f} MP/s  "
              f"speed x{r['speedup']:.2f}  finishing {r['finish_seconds']:.1f} s{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine,
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
