"""``napari-xt demo``: a generated SAR-like scene, the built-in model, a run you can watch.

With a screen: napari opens on the scene with the "Run xT" widget docked and already
running (viewport-first, so the regions in view come first). With no screen (`$DISPLAY`
unset on Linux) or `--headless`: the same engine runs without a window, then a screenshot
PNG of the scene with its result overlays is rendered (a hidden napari viewer on a virtual
X display when `Xvfb` is available, else composed with numpy) next to the output store;
both paths are printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_OUT = "napari-xt-demo"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="open napari on a generated scene with the built-in model running",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", type=int, default=512,
                   help="scene height and width in pixels (default 512: one 512 px context "
                        "crop of the built-in model; larger scenes stream overlapping crops)")
    p.add_argument("--seed", type=int, default=0, help="which generated scene (default 0)")
    p.add_argument("--headless", action="store_true",
                   help="no window: run, then save a screenshot PNG and the store")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"folder for the store and the screenshot (default ./{DEFAULT_OUT})")
    p.add_argument("--model", default=None,
                   help="zoo model name or checkpoint file (default: the built-in demo model)")
    p.add_argument("--render", choices=("auto", "napari", "numpy"), default="auto",
                   help="headless screenshot: napari on a (virtual) display, or numpy "
                        "composition (auto: napari when a display or Xvfb is available)")
    p.set_defaults(func=main)


def scene(size: int, seed: int) -> tuple[np.ndarray, str]:
    """(image (C, H, W) float32 dB, description): the training task's synthetic scene."""
    from napari_xt.train.synthetic import SceneConfig, make_scene

    image, _, _ = make_scene(seed, SceneConfig(height=size, width=size))
    return np.asarray(image, np.float32), f"synthetic SAR-like scene {size} x {size}, seed {seed}"


def _model_choice(name: str | None) -> str:
    from napari_xt.model.choice import DEMO_MODEL

    return name or DEMO_MODEL


