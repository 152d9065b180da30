"""Which models the widgets offer and how a choice becomes a loaded model.

Choices are plain strings: `DEMO_MODEL` (the shipped demo model), a zoo name, or a path to a
checkpoint file. Loading happens in the worker thread (torch is imported there, never when
the widget is built). A loaded model comes with the input normalization it was trained with
(per-channel mean and std, from the checkpoint's training config) or None (raw pixels).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

DEMO_MODEL = "xT demo (built-in)"
LOAD_CHECKPOINT = "Load checkpoint…"
CHECKPOINT_FILTER = "xT checkpoints (*.safetensors *.ckpt *.pth *.pt);;All files (*)"
#: zoo model used as the demo when the trained demo weights are not installed (random).
DEMO_FALLBACK = "xt_tiny_demo_seg"

Normalize = tuple[tuple[float, ...], tuple[float, ...]]


def keep_triton_out() -> bool:
    """Inside a napari window, make `import triton` fail cleanly instead of crashing.

    Triton's bundled LLVM clashes with the LLVM that Mesa's software OpenGL (llvmpipe: Xvfb,
    machines without a GPU driver) has already loaded for the canvas: loading triton after it
    kills the process (segfault while torch imports `torch._dynamo`). When that LLVM is
    mapped and triton is not loaded yet, triton is marked unavailable, so torch runs eagerly
    (no `torch.compile`; the widgets never compile). Returns True when it did so."""
    if "triton" in sys.modules or not sys.platform.startswith("linux"):
        return False
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    if "libLLVM" not in maps:
        return False
    sys.modules["triton"] = None  # `import triton` raises ImportError from now on
    return True


def zoo_names() -> list[str]:
    """Zoo model names, small CPU demos first."""
    from napari_xt.model.zoo import list_models

    names = list_models()
    demos = [n for n in names if "demo" in n]
    return demos + [n for n in names if n not in demos]


def is_checkpoint(choice: str) -> bool:
    return choice not in (DEMO_MODEL, LOAD_CHECKPOINT) and (
        os.sep in choice or Path(choice).suffix in (".safetensors", ".ckpt", ".pth", ".pt")
    )


def seeded_zoo_model(name: str, in_chans: int | None = None, seed: int = 0):
    """Zoo model `name` with random weights drawn from a fixed seed, so the same choice gives
    the same model every time (a rerun can resume its store). The global RNG is untouched."""
    import torch

    from napari_xt.model.zoo import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name, in_chans=in_chans)


def checkpoint_normalization(path: str | os.PathLike) -> Normalize | None:
    """(mean, std) from a napari-xt training checkpoint's header, None if it has none."""
    from napari_xt.model.checkpoint import CheckpointError, read_metadata

    try:
        meta = read_metadata(path)
        norm = json.loads(meta["train.config"])["data"]["normalize"]
        return tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"])
    except (CheckpointError, OSError, KeyError, TypeError, ValueError):
        return None


def load_demo_model(in_chans: int | None = None):
    """(model, description, normalization): the shipped demo model, or the untrained
    `DEMO_FALLBACK` zoo model (with `in_chans` channels) when its weights are missing."""
    try:
        from napari_xt.train.demo import demo_weights_path
        from napari_xt.train.demo import load_demo_model as load_trained

        path = demo_weights_path()
    except (ImportError, FileNotFoundError):
        model = seeded_zoo_model(DEMO_FALLBACK, in_chans)
        return model, f"{DEMO_FALLBACK} (untrained: demo weights not installed)", None
    return load_trained(), "built-in demo model", checkpoint_normalization(path)


def load_model(choice: str, in_chans: int | None = None):
    """(model in eval mode, description, normalization) for a widget choice. Zoo models are
    built with `in_chans` input channels (random weights); checkpoints keep their own."""
    keep_triton_out()
    normalize = None
    if choice == DEMO_MODEL:
        model, what, normalize = load_demo_model(in_chans)
    elif is_checkpoint(choice):
        from napari_xt.model.checkpoint import load_checkpoint

        model, what = load_checkpoint(choice), f"checkpoint {Path(choice).name}"
        normalize = checkpoint_normalization(choice)
    else:
        model = seeded_zoo_model(choice, in_chans)
        what = f"{choice} (random weights, seed 0)"
    return model.eval(), what, normalize
