"""Which models the widgets offer. A choice becomes a loaded model through
`napari_xt.model.choice` (shared with the CLI), in the worker thread: torch is imported
there, never when the widget is built.
"""

from __future__ import annotations

import sys
from pathlib import Path

from napari_xt.model.choice import DEMO_MODEL

__all__ = ["CHECKPOINT_FILTER", "DEMO_MODEL", "LOAD_CHECKPOINT",
           "keep_triton_out", "load_model", "zoo_names"]

LOAD_CHECKPOINT = "Load checkpoint…"
CHECKPOINT_FILTER = "xT checkpoints (*.safetensors *.ckpt *.pth *.pt);;All files (*)"


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


def load_model(choice: str, in_chans: int | None = None):
    """`napari_xt.model.choice.load_model`, with triton kept out of a napari process first."""
    from napari_xt.model.choice import load_model as load

    keep_triton_out()
    return load(choice, in_chans)
