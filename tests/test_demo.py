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


@pytest.fixture
def image_model(tmp_path, monkeypatch):
    """A whole-image model installed as `demo-image`: the crop model given a fresh (silent)
    reader, so it must predict exactly what the crop model predicts."""
    from dataclasses import replace

    from napari_xt.model import demo_weights
    from napari_xt.model.checkpoint import read_metadata, save_checkpoint
    from napari_xt.model.global_context import GlobalContextConfig
    from napari_xt.train.loop import _fine_tuned

    crop = demo_weights.DEMO_WEIGHTS
    cfg = replace(demo_weights.load_demo_weights().cfg, global_context=GlobalContextConfig())
    train = {"train.config": read_metadata(crop)["train.config"]}  # its normalization
    image = save_checkpoint(_fine_tuned(cfg, crop), tmp_path / "image.safetensors", train)
    monkeypatch.setitem(demo_weights.BUILT_IN, "demo-image", image)
    return image


@pytest.mark.slow
def test_headless_demo_compares_whole_image_and_crop_context(tmp_path, capsys, image_model):
    """With a whole-image model installed, the demo runs it, then the crop model, and shows
    both against the truth."""
    from napari_xt.cli import main
    from napari_xt.widgets.snapshot import read_png

    out = tmp_path / "demo"
    assert main(["demo", "--headless", "--size", "256", "--out", str(out), "--render",
                 "numpy"]) == 0
    printed = capsys.readouterr().out
    assert "model: built-in model demo-image (image context)" in printed
    assert "model: built-in demo model (crop context)" in printed
    line = next(t for t in printed.splitlines() if t.startswith("whole-image context:"))
    image_iou, crop_iou = (float(part.split("%")[0].split()[-1])
                           for part in line.split(",")[:2])
    assert image_iou == crop_iou > 80.0, line
    picture = read_png(out / "compare.png")
    assert picture.shape[1] == 3 * 256 + 2 * 8 and picture.shape[0] == 256
    from napari_xt.io import read_labels

    a, b = (np.asarray(read_labels(out / name, "prediction").levels[0])
            for name in ("demo.xt.zarr", "demo-crop.xt.zarr"))
    assert np.array_equal(a, b)


def _scene():
    from napari_xt.commands.demo import scene

    return scene(256, 0)[0]


def test_demo_refuses_bad_arguments(capsys):
    from napari_xt.cli import main

    assert main(["demo", "--headless", "--size", "8"]) == 2
    assert main(["demo", "--headless", "--model", "no_such_model"]) == 2
    assert "unknown model" in capsys.readouterr().err


@pytest.mark.gui
@pytest.mark.parametrize("installed", [False, True], ids=["crop model", "whole-image model"])
def test_demo_window_opens_with_the_run_started(qtbot, tmp_path, request, installed):
    from napari_xt.commands.demo import open_demo, plan_models

    if installed:
        request.getfixturevalue("image_model")
    else:  # whatever this installation ships
        from napari_xt.model import demo_weights

        request.getfixturevalue("monkeypatch").setitem(
            demo_weights.BUILT_IN, "demo-image", tmp_path / "not-installed.safetensors")
    args = argparse.Namespace(size=256, seed=0, out=str(tmp_path / "gui"), model=None)
    first, then = plan_models(args)
    assert (then is not None) == installed
    viewer, widget = open_demo(args)
    try:
        assert widget.running and widget.image_combo.currentText().endswith("(2 channels)")
        assert widget.order_combo.currentText() == "viewport-first"
        assert "scene truth" in viewer.layers and not viewer.layers["scene truth"].visible
        qtbot.waitUntil(lambda: not widget.running, timeout=60000)
        assert widget.last_session.outcome == "finished"
        stores = sorted(p.name for p in (tmp_path / "gui").glob("demo-256px.*.xt.zarr"))
        if then is None:
            assert stores == ["demo-256px.demo.xt.zarr"]
            assert "scene VV xT demo labels" in viewer.layers
            return
        # the whole-image model first, then (started as the first one ends) the crop model
        # on the same scene: both kept

        def both_done():
            names = {p.name for p in (tmp_path / "gui").glob("demo-256px.*.xt.zarr")}
            return len(names) == 2 and not widget.running
        qtbot.waitUntil(both_done, timeout=60000)
        assert widget.last_session.outcome == "finished"
        assert widget.last_session.request.tag == "demo"
        stores = sorted(p.name for p in (tmp_path / "gui").glob("demo-256px.*.xt.zarr"))
        assert stores == ["demo-256px.demo-image.xt.zarr", "demo-256px.demo.xt.zarr"]
        assert {"scene VV xT demo-image labels", "scene VV xT demo labels"} <= \
            {layer.name for layer in viewer.layers}
    finally:
        viewer.close()
