"""File > Open Sample > Synthetic SAR scene: the demo task's scene (what the built-in model
was trained on), lazy at any size, with its truth as layers; with the built-in model it
shows what the model does, and the widget says when a level is coarser than its training."""

import numpy as np
import pytest

from napari_xt.train.synthetic import SceneConfig, SyntheticScene


@pytest.fixture(autouse=True)
def _settings_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_XT_CONFIG_DIR", str(tmp_path / "config"))


def test_scene_image_is_lazy_and_exactly_the_demo_scene(monkeypatch):
    from napari_xt.train.scene_image import scene_image

    reads = []
    original = SyntheticScene.read
    monkeypatch.setattr(SyntheticScene, "read",
                        lambda self, *box: reads.append(box) or original(self, *box))
    s = scene_image(1536, seed=3, width=1024, chunk=256)
    assert not reads  # made: nothing rendered yet
    assert [lv.shape for lv in s.image.levels] == [(2, 1536, 1024), (2, 768, 512),
                                                   (2, 384, 256)]
    assert s.image.channel_names == ("VV", "VH") and s.class_names == ("land", "sea", "lake")
    window = s.image.levels[0][:, 256:512, 512:768].compute()
    assert reads == [(256, 512, 512, 768)]  # one chunk rendered for one chunk read
    scene = SyntheticScene(3, SceneConfig(height=1536, width=1024))
    image, mask = scene.read(200, 500, 700, 900)
    np.testing.assert_array_equal(s.image.levels[0][:, 200:700, 500:900].compute(), image)
    np.testing.assert_array_equal(window, scene.read(256, 512, 512, 768)[0])
    np.testing.assert_array_equal(s.labels[0][200:700, 500:900].compute(), mask)
    # level 1: 2 x 2 means in linear intensity; truth: the class at each block's sample
    lin = 10.0 ** (image[:, :500, :400].astype(np.float64) / 10.0)
    mean = 10 * np.log10(lin.reshape(2, 250, 2, 200, 2).mean(axis=(2, 4)))
    np.testing.assert_allclose(s.image.levels[1][:, 100:350, 250:450].compute(), mean,
                               atol=1e-4)
    np.testing.assert_array_equal(s.labels[1][100:350, 250:450].compute(), mask[1::2, 1::2])
    targets = scene.targets()
    vessels = targets["cls"] == 1
    assert len(s.vessels["y"]) == vessels.sum() > 0
    np.testing.assert_allclose(s.vessels["y"], targets["y"][vessels] - 0.5)


def test_sample_layers_hold_the_scene_and_its_truth():
    from napari_xt._napari_io import SAMPLE_SAR_SIZE, sample_sar

    layers = sample_sar()
    (image, kwargs, kind), (truth, tk, tkind), (points, pk, pkind) = layers
    assert kind == "image" and kwargs["name"] == ["synthetic SAR VV", "synthetic SAR VH"]
    assert image[0].shape == (2, SAMPLE_SAR_SIZE, SAMPLE_SAR_SIZE) and kwargs["multiscale"]
    assert all(m["source"] == kwargs["metadata"][0]["source"] for m in kwargs["metadata"])
    assert tkind == "labels" and tk["features"]["class"] == ["land", "sea", "lake"]
    assert [lv.shape for lv in truth] == [lv.shape[1:] for lv in image]
    assert not tk["visible"] and not pk["visible"]
    assert pkind == "points" and len(points) > 0 and set(pk["features"]["class_name"]) == {
        "vessel"}


@pytest.mark.gui
@pytest.mark.slow
def test_sample_with_the_built_in_model_shows_what_it_does(make_napari_viewer, qtbot,
                                                           tmp_path, monkeypatch):
    from napari_xt import _napari_io
    from napari_xt.widgets.models import DEMO_MODEL
    from napari_xt.widgets.run_widget import RunWidget

    monkeypatch.setattr(_napari_io, "SAMPLE_SAR_SIZE", 1024)  # 2048 by default
    viewer = make_napari_viewer()
    viewer.open_sample("napari-xt", "sar")  # File > Open Sample
    assert viewer.layers["synthetic SAR VV"].data[0].shape == (1024, 1024)
    widget = RunWidget(viewer)
    # the two channels the built-in model needs come first
    assert widget.image_combo.currentText() == "synthetic SAR VV + synthetic SAR VH (2 channels)"
    widget.model_combo.setCurrentText(DEMO_MODEL)
    widget.level_combo.setCurrentIndex(1)
    assert widget.level_note.isVisibleTo(widget)
    assert "2x coarser" in widget.level_note.text() and "trained" in widget.level_note.text()
    widget.model_combo.setCurrentText("xt_tiny_demo_seg")  # random weights: nothing to say
    assert not widget.level_note.isVisibleTo(widget)
    widget.model_combo.setCurrentText(DEMO_MODEL)
    widget.level_combo.setCurrentIndex(0)
    assert not widget.level_note.isVisibleTo(widget)
    widget.device_combo.setCurrentText("cpu")
    widget.store_edit.setText(str(tmp_path / "sample.xt.zarr"))
    widget.start()
    qtbot.waitUntil(lambda: not widget.running, timeout=60000)
    assert widget.last_session.outcome == "finished", widget.status.text()
    labels = np.asarray(viewer.layers["synthetic SAR VV xT demo labels"].data)
    truth = np.asarray(viewer.layers["synthetic SAR truth"].data[0])
    iou = [((labels == k) & (truth == k)).sum() / ((labels == k) | (truth == k)).sum()
           for k in range(3)]
    assert min(iou) > 0.75, iou  # measured: land 0.98, sea 0.80, lake 0.96
    found = viewer.layers["synthetic SAR VV xT demo detections"]
    vessels = viewer.layers["synthetic SAR truth vessels"].data
    dist = np.hypot(*(found.data[:, None, :] - vessels[None]).transpose(2, 0, 1)).min(0)
    assert (dist < 4).mean() > 0.8  # most vessels found
