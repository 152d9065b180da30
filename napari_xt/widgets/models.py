"""Which models the widgets offer and how a choice becomes a loaded model.

Choices are plain strings: `DEMO_MODEL` (the shipped demo model), a zoo name, or a path to a
checkpoint file. Loading happens in the worker thread (torch is imported there, never when
the widget is built).
"""

from __future__ import annotations

import os
from pathlib import Path

DEMO_MODEL = "xT demo (built-in)"
LOAD_CHECKPOINT = "Load checkpoint…"
CHECKPOINT_FILTER = "xT checkpoints (*.safetensors *.ckpt *.pth *.pt);;All files (*)"
#: zoo model used as the demo when no trained demo model ships (random weights).
DEMO_FALLBACK = "xt_tiny_demo_seg"


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


def load_demo_model(in_chans: int | None = None):
    """The shipped demo model, or the untrained `DEMO_FALLBACK` zoo model (with `in_chans`
    channels) when the package has no trained demo model. Returns (model, description)."""
    try:
        from napari_xt.train.demo import load_demo_model as load_trained
    except ImportError:
        from napari_xt.model.zoo import create_model

        model = create_model(DEMO_FALLBACK, in_chans=in_chans)
        return model, f"{DEMO_FALLBACK} (untrained: no trained demo model is installed)"
    return load_trained(), "built-in demo model"


def load_model(choice: str, in_chans: int | None = None):
    """(model in eval mode, description) for a widget choice. Zoo models are built with
    `in_chans` input channels (random weights); checkpoints keep their own channels."""
    if choice == DEMO_MODEL:
        model, what = load_demo_model(in_chans)
    elif is_checkpoint(choice):
        from napari_xt.model.checkpoint import load_checkpoint

        model, what = load_checkpoint(choice), f"checkpoint {Path(choice).name}"
    else:
        from napari_xt.model.zoo import create_model

        model = create_model(choice, in_chans=in_chans)
        what = f"{choice} (random weights)"
    return model.eval(), what
