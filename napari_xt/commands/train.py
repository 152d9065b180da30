"""``napari-xt train CONFIG.yaml [--out DIR] [--resume] [--steps N] [--nproc N]``: train an xT
model.

Progress is printed one line per event and appended to ``OUT/train_log.jsonl`` (one JSON
object per event); checkpoints (model + training state) land in ``OUT/checkpoints`` and the
final model in ``OUT/model.safetensors``. ``--resume`` continues from the latest checkpoint in
OUT with the same data, schedule and random state.

Several processes train one data-parallel run (`napari_xt.train.ddp`): ``--nproc N`` starts N
local ranks (`napari_xt.train.launch`), and ``torchrun --nproc_per_node N -m napari_xt train
CONFIG ...`` (any torchrun launch) runs the same code. ``optim.batch_size`` is the global
batch, shared out among the ranks; rank 0 prints, evaluates and writes the run folder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

LOG_NAME = "train_log.jsonl"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an xT model from a YAML config",
        description="Train an xT model (region encoder + context encoder + head) end to end.",
    )
    parser.add_argument("config", help="training config (YAML), e.g. configs/demo.yaml")
    parser.add_argument("--out", default=None,
                        help="run folder (default: runs/<config file stem>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in the run folder")
    parser.add_argument("--steps", type=int, default=None,
                        help="stop after this many steps (the schedule keeps its length)")
    parser.add_argument("--device", default=None, help="override run.device (cpu, cuda, ...)")
    parser.add_argument("--threads", type=int, default=None,
                        help="override run.threads (torch CPU threads, per process; with "
                             "--nproc N on the CPU the default is each process's share of "
                             "the cores, at most run.threads)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="train with N local processes (data parallel: gloo on the CPU, "
                             "NCCL with one GPU each on cuda); optim.batch_size stays the "
                             "global batch")
    parser.set_defaults(func=run)


def format_event(event) -> str:
    """One printable line per training event."""
    head = f"[{event.kind:>10}] step {event.step}/{event.total} {event.elapsed:7.1f}s"
    if event.kind == "step":
        terms = " ".join(f"{k}={v:.4f}" for k, v in event.terms.items())
        return f"{head} loss={event.loss:.4f} {terms} lr={event.lr:.2e}"
    if event.kind == "eval":
        keys = [k for k in event.metrics if not k.startswith("det_") or k == "det_f1"]
        return head + " " + " ".join(f"{k}={event.metrics[k]:.3f}" for k in keys)
    if event.path:
        return f"{head} {event.path}"
    return head


def event_json(event) -> str:
    """One line of ``train_log.jsonl``: the event's fields (NaN written as null)."""

    def plain(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return json.dumps(plain(asdict(event)))


def read_log(out: str | Path) -> list[dict]:
    """The events of a run folder's ``train_log.jsonl``, oldest first."""
    path = Path(out) / LOG_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from napari_xt.cli import EXIT_USAGE
    from napari_xt.train.config import load_config
    from napari_xt.train.ddp import check_devices, check_global_batch, launched_world_size

    config_path = Path(args.config)
    for option, value in (("--steps", args.steps), ("--threads", args.threads)):
        if value is not None and value < 1:
            print(f"napari-xt train: {option} must be at least 1, not {value}", file=sys.stderr)
            return EXIT_USAGE
    if not config_path.is_file():
        print(f"napari-xt train: no config file {config_path}", file=sys.stderr)
        return EXIT_USAGE
    try:
        cfg = load_config(config_path)
        if args.device:
            cfg = replace(cfg, run=replace(cfg.run, device=args.device))
        if args.threads:
            cfg = replace(cfg, run=replace(cfg.run, threads=args.threads))
    except (ValueError, KeyError, TypeError) as exc:
        print(f"napari-xt train: invalid config {config_path}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out) if args.out else Path("runs") / config_path.stem
    try:
        launched = launched_world_size()
    except ValueError as exc:
        print(f"napari-xt train: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.nproc is not None and (args.nproc < 1 or launched is not None):
        why = ("must be >= 1" if args.nproc < 1 else
               "starts its own processes; leave it out when torchrun starts them")
        print(f"napari-xt train: --nproc {why}", file=sys.stderr)
        return EXIT_USAGE
    try:
        check_global_batch(cfg.optim.batch_size, args.nproc or launched or 1)
        if args.nproc is not None and args.nproc > 1:
            check_devices(cfg.run.device, args.nproc)
    except ValueError as exc:
        print(f"napari-xt train: {config_path}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.nproc is not None and args.nproc > 1:
        return _launch(args, cfg, config_path, out)
    if launched is None:
        return _train(args, cfg, config_path, out, None)
    return _rank(args, cfg, config_path, out)


def rank_threads(configured: int | None, nproc: int) -> int:
    """Torch threads of each of `nproc` CPU ranks when `--threads` is not given: its share of
    the cores (`default_threads`, as local workers of a distributed run get), and no more
    than `configured` (`run.threads`), so that N ranks do not each take the threads meant
    for one process."""
    from napari_xt.distributed.cluster import default_threads

    share = default_threads(nproc)
    return min(configured or share, share)


def _launch(args: argparse.Namespace, cfg, config_path: Path, out: Path) -> int:
    """Run this command as `args.nproc` local ranks; their exit decides ours."""
    from napari_xt.train.launch import run_ranks

    argv = [sys.executable, "-m", "napari_xt", "train", str(config_path), "--out", str(out)]
    if args.resume:
        argv.append("--resume")
    threads = args.threads
    if threads is None and str(cfg.run.device).startswith("cpu"):
        threads = rank_threads(cfg.run.threads, args.nproc)
    for flag, value in (("--steps", args.steps), ("--device", args.device),
                        ("--threads", threads)):
        if value is not None:
            argv += [flag, str(value)]
    result = run_ranks(argv, args.nproc)
    if result.cancelled:
        print(f"napari-xt train: cancelled; the {args.nproc} processes were stopped; the "
              "checkpoints written so far are kept, --resume continues", file=sys.stderr)
    elif result.failed:
        which = ", ".join(f"rank {r} (exit code {c})" for r, c in result.failed)
        rest = "" if len(result.failed) == args.nproc else "; the other processes were stopped"
        print(f"napari-xt train: {which} failed{rest}", file=sys.stderr)
    return result.code


def _rank(args: argparse.Namespace, cfg, config_path: Path, out: Path) -> int:
    """One rank of a torchrun-style launch: join the group, train, leave it."""
    from napari_xt.cli import EXIT_USAGE
    from napari_xt.train.ddp import init_world
    from napari_xt.train.launch import watch_launcher

    watch_launcher()
    try:
        world = init_world(cfg.run.device)
    except ValueError as exc:
        print(f"napari-xt train: {exc}", file=sys.stderr)
        return EXIT_USAGE
    code = _train(args, cfg, config_path, out, world)
    world.close()
    return code


def _train(args: argparse.Namespace, cfg, config_path: Path, out: Path, world) -> int:
    from napari_xt.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
    from napari_xt.model.checkpoint import CheckpointError
    from napari_xt.train.loop import Trainer

    main = world is None or world.is_main
    where = "napari-xt train" if world is None else f"napari-xt train [rank {world.rank}]"

    def show(event) -> None:
        print(format_event(event), flush=True)
        with open(out / LOG_NAME, "a") as log:
            log.write(event_json(event) + "\n")

    try:  # a model or data that cannot be built is bad input: nothing is written then
        trainer = Trainer(cfg, out, callback=show, world=world)
    except (ValueError, KeyError, FileNotFoundError, CheckpointError) as exc:
        print(f"{where}: {config_path}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    step = None
    if args.resume:  # (before anything is written: a refused resume leaves the run as it was)
        try:
            step = trainer.resume()
        except (FileNotFoundError, ValueError) as exc:
            print(f"{where}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.yaml").write_text(config_path.read_text())
        if step is not None:
            print(f"resumed at step {step}", flush=True)
    try:
        trainer.fit(args.steps)
    except FloatingPointError as exc:
        print(f"{where}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
