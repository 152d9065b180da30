"""Pictures of a run without a screen: a virtual X display for napari, or pure numpy.

- `virtual_display()`: a context manager that makes sure `$DISPLAY` points at an X server,
  starting `Xvfb` (the `xvfb` package's binary) on a free display number when none is set.
- `napari_screenshot(...)`: the scene and its result layers rendered by a hidden napari
  viewer (needs a display).
- `compose_overlay(...)` + `write_png(...)`: the same picture composed with numpy (grey image,
  translucent class colours, detection markers) and written by a small zlib PNG writer, for
  machines with neither a screen nor Xvfb.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from napari_xt.io.png import write_png  # noqa: F401 - re-exported (demo, benchmarks)

from .result_layers import class_color


@contextlib.contextmanager
def virtual_display(timeout: float = 10.0, private: bool = False) -> Iterator[str | None]:
    """Yield a usable $DISPLAY: the current one, or a fresh Xvfb (also when `private`, so
    windows shown for rendering stay off the user's screen); None when impossible."""
    xvfb = shutil.which("Xvfb")
    current = os.environ.get("DISPLAY")
    if current and (not private or xvfb is None):
        yield current
        return
    if xvfb is None:
        yield None
        return
    number = next(n for n in range(90, 190) if not Path(f"/tmp/.X{n}-lock").exists())
    proc = subprocess.Popen(
        [xvfb, f":{number}", "-screen", "0", "1600x1200x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    socket = Path(f"/tmp/.X11-unix/X{number}")
    deadline = time.monotonic() + timeout
    while not socket.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not socket.exists():
        proc.terminate()
        proc.wait(timeout=5)
        yield None
        return
    os.environ["DISPLAY"] = f":{number}"
    try:
        yield os.environ["DISPLAY"]
    finally:
        if current:
            os.environ["DISPLAY"] = current
        else:
            os.environ.pop("DISPLAY", None)
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


def grey(image: np.ndarray) -> np.ndarray:
    """(H, W) float image -> uint8 with a 2-98 percentile stretch (non-finite -> 0)."""
    img = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(img)
    if not finite.any():
        return np.zeros(img.shape, np.uint8)
    lo, hi = np.percentile(img[finite], [2, 98])
    out = np.clip((np.where(finite, img, lo) - lo) / max(hi - lo, 1e-12), 0, 1)
    return np.rint(out * 255).astype(np.uint8)


def compose_overlay(
    image: np.ndarray,
    labels: np.ndarray | None = None,
    points: Mapping[str, np.ndarray] | None = None,
    alpha: float = 0.45,
    max_side: int = 1024,
) -> np.ndarray:
    """(H, W, 3) uint8 picture: `image` (H, W) in grey, non-zero `labels` (H, W) tinted with
    their class colour, `points` (columns y, x, class) as filled squares."""
    stride = max(1, int(np.ceil(max(image.shape) / max_side)))
    base = grey(np.asarray(image)[::stride, ::stride]).astype(np.float32)
    rgb = np.repeat(base[..., None], 3, axis=2)
    if labels is not None:
        lab = np.asarray(labels)[::stride, ::stride]
        for k in np.unique(lab):
            if k == 0:
                continue
            colour = np.asarray(class_color(int(k))[:3], np.float32) * 255
            sel = lab == k
            rgb[sel] = (1 - alpha) * rgb[sel] + alpha * colour
    if points is not None and len(points["y"]):
        h, w = rgb.shape[:2]
        r = max(2, max(h, w) // 256)
        for y, x, k in zip(points["y"], points["x"], points["class"]):
            cy, cx = int(y) // stride, int(x) // stride
            colour = np.asarray(class_color(int(k))[:3], np.float32) * 255
            rgb[max(0, cy - r - 1):cy + r + 2, max(0, cx - r - 1):cx + r + 2] = 255.0
            rgb[max(0, cy - r):cy + r + 1, max(0, cx - r):cx + r + 1] = colour
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG back as an array (imageio or Pillow, whichever is installed)."""
    try:
        import imageio.v3 as iio

        return np.asarray(iio.imread(path))
    except ImportError:
        from PIL import Image

        return np.asarray(Image.open(path))