def _has_screen() -> bool:
    if not sys.platform.startswith("linux"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def main(args: argparse.Namespace) -> int:
    if args.size < 64:
        print("napari-xt demo: --size must be at least 64", file=sys.stderr)
        return 2
    if args.model and not _known_model(args.model):
        print(f"napari-xt demo: unknown model {args.model!r} (a zoo name or a checkpoint "
              "file)", file=sys.stderr)
        return 2
    if args.headless or not _has_screen():
        return run_headless(args)
    return run_gui(args)


def _known_model(name: str) -> bool:
    from napari_xt.model.zoo import list_models

    return name in list_models() or Path(name).is_file()


# ---------------------------------------------------------------------------- headless
def run_headless(args: argparse.Namespace) -> int:
    from napari_xt.engine import run
    from napari_xt.engine.events import Cancelled, Failed, Finished, Planned, Written
    from napari_xt.model.choice import load_model
    from napari_xt.widgets.run_job import run_outputs

    out = Path(args.out).resolve()
    image, what = scene(args.size, args.seed)
    # a model that cannot load is bad input (cli: one line, exit 2): nothing is written then
    model, model_what, normalize = load_model(_model_choice(args.model), in_chans=image.shape[0])
    out.mkdir(parents=True, exist_ok=True)
    store = out / "demo.xt.zarr"
    print(f"scene: {what}\nmodel: {model_what}\nstore: {store}", flush=True)
    t0, last = time.perf_counter(), 0.0
    outcome = None
    for event in run(image, model, str(store), axes="CYX", device="auto", order="zigzag",
                     overwrite=True, cache="rebuild", normalize=normalize,
                     outputs=run_outputs(model, probabilities=False)):
        if isinstance(event, Planned):
            print(f"{event.grid[0]} x {event.grid[1]} regions of {event.region_size} px, "
                  f"{event.crops} crops", flush=True)
        elif isinstance(event, Written) and time.perf_counter() - last > 2.0:
            last = time.perf_counter()
            print(f"  {event.done} / {event.total} regions", flush=True)
        elif isinstance(event, (Finished, Failed, Cancelled)):
            outcome = event
    if not isinstance(outcome, Finished):
        message = getattr(outcome, "message", "run did not finish")
        print(f"napari-xt demo: {message}", file=sys.stderr)
        return 1
    print(f"run finished in {time.perf_counter() - t0:.1f} s", flush=True)
    png = out / "demo.png"
    how = render_png(png, image, store, args.render)
    print(f"screenshot: {png} ({how})\nstore: {store}")
    return 0


def render_png(png: Path, image: np.ndarray, store: Path, render: str = "auto") -> str:
    """Write the screenshot; returns how it was rendered. napari renders in a child process
    on a private virtual display (started and stopped around it), so no window appears and
    this process never holds an X connection that goes away."""
    if render in ("auto", "napari"):
        from napari_xt.widgets.snapshot import virtual_display

        with virtual_display(private=True) as display:
            if display is not None:
                error = napari_png_subprocess(png, image, store)
                if error is None:
                    return f"napari on display {display}"
                if render == "napari":
                    raise RuntimeError(f"napari rendering failed: {error}")
                print(f"napari rendering failed ({error}); composing with numpy",
                      file=sys.stderr)
            elif render == "napari":
                raise RuntimeError("no display and no Xvfb to render with napari")
    numpy_png(png, image, store)
    return "numpy"


def napari_png_subprocess(png: Path, image: np.ndarray, store: Path) -> str | None:
    """Run `napari_png` in a child Python; None on success, else what went wrong."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="napari-xt-demo-") as tmp:
        npy = Path(tmp) / "scene.npy"
        np.save(npy, image)
        code = ("import sys; from pathlib import Path; import numpy as np; "
                "from napari_xt.commands.demo import napari_png; "
                "napari_png(Path(sys.argv[1]), np.load(sys.argv[2]), Path(sys.argv[3]))")
        try:
            proc = subprocess.run([sys.executable, "-c", code, str(png), str(npy), str(store)],
                                  capture_output=True, text=True, timeout=300,
                                  env=os.environ.copy())
        except subprocess.TimeoutExpired:
            return "timed out"
    if proc.returncode != 0 or not png.is_file():
        lines = (proc.stderr or "").strip().splitlines()
        return lines[-1] if lines else f"exit code {proc.returncode}"
    return None


def numpy_png(png: Path, image: np.ndarray, store: Path) -> None:
    from napari_xt.io import list_results, read_detections, read_labels
    from napari_xt.widgets.snapshot import compose_overlay, write_png

    results = list_results(store)
    labels = (np.asarray(read_labels(store, results["labels"][0]).levels[0])
              if results["labels"] else None)
    points = read_detections(store, results["tables"][0]) if results["tables"] else None
    write_png(png, compose_overlay(image[0], labels, points))


def napari_png(png: Path, image: np.ndarray, store: Path) -> None:
    import napari

    from napari_xt.widgets.result_layers import LiveResults
    from napari_xt.widgets.snapshot import write_png

    viewer = napari.Viewer(show=True)  # only a shown canvas renders (on the virtual display)
    try:
        add_scene(viewer, image)
        h, w = image.shape[-2:]
        LiveResults(viewer, "scene", h, w, 1, (1.0, 1.0), (0.0, 0.0)).finish(str(store))
        viewer.reset_view()
        write_png(png, viewer.screenshot(canvas_only=True, flash=False))
    finally:
        viewer.close()


def add_scene(viewer, image: np.ndarray) -> list:
    """Add the (C, H, W) scene as one grey layer per channel (VV, VH), same source."""
    names = ["scene VV", "scene VH"][: image.shape[0]]
    lo_hi = [(-25.0, 5.0), (-32.0, -5.0)]
    return viewer.add_image(
        image, channel_axis=0, name=names, colormap=["gray", "gray"][: len(names)],
        contrast_limits=lo_hi[: len(names)], blending=["translucent", "additive"][: len(names)],
        visible=[True, False][: len(names)], metadata={"source": "napari-xt demo scene"},
    )


# ---------------------------------------------------------------------------- window
def run_gui(args: argparse.Namespace) -> int:
    import napari

    viewer, widget = open_demo(args)
    print(f"store: {widget.store_edit.text()}", flush=True)
    napari.run()
    return 0


def open_demo(args: argparse.Namespace):
    """A napari window on the scene with "Run xT" docked and its run started."""
    import napari

    from napari_xt.widgets.run_widget import RunWidget

    image, what = scene(args.size, args.seed)
    viewer = napari.Viewer(title=f"napari-xt demo: {what}")
    add_scene(viewer, image)
    widget = RunWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Run xT", area="right")
    widget.select_image("scene VV + scene VH (2 channels)")
    if args.model:
        if Path(args.model).is_file():
            widget.set_checkpoint(args.model)
        else:
            widget.model_combo.setCurrentText(args.model)
    else:
        widget.model_combo.setCurrentText(_model_choice(None))
    widget.order_combo.setCurrentText("viewport-first")
    widget.store_edit.setText(str(Path(args.out).resolve() / "demo.xt.zarr"))
    widget.resume_check.setChecked(False)
    widget.start()
    print(f"scene: {what}", flush=True)
    return viewer, widget
