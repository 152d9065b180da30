"""How a user's model choice becomes a loaded model, for the CLI, the demo and the widgets.

A choice is a plain string: `DEMO_MODEL` (or the short alias "demo") for the shipped demo
model, "demo-image" for its whole-image context version, "demo-beacon" for that version
taught the beacon variant too, "demo-region-only" for its region-only baseline, a zoo name,
or a path to a checkpoint file. A loaded model comes with the input normalization it was
trained with (per-channel mean and std, from the checkpoint's training config) or None (raw
pixels). Zoo models get random weights from a
fixed seed, so the same choice gives the same model every time and a rerun can resume its
store.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEMO_MODEL = "xT demo (built-in)"
DEMO_ALIASES = (DEMO_MODEL, "demo")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt")

Normalize = tuple[tuple[float, ...], tuple[float, ...]]


def is_checkpoint(choice: str) -> bool:
    """True when `choice` names a checkpoint file rather than a zoo model."""
    from .demo_weights import BUILT_IN

    return choice not in DEMO_ALIASES and choice not in BUILT_IN and (
        os.sep in choice or Path(choice).suffix in CHECKPOINT_SUFFIXES
    )


def seeded_zoo_model(name: str, in_chans: int | None = None, seed: int = 0):
    """Zoo model `name` with random weights drawn from a fixed seed. The global RNG is
    untouched."""
    import torch

    from .zoo import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name, in_chans=in_chans)


def checkpoint_normalization(path: str | os.PathLike) -> Normalize | None:
    """(mean, std) from a napari-xt training checkpoint's header, None if it has none."""
    from .checkpoint import CheckpointError, read_metadata

    try:
        meta = read_metadata(path)
        norm = json.loads(meta["train.config"])["data"]["normalize"]
        return tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"])
    except (CheckpointError, OSError, KeyError, TypeError, ValueError):
        return None


def load_demo_model(in_chans: int | None = None):
    """(model, description, normalization): the shipped demo model. Its weights missing
    from the installation is an error naming the file (never a silent stand-in)."""
    from .demo_weights import demo_weights_path, load_demo_weights

    path = demo_weights_path()  # `in_chans` does not apply: the engine checks the image
    return load_demo_weights(), "built-in demo model", checkpoint_normalization(path)


def load_model(choice: str, in_chans: int | None = None):
    """(model in eval mode, description, normalization) for a choice. Zoo models are built
    with `in_chans` input channels; checkpoints keep their own. A checkpoint path that does
    not exist raises FileNotFoundError; an unknown zoo name a KeyError listing close names."""
    from .demo_weights import BUILT_IN

    if choice in DEMO_ALIASES:
        model, what, normalize = load_demo_model(in_chans)
    elif choice in BUILT_IN:
        from .demo_weights import demo_weights_path, load_demo_weights

        model, what = load_demo_weights(name=choice), f"built-in model {choice}"
        normalize = checkpoint_normalization(demo_weights_path(name=choice))
    elif is_checkpoint(choice) or Path(choice).is_file():
        from .checkpoint import load_checkpoint

        if not Path(choice).is_file():
            raise FileNotFoundError(f"checkpoint {choice} does not exist")
        model, what = load_checkpoint(choice), f"checkpoint {Path(choice).name}"
        normalize = checkpoint_normalization(choice)
    else:
        model = seeded_zoo_model(choice, in_chans)
        what, normalize = f"{choice} (random weights, seed 0)", None
    return model.eval(), what, normalize
