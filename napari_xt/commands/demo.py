"""``napari-xt demo``: a generated SAR-like scene, the built-in model, a run you can watch.

The scene is the built-in task's (`napari_xt.train.synthetic`): water is sea when its body
reaches the scene border, lake when land encloses it; on a scene several crops wide, a crop
inland cannot see the border that decides. By default the demo runs the built-in model
with whole-image context (`demo-image`, when installed) and then the crop-context demo
model on the same scene, so the two can be compared against the scene's truth.

With a screen: napari opens on the scene (its truth as a hidden layer) with the "Run xT"
widget docked and running (viewport-first, so the regions in view come first), then the
comparison run. With no screen (`$DISPLAY` unset on Linux) or `--headless`: the same
engine runs without a window, then a screenshot PNG of the scene with its result overlays
is rendered (a hidden napari viewer on a virtual X display when `Xvfb` is available, else
composed with numpy) next to the output store, plus `compare.png` (crop context | whole-
image context | truth) and each run's sea/lake IoU against the truth; the paths are
printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_OUT = "napari-xt-demo"
IMAGE_MODEL, CROP_MODEL = "demo-image", "demo"  # built-in models (napari_xt.model.demo_weights)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="open napari on a generated scene with the built-in model running",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", type=int, default=None,
                   help="scene height and width in pixels (default 2048, four crops of the "
                        "built-in model a side, where whole-image context matters; 512 "
                        "without the whole-image model)")
    p.add_argument("--seed", type=int, default=0, help="which generated scene (default 0)")
    p.add_argument("--headless", action="store_true",
                   help="no window: run, then save a screenshot PNG and the store")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"folder for the store and the screenshot (default ./{DEFAULT_OUT})")
    p.add_argument("--model", default=None,
                   help="built-in model (demo, demo-image, demo-beacon, demo-region-only), "
                        "zoo model name or checkpoint file (default: demo-image, then demo "
                        "for comparison)")
    p.add_argument("--render", choices=("auto", "napari", "numpy"), default="auto",
                   help="headless screenshot: napari on a (virtual) display, or numpy "
                        "composition (auto: napari when a display or Xvfb is available)")
    p.set_defaults(func=main)


def scene(size: int, seed: int) -> tuple[np.ndarray, str]:
    """(image (C, H, W) float32 dB, description): the training task's synthetic scene."""
    image, _, what = scene_with_truth(size, seed)
    return image, what


