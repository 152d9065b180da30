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


def main():
    from napari_xt.widgets.inspect_widget import InspectWidget

    tmp = tempfile.mkdtemp()
    args = argparse.Namespace(size=512, seed=0, model=None, out=tmp)
    viewer, widget = open_demo(args)
    viewer.window._qt_window.resize(1500, 950)
    wait(lambda: widget.run_button.isEnabled())
    for _ in range(50):
        QApplication.processEvents()
        time.sleep(0.02)
    from imageio.v3 import imwrite  # napari depends on imageio
    imwrite(OUT / "run_widget_finished.png", viewer.screenshot(canvas_only=False))
    imwrite(OUT / "run_widget_panel.png", np.asarray(viewer.screenshot(canvas_only=False))[
        :, -520:])
    inspect = InspectWidget(viewer)
    viewer.window.add_dock_widget(inspect, name="Inspect context", area="right")
    inspect.sync()
    inspect.context_map()
    wait(lambda: inspect.change is not None and not np.isnan(inspect.change).any(), 120)
    inspect.row_spin.setValue(7)
    inspect.col_spin.setValue(3)
    inspect.compare()
    wait(lambda: inspect.last_comparison is not None, 60)
    for _ in range(50):
        QApplication.processEvents()
        time.sleep(0.02)
    imwrite(OUT / "inspect_widget.png", viewer.screenshot(canvas_only=False))
    viewer.close()


if __name__ == "__main__":
    main()
