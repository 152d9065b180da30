"""Checkpoints of a training run: model weights (safetensors, via the model's checkpoint
module) plus a training-state file (optimizer, scheduler, step, RNG) for exact resume.

Layout of a run folder::

    OUT/checkpoints/step_0000200.safetensors   model + config (+ train metadata)
    OUT/checkpoints/step_0000200.state.pt      plain tensors/dicts (torch.save), loaded with
                                               torch.load(weights_only=True)
    OUT/latest.json                            {"step": 200, "model": ..., "state": ...}
    OUT/model.safetensors                      the final model

A data-parallel run writes the same files from rank 0 alone; the state also records the
global batch and the number of ranks, and any number of ranks resumes it with the same
global batch.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_VERSION = 1


def checkpoint_paths(out_dir: str | os.PathLike, step: int) -> tuple[Path, Path]:
    """(model, training state) paths of the checkpoint of `step` in run folder `out_dir`."""
    base = Path(out_dir) / "checkpoints" / f"step_{step:07d}"
    return base.with_suffix(".safetensors"), Path(f"{base}.state.pt")


def rng_state() -> dict[str, Any]:
    """Torch (CPU and CUDA) and python RNG states as plain tensors.

    numpy draws in training always come from generators seeded by (seed, step), so there is
    no global numpy state to keep.
    """
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(
            np.frombuffer(json.dumps(random.getstate()).encode(), dtype=np.uint8).copy()
        ),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states saved by `rng_state`."""
    torch.set_rng_state(state["torch"])
    py = json.loads(bytes(state["python"].numpy().tobytes()).decode())
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        # the devices this process sees now (a resume on a machine, or under a
        # CUDA_VISIBLE_DEVICES, with fewer GPUs than the run that saved them)
        for index, saved in enumerate(list(state["cuda"])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(saved, index)


def save_training_state(
    path: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    extra: dict[str, Any] | None = None,
    global_batch: int | None = None,
    world_size: int = 1,
) -> Path:
    """Write optimizer/scheduler/step/RNG atomically to `path` (torch.save of plain data),
    with the run's global batch and number of ranks when given."""
    payload = {
        "version": STATE_VERSION,
        "step": int(step),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "extra": extra or {},
        "world_size": int(world_size),
    }
    if global_batch is not None:
        payload["global_batch"] = int(global_batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training-state file (weights_only: no code is unpickled)."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if payload.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: unsupported training-state version {payload.get('version')}")
    return payload


def check_same_global_batch(payload: dict[str, Any], batch_size: int,
                            path: str | os.PathLike) -> None:
    """Refuse to resume a run saved with another global batch (states of earlier versions,
    which do not record it, pass)."""
    saved = payload.get("global_batch")
    if saved is not None and int(saved) != int(batch_size):
        raise ValueError(f"{Path(path).name} was trained with optim.batch_size {saved} (the "
                         f"global batch, over {payload.get('world_size', 1)} process(es)); "
                         f"resume it with the same batch size, not {batch_size}")


def write_latest(out_dir: str | os.PathLike, step: int, model: Path, state: Path) -> None:
    """Point OUT/latest.json at the checkpoint of `step` (written atomically)."""
    out = Path(out_dir)
    tmp = out / ".latest.json.tmp"
    tmp.write_text(json.dumps({"step": step, "model": model.name, "state": state.name}))
    os.replace(tmp, out / "latest.json")


def read_latest(out_dir: str | os.PathLike) -> tuple[int, Path, Path] | None:
    """(step, model path, state path) of the last checkpoint of a run, or None."""
    latest = Path(out_dir) / "latest.json"
    if not latest.is_file():
        return None
    info = json.loads(latest.read_text())
    folder = Path(out_dir) / "checkpoints"
    return int(info["step"]), folder / info["model"], folder / info["state"]


def prune_checkpoints(out_dir: str | os.PathLike, keep: int) -> None:
    """Keep the `keep` most recent checkpoint pairs of a run."""
    folder = Path(out_dir) / "checkpoints"
    models = sorted(folder.glob("step_*.safetensors"))
    for old in models[: max(0, len(models) - keep)]:
        old.unlink(missing_ok=True)
        Path(str(old).replace(".safetensors", ".state.pt")).unlink(missing_ok=True)