def scene_with_truth(size: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(image (C, H, W) float32 dB, truth (H, W) labels land 0 / sea 1 / lake 2, what)."""
    from napari_xt.train.synthetic import SceneConfig, make_scene

    image, truth, _ = make_scene(seed, SceneConfig(height=size, width=size))
    return (np.asarray(image, np.float32), np.asarray(truth),
            f"synthetic SAR-like scene {size} x {size}, seed {seed}")


def _image_model_installed() -> bool:
    from napari_xt.model.demo_weights import BUILT_IN

    return BUILT_IN[IMAGE_MODEL].is_file()


def plan_models(args: argparse.Namespace) -> tuple[str, str | None]:
    """(the model to run, the model to compare it with or None): a named --model runs
    alone; by default the whole-image model, then the crop model (the crop model alone
    when the whole-image model is not installed)."""
    from napari_xt.model.choice import DEMO_MODEL

    if args.model:
        return args.model, None
    if _image_model_installed():
        return IMAGE_MODEL, CROP_MODEL
    return DEMO_MODEL, None


def _size(args: argparse.Namespace) -> int:
    if args.size is not None:
        return args.size
    return 2048 if plan_models(args)[1] else 512


def _has_screen() -> bool:
    if not sys.platform.startswith("linux"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def main(args: argparse.Namespace) -> int:
    args.size = _size(args)
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
    from napari_xt.model.choice import DEMO_ALIASES
    from napari_xt.model.demo_weights import BUILT_IN
    from napari_xt.model.zoo import list_models

    return (name in list_models() or name in BUILT_IN or name in DEMO_ALIASES
            or Path(name).is_file())


# ---------------------------------------------------------------------------- headless
def run_headless(args: argparse.Namespace) -> int:
    from napari_xt.engine import run
    from napari_xt.engine.events import Cancelled, Failed, Finished, Planned, Written
    from napari_xt.model.choice import load_model
    from napari_xt.widgets.run_job import run_outputs

    out = Path(args.out).resolve()
    image, truth, what = scene_with_truth(args.size, args.seed)
    main_choice, other_choice = plan_models(args)
    # a model that cannot load is bad input (cli: one line, exit 2): nothing is written then
    models = [(load_model(main_choice, in_chans=image.shape[0]), out / "demo.xt.zarr")]
    if other_choice:
        models.append((load_model(other_choice, in_chans=image.shape[0]),
                       out / "demo-crop.xt.zarr"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"scene: {what}", flush=True)
    scores = []
    for (model, model_what, normalize), store in models:
        context = model.cfg.context_mode
        print(f"model: {model_what} ({context} context)\nstore: {store}", flush=True)
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
        labels = _labels(store)
        score = sea_lake_iou(labels, truth) if labels is not None else None
        scores.append((model_what, context, store, labels, score))
        said = "" if score is None else f"; sea/lake IoU against the truth {100 * score:.1f} %"
        print(f"run finished in {time.perf_counter() - t0:.1f} s{said}", flush=True)
    png = out / "demo.png"
    store = models[0][1]
    how = render_png(png, image, store, args.render)
    print(f"screenshot: {png} ({how})\nstore: {store}")
    if len(scores) == 2 and all(s[3] is not None for s in scores):
        compare = out / "compare.png"
        compare_png(compare, image, [(scores[1][3], "crop context"),
                                     (scores[0][3], "whole-image context"), (truth, "truth")])
        (_, _, _, _, image_score), (_, _, _, _, crop_score) = scores
        print(f"whole-image context: sea/lake IoU {100 * image_score:.1f} %, crop context "
              f"{100 * crop_score:.1f} % on this scene; compared in {compare} (crop | whole "
              "image | truth)")
    return 0


def _labels(store: Path) -> np.ndarray | None:
    from napari_xt.io import list_results, read_labels

    results = list_results(store)
    if not results["labels"]:
        return None
    return np.asarray(read_labels(store, results["labels"][0]).levels[0])


def sea_lake_iou(labels: np.ndarray, truth: np.ndarray) -> float:
    """Mean IoU of the sea (1) and lake (2) classes; a class absent from both counts 1."""
    ious = []
    for k in (1, 2):
        a, b = labels == k, truth == k
        union = int((a | b).sum())
        ious.append(1.0 if union == 0 else int((a & b).sum()) / union)
    return float(np.mean(ious))


def compare_png(png: Path, image: np.ndarray, panels: list[tuple[np.ndarray, str]]) -> None:
    """Side by side: the scene with each labels map tinted (numpy composition), 8 px apart."""
    from napari_xt.widgets.snapshot import compose_overlay, write_png

    pictures = [compose_overlay(image[0], labels, max_side=768) for labels, _ in panels]
    h = max(p.shape[0] for p in pictures)
    gap = np.full((h, 8, 3), 255, np.uint8)
    row = []
    for i, pic in enumerate(pictures):
        if i:
            row.append(gap)
        row.append(np.pad(pic, ((0, h - pic.shape[0]), (0, 0), (0, 0)), constant_values=255))
    write_png(png, np.concatenate(row, axis=1))


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
    """A napari window on the scene (its truth hidden beside it) with "Run xT" docked and
    its run started; by default the crop-context model runs next on the same scene. Each
    model and size has its own store under --out, resumed when it is there (a second demo
    shows the kept results at once)."""
    import napari

    from napari_xt.widgets.models import run_tag
    from napari_xt.widgets.run_widget import RunWidget

    if getattr(args, "size", None) is None:
        args.size = _size(args)
    image, truth, what = scene_with_truth(args.size, args.seed)
    viewer = napari.Viewer(title=f"napari-xt demo: {what}")
    add_scene(viewer, image)
    add_truth(viewer, truth)
    widget = RunWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Run xT", area="right")
    widget.select_image("scene VV + scene VH (2 channels)")
    first, then = plan_models(args)
    out = Path(args.out).resolve()

    def start(choice: str) -> None:
        if Path(choice).is_file():
            widget.set_checkpoint(choice)
        else:
            widget._select(widget.model_combo, _widget_name(choice))
        widget._select(widget.context_combo, "as the model was trained")
        widget.order_combo.setCurrentText("viewport-first")
        tag = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run_tag(
            widget.model_combo.currentText()))
        widget.store_edit.setText(str(out / f"demo-{args.size}px.{tag}.xt.zarr"))
        widget.resume_check.setChecked(True)
        widget.start()

    if then:  # the comparison once the first run has finished (not after a failure or a
        # cancel: the user is looking at why)
        widget.when_done(lambda session: start(then) if session.outcome == "finished"
                         else None)
    start(first)
    print(f"scene: {what}", flush=True)
    return viewer, widget


def _widget_name(choice: str) -> str:
    """The Run xT model list's name of a built-in model ("demo" is listed by its title)."""
    from napari_xt.model.choice import DEMO_ALIASES, DEMO_MODEL

    return DEMO_MODEL if choice in DEMO_ALIASES else choice


def add_truth(viewer, truth: np.ndarray):
    """The scene's truth as a hidden labels layer (land / sea / lake, the demo colours)."""
    from napari.utils.colormaps import DirectLabelColormap

    from napari_xt.model.demo_weights import CLASS_NAMES
    from napari_xt.train.scene_image import CLASS_COLORS

    colors = {None: (0, 0, 0, 0), **{k: tuple(c / 255.0 for c in v)
                                     for k, v in CLASS_COLORS.items()}}
    return viewer.add_labels(
        truth, name="scene truth", visible=False, opacity=0.5,
        colormap=DirectLabelColormap(color_dict=colors),
        features={"index": list(range(len(CLASS_NAMES))), "class": list(CLASS_NAMES)})
