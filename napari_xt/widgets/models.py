"""Which models the widgets offer. A choice becomes a loaded model through
`napari_xt.model.choice` (shared with the CLI), in the worker thread: torch is imported
there, never when the widget is built.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from napari_xt.model.choice import DEMO_MODEL, is_checkpoint

__all__ = ["CHECKPOINT_FILTER", "DEMO_MODEL", "LOAD_CHECKPOINT", "is_checkpoint",
           "built_in_names", "keep_triton_out", "load_model", "run_tag", "training_note",
           "zoo_names"]

LOAD_CHECKPOINT = "Load checkpoint…"
CHECKPOINT_FILTER = "xT checkpoints (*.safetensors *.ckpt *.pth *.pt);;All files (*)"


def keep_triton_out() -> bool:
    """Inside a napari window, make `import triton` fail cleanly instead of crashing.

    Triton's bundled LLVM clashes with the LLVM that Mesa's software OpenGL (llvmpipe: Xvfb,
    machines without a GPU driver) has already loaded for the canvas: loading triton after it
    kills the process (segfault while torch imports `torch._dynamo`). When that LLVM is
    mapped and triton is not loaded yet, triton is marked unavailable (an entry None in
    `sys.modules`), so torch runs eagerly (no `torch.compile`; the widgets never compile).
    This holds for the rest of the process - the LLVM stays loaded with the canvas, so any
    later import of triton, by any code, would crash it - and is said in the log once.
    Nothing happens on a machine with a GPU OpenGL driver (no Mesa LLVM), when triton is
    already loaded, or with `NAPARI_XT_ALLOW_TRITON=1`. Returns True when it did so."""
    import logging
    import os

    if "triton" in sys.modules or not sys.platform.startswith("linux"):
        return False
    if os.environ.get("NAPARI_XT_ALLOW_TRITON", "").strip() == "1":
        return False
    if not any("libLLVM" in lib for lib in _mapped_libraries()):
        return False
    sys.modules["triton"] = None  # `import triton` raises ImportError from now on
    logging.getLogger("napari_xt").warning(
        "napari-xt: triton marked unavailable in this process (Mesa's software OpenGL has "
        "its own LLVM loaded; loading triton's would crash napari); torch runs eagerly. "
        "NAPARI_XT_ALLOW_TRITON=1 leaves triton alone.")
    return True


def _mapped_libraries() -> list[str]:
    """Paths of the shared libraries this process has mapped (Linux; else none)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    return sorted({line.rsplit(" ", 1)[-1] for line in maps.splitlines() if ".so" in line})


def built_in_names() -> list[str]:
    """The shipped models other than the demo model itself ("demo-image": whole-image
    context; "demo-region-only": no context), those whose weights this installation has."""
    from napari_xt.model.demo_weights import BUILT_IN

    return [name for name, path in BUILT_IN.items() if name != "demo" and path.is_file()]


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


def run_tag(choice: str, level: int = 0) -> str:
    """A short name of a run for layer names and default outputs: "demo", the zoo name or
    the checkpoint's file stem, with "L<level>" for a pyramid level above 0."""
    if choice == DEMO_MODEL:
        tag = "demo"
    elif choice == LOAD_CHECKPOINT:
        tag = "checkpoint"
    elif is_checkpoint(choice):
        tag = Path(choice).name.split(".")[0] or "checkpoint"
    else:
        tag = choice
    return f"{tag} L{level}" if level > 0 else tag


@functools.lru_cache(maxsize=32)
def _trained_here(path: str, mtime: float) -> bool:
    from napari_xt.model.checkpoint import CheckpointError, read_metadata

    try:
        return "train.config" in read_metadata(path)
    except (CheckpointError, OSError):
        return False


def trained_on_full_resolution(choice: str) -> bool:
    """True for models napari-xt trained (the built-in demo model, checkpoints that carry
    a training config): they learned from the full-resolution pixels of their images."""
    from napari_xt.model.demo_weights import BUILT_IN, DEMO_WEIGHTS

    if choice == DEMO_MODEL:
        path = DEMO_WEIGHTS
    elif choice in BUILT_IN:
        path = BUILT_IN[choice]
    elif is_checkpoint(choice) or Path(choice).is_file():
        path = Path(choice)
    else:
        return False  # zoo models: random weights, no training resolution
    try:
        return _trained_here(str(path), path.stat().st_mtime)
    except OSError:
        return False


def training_note(choice: str, level: int, factor: tuple[float, float]) -> str | None:
    """What to say when `level` (downsampled by `factor` from level 0) is coarser than the
    pixels the model was trained on; None when it is not (or nothing is known)."""
    f = max(float(v) for v in factor)
    if level <= 0 or f <= 1.0 or not trained_on_full_resolution(choice):
        return None
    from napari_xt.model.demo_weights import BUILT_IN

    name = ("the built-in demo model" if choice == DEMO_MODEL else
            f"the built-in model {choice}" if choice in BUILT_IN else Path(choice).name)
    return (f"level {level} is {f:g}x coarser than full resolution, and {name} was trained "
            "on full-resolution pixels: objects look smaller than it learned, expect poorer "
            "results (level 0 matches its training)")
