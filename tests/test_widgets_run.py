"""The "Run xT" widget in a real viewer: a full run, results as layers, cancel and resume,
errors, viewport-first re-prioritisation, multiscale levels, what the canvas shows."""

import json

import numpy as np
import pytest

from napari_xt.engine.store import DONE, open_result

pytestmark = pytest.mark.gui

SCALE, TRANSLATE = (2.0, 2.0), (10.0, -6.0)


@pytest.fixture(autouse=True)
def _settings_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_XT_CONFIG_DIR", str(tmp_path / "config"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny 2-channel, 3-class segmentation model with centre/size maps, saved to disk.
    The centre bias is raised so detections exist even without training."""
    import torch

    from napari_xt.model import create_model, save_checkpoint
    from napari_xt.widgets.models import keep_triton_out

    keep_triton_out()  # a viewer may already have loaded software OpenGL's LLVM
    torch.manual_seed(0)
    model = create_model("xt_tiny_demo_seg", in_chans=2, num_classes=3,
                         head={"outputs": (("centre", 1), ("size", 1))})
    with torch.no_grad():
        model.head.outputs["centre"].bias.fill_(2.0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(model, path)
    return str(path)


def scene(size):
    from napari_xt.train.synthetic import SceneConfig, make_scene

    image, _, _ = make_scene(1, SceneConfig(height=size, width=size))
    return image


def docked(make_napari_viewer, image, show=False, **kwargs):
    from napari._qt.qt_main_window import _instantiate_dock_widget

    from napari_xt.widgets.run_widget import RunWidget

    viewer = make_napari_viewer(show=show)  # only shown viewers render their canvas
    viewer.add_image(image, channel_axis=0, name=["VV", "VH"], scale=SCALE,
                     translate=TRANSLATE, metadata={"source": "test scene"}, **kwargs)
    widget = _instantiate_dock_widget(RunWidget, viewer)  # as napari builds plugin widgets
    viewer.window.add_dock_widget(widget, name="Run xT")
    widget.select_image("VV + VH (2 channels)")
    widget.device_combo.setCurrentText("cpu")
    return viewer, widget


def wait_done(qtbot, widget, timeout=60000):
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)
    return widget.last_session


def test_run_shows_results_as_layers(make_napari_viewer, qtbot, tmp_path, checkpoint):
    from napari_xt.io import read_detections, read_labels
    from napari_xt.widgets.region_grid import DECODED, LAYER_NAME

    viewer, widget = docked(make_napari_viewer, scene(384), show=True)
    from qtpy.QtWidgets import QAbstractSpinBox, QComboBox, QWidget

    for w in widget.findChildren(QWidget):  # every control explains itself
        if isinstance(w.parent(), (QAbstractSpinBox, QComboBox)):
            continue  # the line edit inside a spin box
        if type(w).__name__ in (
                "QComboBox", "QSpinBox", "QDoubleSpinBox", "QCheckBox", "QPushButton",
                "QLineEdit", "QToolButton"):
            assert w.toolTip(), f"{type(w).__name__} without a tooltip"
    assert widget.store_edit.text().endswith("VV.demo.xt.zarr")  # no file: temporary folder
    widget.set_checkpoint(checkpoint)
    assert widget.store_edit.text().endswith("VV.tiny.xt.zarr")  # one store per model
    widget.order_combo.setCurrentText("raster")
    widget.batch_spin.setValue(3)
    widget.blend_combo.setCurrentText("decoded outputs")
    store = tmp_path / "out.zarr"
    widget.store_edit.setText(str(store))
    import gc

    session = widget.start()
    assert session is not None and not widget.run_button.isEnabled()
    assert widget.cancel_button.isEnabled()
    assert gc.get_freeze_count() > 0  # no full collections of napari/torch mid-stream
    session = wait_done(qtbot, widget)
    assert session.outcome == "finished", widget.status.text()
    assert gc.get_freeze_count() == 0  # unfrozen when the run ends
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()

    import zarr

    settings = zarr.open_group(str(store), mode="r").attrs["napari-xt"]["settings"]
    assert settings["blend"] == "outputs"  # the merge the widget named
    assert settings["context"] == "crop"  # "as the model was trained": a crop model
    labels = viewer.layers["VV xT tiny labels"]
    stored = np.asarray(read_labels(store, "prediction").levels[0])
    assert labels.data.shape == (384, 384)
    assert np.array_equal(np.asarray(labels.data), stored)
    assert len(np.unique(stored)) > 1
    points = viewer.layers["VV xT tiny detections"]
    table = read_detections(store, "prediction")
    assert len(table["y"]) > 0 and len(points.data) == len(table["y"])
    assert np.allclose(points.data, np.stack([table["y"], table["x"]], 1))
    for col in ("class", "score", "size"):
        assert np.allclose(points.features[col].to_numpy(), table[col], equal_nan=True)
    from napari_xt.widgets.result_layers import class_color

    assert np.allclose(points.face_color, [class_color(k) for k in table["class"]])
    probs = [viewer.layers[f"VV xT tiny p(class {k})"] for k in range(3)]
    from napari_xt.io import read_probabilities

    stored_p = np.asarray(read_probabilities(store, "prediction").levels[0])
    for k, layer in enumerate(probs):
        assert np.allclose(layer.data, stored_p[k].astype(np.float32))
    grid = viewer.layers[LAYER_NAME]
    assert grid.data.shape == (3, 3) and (grid.data == DECODED).all()
    assert not grid.visible  # everything decoded: the grid is out of the way
    for layer in (labels, points, *probs):
        assert tuple(layer.scale) == SCALE and tuple(layer.translate) == TRANSLATE
    saved = json.loads((tmp_path / "config" / "widgets.json").read_text())["run"]
    assert saved["model"] == checkpoint and saved["order"] == "raster" and saved["batch_size"] == 3

    # the canvas: labels visible vs hidden differ in the label colours, only where labelled
    for layer in viewer.layers:
        layer.visible = layer.name in ("VV",)
    viewer.reset_view()
    before = viewer.screenshot(flash=False).astype(int)
    labels.visible = True
    after = viewer.screenshot(flash=False).astype(int)
    diff = after[..., :3] - before[..., :3]
    changed = np.abs(diff).max(axis=2) > 12
    assert changed.mean() > 0.05
    blue = changed & (diff[..., 2] > diff[..., 0] + 20)  # class 1 (0.2, 0.65, 1.0)
    yellow = changed & (diff[..., 0] > diff[..., 2] + 20)  # class 2 (1.0, 0.85, 0.15)
    area = {k: float(np.mean(stored == k)) for k in (1, 2)}
    assert (blue.sum() > 0) == (area[1] > 0.01) and (yellow.sum() > 0) == (area[2] > 0.01)
    ratio = blue.sum() / max(1, blue.sum() + yellow.sum())
    assert abs(ratio - area[1] / (area[1] + area[2])) < 0.2


def test_cancel_leaves_clean_state_and_resumable_store(make_napari_viewer, qtbot, tmp_path,
                                                       checkpoint):

    from napari_xt.engine import ContextStep

    viewer, widget = docked(make_napari_viewer, scene(768))
    widget.set_checkpoint(checkpoint)
    widget.order_combo.setCurrentText("zigzag")
    widget.resume_check.setChecked(True)
    store = tmp_path / "cancel.zarr"
    widget.store_edit.setText(str(store))
    session = widget.start()
    # cancel once the first crop's context is done: the regions it completed are still
    # decoded and written (the run winds down), the rest is left for the rerun
    session.worker.yielded.connect(
        lambda item: widget.cancel() if isinstance(item, ContextStep) else None)
    session = wait_done(qtbot, widget)
    assert session.outcome == "cancelled"
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert widget.image_combo.isEnabled() and "cancelled" in widget.status.text()
    state = open_result(store).region_status()
    done = {tuple(int(v) for v in rc) for rc in np.argwhere(state == DONE)}
    assert 0 < len(done) < 36
    live = np.asarray(viewer.layers["VV xT tiny labels"].data)  # previews match the written part
    written = open_result(store)
    for r, c in done:
        assert np.array_equal(live[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128],
                              written.read_region("labels", (r, c)))

    second = widget.start()
    second = wait_done(qtbot, widget)
    assert second.outcome == "finished"
    assert second.planned.resumed and second.planned.todo_regions == 36 - len(done)
    assert not (second.decoded & done)  # finished regions are not computed again
    assert second.decoded | done == {(r, c) for r in range(6) for c in range(6)}
    assert viewer.layers["VV xT tiny labels"].data.shape == (768, 768)


def test_errors_are_notified_and_widget_recovers(make_napari_viewer, qtbot, tmp_path,
                                                 monkeypatch, checkpoint):
    import napari.utils.notifications as notifications

    errors = []
    monkeypatch.setattr(notifications, "show_error", errors.append)
    viewer, widget = docked(make_napari_viewer, scene(256))
    widget.set_checkpoint(checkpoint)
    blocker = tmp_path / "not-a-folder.zarr"
    blocker.write_text("a file where the store should go")
    widget.store_edit.setText(str(blocker))
    widget.start()
    session = wait_done(qtbot, widget)
    assert session.outcome == "failed"
    assert errors and "is a file, not a result store folder" in errors[0]
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert not [lay for lay in viewer.layers if "xT" in lay.name]  # nothing half-made
    widget.store_edit.setText(str(tmp_path / "ok.zarr"))
    widget.start()
    assert wait_done(qtbot, widget).outcome == "finished"


def test_viewport_first_follows_the_camera_on_a_pyramid_level(make_napari_viewer, qtbot,
                                                               tmp_path):
    from napari_xt.widgets.run_widget import RunWidget
    from napari_xt.widgets.viewport import camera_of

    viewer = make_napari_viewer()
    level1 = scene(768)[0]
    level0 = np.repeat(np.repeat(level1, 2, axis=0), 2, axis=1)
    viewer.add_image([level0, level1], multiscale=True, name="grey", scale=SCALE,
                     translate=TRANSLATE)
    widget = RunWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Run xT")
    assert widget.level_combo.count() == 2 and widget.level_combo.isEnabled()
    widget.level_combo.setCurrentIndex(1)
    widget.model_combo.setCurrentText("xt_tiny_demo_seg")  # zoo model, 1 channel
    widget.device_combo.setCurrentText("cpu")
    widget.order_combo.setCurrentText("viewport-first")
    widget.probs_check.setChecked(False)
    widget.store_edit.setText(str(tmp_path / "vp.zarr"))
    camera = camera_of(viewer)
    # look at the bottom-right corner of the level-1 image (world = translate + px * 2 * 2)
    camera.center = (TRANSLATE[0] + 700 * 4, TRANSLATE[1] + 700 * 4)
    session = widget.start()
    moved = []

    def look_top_left(item):
        from napari_xt.engine.events import RegionEncoded

        if isinstance(item, RegionEncoded) and not moved:
            moved.append(True)
            camera.center = (TRANSLATE[0], TRANSLATE[1])

    session.worker.yielded.connect(look_top_left)
    session = wait_done(qtbot, widget)
    assert session.outcome == "finished"
    first, second = session.context_steps[0], session.context_steps[1]
    assert (5, 5) in first and (0, 0) not in first  # bottom-right crop first
    assert (0, 0) in second  # then the camera moved: top-left next
    labels = viewer.layers["grey xT xt_tiny_demo_seg L1 labels"]
    # level 1: pixel i covers level-0 pixels 2i, 2i + 1, centred half a level-0 pixel on
    assert tuple(labels.scale) == (4.0, 4.0)
    assert tuple(labels.translate) == (TRANSLATE[0] + 1.0, TRANSLATE[1] + 1.0)
    assert labels.data.shape == (768, 768)
    # the store knows it is level 1: level-0 table pixels, labels with the level's pixel size
    from napari_xt.io import read_labels
    from napari_xt.io.corrections import table_scale

    assert table_scale(tmp_path / "vp.zarr") == (2.0, 2.0)
    assert read_labels(tmp_path / "vp.zarr", "prediction").pixel_size == (4.0, 4.0)


def test_detections_of_a_pyramid_level_run_land_where_they_were_found(make_napari_viewer,
                                                                      qtbot, tmp_path,
                                                                      checkpoint):
    from napari_xt.io import read_detections

    level1 = scene(384)
    level0 = np.repeat(np.repeat(level1, 2, axis=1), 2, axis=2)
    viewer, widget = docked(make_napari_viewer, [level0, level1], multiscale=True)
    widget.level_combo.setCurrentIndex(1)
    widget.set_checkpoint(checkpoint)
    widget.store_edit.setText(str(tmp_path / "l1.zarr"))
    widget.start()
    assert wait_done(qtbot, widget).outcome == "finished"
    table = read_detections(tmp_path / "l1.zarr", "prediction")  # level-0 pixels
    assert len(table["y"]) > 0
    points = viewer.layers["VV xT tiny L1 detections"]
    assert tuple(points.scale) == (2 * SCALE[0], 2 * SCALE[1])  # level-1 pixels
    assert np.allclose(points.data, np.stack([table["y"], table["x"]], 1) / 2)


@pytest.mark.slow
def test_a_run_over_cluster_workers_shows_the_same_results(make_napari_viewer, qtbot, tmp_path,
                                                           monkeypatch, checkpoint, cluster):
    import napari.utils.notifications as notifications

    from napari_xt.io import read_labels, read_probabilities

    errors = []
    monkeypatch.setattr(notifications, "show_error", errors.append)
    viewer, widget = docked(make_napari_viewer, scene(384))
    widget.set_checkpoint(checkpoint)
    widget.order_combo.setCurrentText("raster")
    widget.store_edit.setText(str(tmp_path / "here.zarr"))
    widget.start()
    assert wait_done(qtbot, widget).outcome == "finished", widget.status.text()
    widget.cluster_edit.setText("two")  # neither a number nor an address
    assert widget.start() is None and "neither a number" in errors[-1]
    widget.cluster_edit.setText(cluster)
    widget.store_edit.setText(str(tmp_path / "cluster.zarr"))
    session = widget.start()
    assert session is not None and not widget.cluster_edit.isEnabled()
    session = wait_done(qtbot, widget, timeout=120000)
    assert session.outcome == "finished", widget.status.text()
    for a, b in ((read_labels, "labels"), (read_probabilities, "probabilities")):
        here = np.asarray(a(tmp_path / "here.zarr", "prediction").levels[0])
        there = np.asarray(a(tmp_path / "cluster.zarr", "prediction").levels[0])
        np.testing.assert_array_equal(here, there, err_msg=b)
    shown = viewer.layers["VV xT tiny labels"].data
    stored = np.asarray(read_labels(tmp_path / "cluster.zarr", "prediction").levels[0])
    assert np.array_equal(np.asarray(shown[0] if isinstance(shown, list) else shown), stored)
    widget.save_settings()
    assert widget.settings.load()["cluster"] == cluster  # remembered for the next widget
