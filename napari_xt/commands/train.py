"""``napari-xt train CONFIG.yaml [--out DIR] [--resume] [--steps N]``: train an xT model.

Progress is printed one line per event; checkpoints (model + training state) land in
``OUT/checkpoints`` and the final model in ``OUT/model.safetensors``. ``--resume`` continues
from the latest checkpoint in OUT with the same data, schedule and random state.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
                        help="override run.threads (torch CPU threads)")
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


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from napari_xt.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
    from napari_xt.train.config import load_config
    from napari_xt.train.loop import Trainer

    config_path = Path(args.config)
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

    def show(event) -> None:
        print(format_event(event), flush=True)

    from napari_xt.model.checkpoint import CheckpointError

    try:  # a model or data that cannot be built is bad input: nothing is written then
        trainer = Trainer(cfg, out, callback=show)
    except (ValueError, KeyError, FileNotFoundError, CheckpointError) as exc:
        print(f"napari-xt train: {config_path}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.yaml").write_text(config_path.read_text())
    if args.resume:
        try:
            step = trainer.resume()
        except FileNotFoundError as exc:
            print(f"napari-xt train: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"resumed at step {step}", flush=True)
    try:
        trainer.fit(args.steps)
    except FloatingPointError as exc:
        print(f"napari-xt train: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
