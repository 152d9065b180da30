"""Training steps per second: data-parallel processes against one process, same global batch.

Trains the shipped demo model's recipe (`configs/demo.yaml`: global batch 4, 256 px crops;
evaluation and checkpoints off) for `--steps` steps through the command line, three ways,
each into a fresh run folder: one process with 1 torch thread, one process with all
`--threads` threads (the baseline), and `--nproc` processes (`napari-xt train --nproc`, gloo)
with `threads / nproc` threads each. Steps per second are timed from the events in each
run's `train_log.jsonl`, after `--warmup` steps (process start, model build and the first
steps are left out). Prints steps/s of each and the ratio to the baseline, and checks that
every way logged the same losses (the global batch is the same).

With `--device cuda` (a machine with `--nproc` GPUs; NCCL) the ways are one process on one
GPU (the baseline) and `--nproc` processes, one GPU each; `benchmarks/gpu_engine.py` runs
it so on a machine with 2 or more GPUs.

Run: python benchmarks/ddp_training.py [--steps 20] [--warmup 3] [--nproc 2] [--threads 2]
     [--batch 4] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _config(folder: Path, batch: int) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["optim"]["batch_size"] = batch
    cfg["run"].update(checkpoint_every=0, eval_every=0, log_every=1)
    path = folder / "ddp_bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(config: Path, out: Path, steps: int, nproc: int, threads: int,
         device: str = "cpu") -> tuple[float, list]:
    """Train; returns (wall seconds of the command, step events)."""
    argv = [sys.executable, "-m", "napari_xt", "train", str(config), "--out", str(out),
            "--steps", str(steps), "--threads", str(threads), "--device", device]
    if nproc > 1:
        argv += ["--nproc", str(nproc)]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    events = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return wall, [e for e in events if e["kind"] == "step"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads in all")
    p.add_argument("--batch", type=int, default=4, help="the global batch")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")

    work = Path(tempfile.mkdtemp(prefix="xt-ddp-"))
    config = _config(work, args.batch)
    if args.device == "cuda":  # one GPU against one GPU per process
        ways = [("1 process, 1 GPU", 1, args.threads),
                (f"{args.nproc} processes, 1 GPU each", args.nproc, args.threads)]
    else:
        ways = [("1 process, 1 thread", 1, 1), (f"1 process, {args.threads} threads", 1,
                                                 args.threads),
                (f"{args.nproc} processes", args.nproc, max(1, args.threads // args.nproc))]
    rows, losses = [], {}
    for k, (mode, nproc, threads) in enumerate(ways):
        load = os.getloadavg()[0]
        wall, steps = _run(config, work / f"run{k}", args.steps, nproc, threads, args.device)
        timed = steps[args.warmup - 1:]
        seconds = timed[-1]["elapsed"] - timed[0]["elapsed"]
        rate = (len(timed) - 1) / seconds
        losses[mode] = [e["loss"] for e in steps]
        rows.append({"mode": mode, "processes": nproc, "threads_each": threads,
                     "steps_per_s": rate, "timed_steps": len(timed) - 1,
                     "timed_seconds": seconds, "command_seconds": wall,
                     "load_before": load})
        print(f"{mode:>24}: {rate:6.2f} steps/s  ({len(timed) - 1} steps in {seconds:6.1f} s; "
              f"command {wall:6.1f} s; load before {load:.1f})", flush=True)
    base_row, many = rows[-2], rows[-1]  # (one process with every thread or its GPU)
    for row in rows:
        row["ratio_to_baseline"] = row["steps_per_s"] / base_row["steps_per_s"]
    first = next(iter(losses.values()))
    spread = max(abs(a - b) / abs(b) for ls in losses.values() for a, b in zip(ls, first))
    print(f"{many['mode']} / {base_row['mode']}: {many['ratio_to_baseline']:.2f}x; "
          f"largest relative difference of the logged losses {spread:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cpu_count": os.cpu_count(),
                                               "rows": rows, "loss_spread": spread},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
