"""Re-take the screenshots in docs/images with the built-in model (run under a display,
e.g. `xvfb-run -s "-screen 0 1600x1000x24" .venv/bin/python scripts/docs_screenshots.py`)."""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from qtpy.QtWidgets import QApplication

from napari_xt.commands.demo import open_demo

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"


def wait(pred, timeout=300):
    t0 = time.time()
    while not pred() and time.time() - t0 < timeout:
        QApplication.processEvents()
        time.sleep(0.02)


def settle(steps=50):
    for _ in range(steps):
        QApplication.processEvents()
        time.sleep(0.02)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=("running", "run", "correct", "contributions"),
                        default=None,
                        help="re-take only the streaming picture, the Run/Inspect pictures, "
                             "the Correct one or the contribution maps")
    only = parser.parse_args().only
    if only in (None, "running"):
        running()
        if only == "running":
            return
    tmp = tempfile.mkdtemp()
    args = argparse.Namespace(size=512, seed=0, model=None, out=tmp)
    viewer, widget = open_demo(args)
    viewer.window._qt_window.resize(1500, 950)
    wait(lambda: widget.run_button.isEnabled())
    settle()
    if only in (None, "run"):
        run_and_inspect(viewer)
    if only in (None, "contributions"):
        contributions(viewer)
    if only in (None, "correct"):
        correct(viewer)
    viewer.close()


def running():
    """A 1536 px scene while it streams (viewport-first), about a third decoded."""
    from imageio.v3 import imwrite

    args = argparse.Namespace(size=1536, seed=0, model=None, out=tempfile.mkdtemp())
    viewer, widget = open_demo(args)
    viewer.window._qt_window.resize(1500, 950)
    session = widget.session

    def third():
        total = session.planned.total_regions if session.planned is not None else 0
        return bool(total) and len(session.decoded) >= total // 3

    wait(lambda: third() or not widget.running, 300)
    imwrite(OUT / "run_widget_running.png", viewer.screenshot(canvas_only=False))
    widget.cancel()
    wait(lambda: not widget.running, 60)
    viewer.close()


def run_and_inspect(viewer):
    from imageio.v3 import imwrite  # napari depends on imageio

    from napari_xt.widgets.inspect_widget import InspectWidget

    imwrite(OUT / "run_widget_finished.png", viewer.screenshot(canvas_only=False))
    imwrite(OUT / "run_widget_panel.png", np.asarray(viewer.screenshot(canvas_only=False))[
        :, -520:])
    inspect = InspectWidget(viewer)
    viewer.window.add_dock_widget(inspect, name="Inspect context", area="right")
    inspect.sync()
    inspect.context_map()
    wait(lambda: inspect.change is not None and not np.isnan(inspect.change).any(), 120)
    row, col = np.unravel_index(np.nanargmax(inspect.change), inspect.change.shape)
    inspect.row_spin.setValue(int(row))  # the region context changed most
    inspect.col_spin.setValue(int(col))
    inspect.compare()
    wait(lambda: inspect.last_comparison is not None, 60)
    for _ in range(50):
        QApplication.processEvents()
        time.sleep(0.02)
    imwrite(OUT / "inspect_widget.png", viewer.screenshot(canvas_only=False))
    viewer.window.remove_dock_widget(inspect)
    for layer in [x for x in viewer.layers if x.name.startswith("xT ")]:
        viewer.layers.remove(layer)


def contributions(viewer):
    """Two contribution maps of the finished demo run (occlusion): a region inside a lake
    (the model can only call it lake by looking at its shores) and a detection (a beacon
    pixel, explained by the centre map)."""
    from imageio.v3 import imwrite
    from scipy import ndimage

    from napari_xt.io import read_detections, read_labels
    from napari_xt.widgets.inspect_widget import InspectWidget
    from napari_xt.widgets.run_session import last_session

    session = last_session(viewer)
    inspect = InspectWidget(viewer)
    viewer.window.add_dock_widget(inspect, name="Inspect context", area="right")
    inspect.sync()
    labels = np.asarray(read_labels(session.store, "prediction").levels[0])
    depth = ndimage.distance_transform_edt(labels == 2)[32::64, 32::64]  # lake, at centres
    row, col = np.unravel_index(np.argmax(depth), depth.shape)
    hidden = [layer for layer in viewer.layers if layer.name.startswith("xT ")
              and layer.name not in ("xT contributions", "xT context seen")]
    for layer in hidden:
        layer.visible = False
    shots = [("inspect_lake.png", (int(row), int(col)), "classes")]
    table = read_detections(session.store, "prediction")
    if len(table["y"]):
        best = int(np.argmax(table["score"]))
        shots.append(("inspect_detection.png",
                      (int(table["y"][best]) // 64, int(table["x"][best]) // 64), "detections"))
    for name, (r, c), answer in shots:
        inspect.row_spin.setValue(r)
        inspect.col_spin.setValue(c)
        inspect.answer_combo.setCurrentText(answer)
        inspect.method_combo.setCurrentText("occlusion")
        inspect.last_contributions = None
        inspect.contributions()
        wait(lambda: inspect.last_contributions is not None and inspect.worker is None, 120)
        settle()
        imwrite(OUT / name, viewer.screenshot(canvas_only=False))
    viewer.window.remove_dock_widget(inspect)
    for layer in [x for x in viewer.layers if x.name in ("xT contributions", "xT context seen")]:
        viewer.layers.remove(layer)
    for layer in hidden:
        layer.visible = True


def correct(viewer):
    """An annotator fixes the squares of "sea" the model left inside a lake: water that
    does not touch the scene border becomes lake in a 256 px window, then Save."""
    from imageio.v3 import imwrite
    from scipy import ndimage

    from napari_xt.io import read_labels
    from napari_xt.widgets.correct_widget import LAYER_EDIT, CorrectWidget
    from napari_xt.widgets.viewport import camera_of

    widget = CorrectWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Correct results", area="right")
    labels = np.asarray(read_labels(widget.store, widget.result).levels[0])
    water, _ = ndimage.label(labels > 0)
    border = set(np.unique(np.concatenate([water[0], water[-1], water[:, 0], water[:, -1]])))
    inland_sea = (labels == 1) & ~np.isin(water, list(border))
    if inland_sea.any():  # centre the window on the largest wrong patch
        cy, cx = np.argwhere(inland_sea).mean(0)
    else:
        cy, cx = np.array(labels.shape) / 2
    widget.size_spin.setValue(256)
    camera = camera_of(viewer)
    layer = viewer.layers[0]
    world = (cy * layer.scale[-2] + layer.translate[-2], cx * layer.scale[-1] + layer.translate[-1])
    camera.center = world
    camera.zoom = 2.4
    widget.edit_view(world)
    wait(lambda: widget.worker is None, 60)
    y0, y1, x0, x1 = widget.window
    edit = viewer.layers[LAYER_EDIT]
    edit.data[inland_sea[y0:y1, x0:x1]] = 2
    edit.refresh()
    widget.save()
    wait(lambda: widget.worker is None, 60)
    settle()
    imwrite(OUT / "correct_widget.png", viewer.screenshot(canvas_only=False))


if __name__ == "__main__":
    main()
