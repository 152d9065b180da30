"""`napari-xt demo`: headless end to end (store + screenshot), and the window path."""

import argparse

import numpy as np
import pytest

from napari_xt.widgets.result_layers import class_color


@pytest.fixture(autouse=True)
def _settings_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_XT_CONFIG_DIR", str(tmp_path / "config"))


def tinted(png: np.ndarray, labels: np.ndarray) -> dict[int, int]:
    """Pixels of the picture whose colour leans to each present class colour."""
    rgb = png[..., :3].astype(int)
    spread = rgb.max(axis=2) - rgb.min(axis=2)  # grey pixels have none
    out = {}
    for k in np.unique(labels):
        if k == 0:
            continue
        c = np.asarray(class_color(int(k))[:3])
        lean = (rgb * (c - c.mean())).sum(axis=2)  # > 0: towards the class colour's hue
        out[int(k)] = int(((spread > 25) & (lean > 15)).sum())
    return out


@pytest.mark.slow
@pytest.mark.gui
def test_headless_demo_writes_store_and_screenshot(tmp_path, capsys):
    from napari_xt.cli import main
    from napari_xt.commands.demo import numpy_png
    from napari_xt.io import list_results, read_labels
    from napari_xt.widgets.snapshot import read_png

    out = tmp_path / "demo"
    assert main(["demo", "--headless", "--size", "256", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    store, png = out / "demo.xt.zarr", out / "demo.png"
    assert f"screenshot: {png}" in printed and f"store: {store}" in printed
    assert "napari on display" in printed  # rendered by napari on a (virtual) display
    results = list_results(store)
    labels = np.asarray(read_labels(store, results["labels"][0]).levels[0])
    assert labels.shape == (256, 256)
    picture = read_png(png)
    assert picture.ndim == 3 and min(picture.shape[:2]) >= 200
    assert picture[..., :3].std() > 20  # not blank
    for k, count in tinted(picture, labels).items():  # every predicted class is visible
        if (labels == k).mean() > 0.02:
            assert count > 50, f"class {k} not visible in the screenshot"

    numpy_png(tmp_path / "numpy.png", _scene(), store)
    composed = read_png(tmp_path / "numpy.png")
    assert composed.shape[:2] == (256, 256)
    for k, count in tinted(composed, labels).items():
        assert (count > 0) == bool((labels == k).any())


def _scene():
    from napari_xt.commands.demo import scene

    return scene(256, 0)[0]


def test_demo_refuses_bad_arguments(capsys):
    from napari_xt.cli import main

    assert main(["demo", "--headless", "--size", "8"]) == 2
    assert main(["demo", "--headless", "--model", "no_such_model"]) == 2
    assert "unknown model" in capsys.readouterr().err


@pytest.mark.gui
def test_demo_window_opens_with_the_run_started(qtbot, tmp_path):
    from napari_xt.commands.demo import open_demo

    args = argparse.Namespace(size=256, seed=0, out=str(tmp_path / "gui"), model=None)
    viewer, widget = open_demo(args)
    try:
        assert widget.running and widget.image_combo.currentText().endswith("(2 channels)")
        assert widget.order_combo.currentText() == "viewport-first"
        qtbot.waitUntil(lambda: not widget.running, timeout=60000)
        assert widget.last_session.outcome == "finished"
        assert "scene VV xT demo labels" in viewer.layers
        assert (tmp_path / "gui" / "demo.xt.zarr" / "labels").is_dir()
    finally:
        viewer.close()
