"""The "Correct results" widget: edit a window of a run's labels and its detections, save
them beside the prediction, never lose unsaved edits or the prediction."""

import numpy as np
import pytest
from test_widgets_run import SCALE, TRANSLATE, checkpoint, docked, scene, wait_done  # noqa: F401

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _settings_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_XT_CONFIG_DIR", str(tmp_path / "config"))


def _wait(qtbot, widget):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)


@pytest.mark.slow
def test_correct_a_window_and_the_detections_of_a_run(make_napari_viewer, qtbot, tmp_path,
                                                      checkpoint, monkeypatch):  # noqa: F811
    import napari.utils.notifications as notifications
    from napari._qt.qt_main_window import _instantiate_dock_widget

    from napari_xt.io import read_detections, read_labels
    from napari_xt.io.corrections import edits, read_corrected_detections
    from napari_xt.train.data import IGNORE_INDEX, Normalization, ZarrPairDataset
    from napari_xt.widgets import correct_widget as cw

    warnings, errors = [], []
    monkeypatch.setattr(notifications, "show_warning", warnings.append)
    monkeypatch.setattr(notifications, "show_error", errors.append)
    viewer, run = docked(make_napari_viewer, scene(384))
    store = tmp_path / "run.zarr"
    run.set_checkpoint(checkpoint)
    run.store_edit.setText(str(store))
    run.start()
    assert wait_done(qtbot, run).outcome == "finished"
    predicted = np.asarray(read_labels(store, "prediction").levels[0])
    table = read_detections(store, "prediction")
    assert len(table["y"]) > 0

    widget = _instantiate_dock_widget(cw.CorrectWidget, viewer)
    viewer.window.add_dock_widget(widget, name="Correct results")
    assert widget.store == str(store) and widget.result == "prediction"
    assert not widget.save()  # nothing loaded yet
    widget.size_spin.setValue(128)
    # a window centred on label pixel (100, 300): rows 36:164, columns 236:364
    world = (TRANSLATE[0] + 100 * SCALE[0], TRANSLATE[1] + 300 * SCALE[1])
    assert widget.edit_view(world)
    _wait(qtbot, widget)
    assert widget.window == (36, 236, 164, 364)
    edit = viewer.layers[cw.LAYER_EDIT]
    assert np.array_equal(edit.data, predicted[36:164, 236:364])
    assert tuple(edit.translate) == (TRANSLATE[0] + 36 * SCALE[0], TRANSLATE[1] + 236 * SCALE[1])
    assert tuple(edit.scale) == SCALE and edit.editable and edit.mode == "paint"
    points = viewer.layers[cw.LAYER_POINTS]
    assert len(points.data) == len(table["y"])

    # paint: the edits are kept until saved or discarded
    edit.data[:40, :50] = 2
    edit.refresh()
    assert widget.dirty
    assert not widget.edit_view(world)
    assert warnings and "save or discard" in str(warnings[-1])
    points.selected_data = {0}
    points.remove_selected()
    points.add([[150.0, 20.0]])
    widget.store_edit.setText(str(tmp_path / "elsewhere.zarr"))  # saves go where it came from
    assert widget.save()
    assert not edit.editable and not points.editable  # no edits while the save runs
    _wait(qtbot, widget)
    assert not errors and not widget.dirty and edit.editable
    assert not (tmp_path / "elsewhere.zarr").exists()
    widget.store_edit.setText(str(store))

    expected = predicted.copy()
    expected[36:76, 236:286] = 2
    corrected = read_labels(store, "prediction-corrected")
    assert np.array_equal(np.asarray(corrected.levels[0]), expected)
    assert np.array_equal(np.asarray(read_labels(store, "prediction").levels[0]), predicted)
    [saved] = edits(store, "prediction")
    assert saved.box == (36, 236, 164, 364)
    assert saved.changed == int(np.count_nonzero(predicted[36:76, 236:286] != 2))
    assert f"{saved.changed:,} pixels changed" in widget.status.text()
    fixed = read_corrected_detections(store, "prediction")
    assert len(fixed["y"]) == len(table["y"])  # one removed, one added
    assert (fixed["y"][-1], fixed["x"][-1], fixed["score"][-1]) == (150.0, 20.0, 1.0)
    assert np.array_equal(fixed["y"][:-1], table["y"][1:])
    assert len(read_detections(store, "prediction")["y"]) == len(table["y"])
    assert cw.LAYER_CORRECTED in viewer.layers

    # the saved corrections become training pairs (the image: the run's own)
    assert widget.export(str(tmp_path / "pairs"))
    _wait(qtbot, widget)
    [pair] = ZarrPairDataset(tmp_path / "pairs", Normalization())
    crop = 128 * 2  # the tiny model's region size x crop_regions: the default margin
    assert pair.mask.shape == (min(384, 164 + crop), 384)  # rows 0:384, columns 0:384
    assert (pair.mask[36:164, 236:364] == expected[36:164, 236:364]).all()
    assert (pair.mask[:36] == IGNORE_INDEX).all()
    assert "1 training pair(s)" in widget.status.text()

    # a new window overlapping the saved one starts from the correction
    assert widget.edit_view((TRANSLATE[0] + 64 * SCALE[0], TRANSLATE[1] + 250 * SCALE[1]))
    _wait(qtbot, widget)
    y0, x0, y1, x1 = widget.window
    assert np.array_equal(viewer.layers[cw.LAYER_EDIT].data, expected[y0:y1, x0:x1])
    viewer.layers[cw.LAYER_EDIT].data[0, 0] = 0
    widget.discard()
    assert cw.LAYER_EDIT not in viewer.layers and len(edits(store, "prediction")) == 1

    # a fresh run into the store would delete the corrections: even when the user confirms
    # replacing the store, it is refused, said clearly
    from napari_xt.widgets import run_widget

    asked = []
    monkeypatch.setattr(run_widget, "confirm_replace",
                        lambda parent, path, kind: asked.append(kind) or True)
    run.resume_check.setChecked(False)
    run.start()
    assert asked == ["store"]
    wait_done(qtbot, run)
    assert errors and "corrections" in str(errors[-1])
    assert np.array_equal(np.asarray(read_labels(store, "prediction-corrected").levels[0]),
                          expected)


def _widget_on_labels(make_napari_viewer, store, labels):
    """A Correct results widget on a store holding `labels` as "prediction" (0.5 um pixels,
    classes 0-2), as a user opens it from disk."""
    from napari_xt.io import write_labels
    from napari_xt.widgets import correct_widget as cw

    write_labels(store, "prediction", labels, pixel_size=(0.5, 0.5), unit="micrometer",
                 properties={k: {"class": k} for k in range(3)})
    viewer = make_napari_viewer()
    widget = cw.CorrectWidget(viewer)
    widget.store_edit.setText(str(store))
    widget.refresh_results()
    return viewer, widget


def test_a_store_opened_from_disk_uses_its_pixel_size(make_napari_viewer, qtbot, tmp_path, rng):
    from napari_xt.widgets import correct_widget as cw

    store = tmp_path / "labels.zarr"
    labels = rng.integers(0, 3, (200, 300)).astype(np.uint8)
    viewer, widget = _widget_on_labels(make_napari_viewer, store, labels)
    widget.size_spin.setValue(64)
    assert widget.edit_view((25.0, 149.0))  # label pixel (50, 298): moved inside the image
    _wait(qtbot, widget)
    assert widget.window == (18, 236, 82, 300)
    layer = viewer.layers[cw.LAYER_EDIT]
    assert tuple(layer.scale) == (0.5, 0.5) and tuple(layer.translate) == (9.0, 118.0)
    assert np.array_equal(layer.data, labels[18:82, 236:300])
    assert cw.LAYER_POINTS not in viewer.layers  # no detection table in this store
    widget.pick_check.setChecked(True)  # a click elsewhere edits the window there
    assert widget._on_click in viewer.mouse_drag_callbacks

    class Press:
        type, position = "mouse_press", (10.0, 10.0)

    widget._on_click(viewer, Press())
    _wait(qtbot, widget)
    assert widget.window == (0, 0, 64, 64)
    layer = viewer.layers[cw.LAYER_EDIT]
    assert tuple(layer.translate) == (0.0, 0.0)
    widget.pick_check.setChecked(False)
    assert widget._on_click not in viewer.mouse_drag_callbacks
    layer.data[:] = 7  # not a class of this result
    assert widget.save()
    _wait(qtbot, widget)
    assert "not classes" in widget.status.text()
    assert widget.dirty  # the edits are still there to fix


def test_remove_specks_writes_shows_and_chooses_the_sieved_copy(make_napari_viewer, qtbot,
                                                                 tmp_path, rng, monkeypatch):
    import napari.utils.notifications as notifications

    from napari_xt.io import list_results, read_labels, sieve, write_labels
    from napari_xt.widgets import correct_widget as cw

    warnings = []
    monkeypatch.setattr(notifications, "show_warning", warnings.append)
    store = tmp_path / "labels.zarr"
    labels = np.zeros((200, 300), np.uint8)
    labels[:, 150:] = 1
    labels[rng.random((200, 300)) < 0.01] = 2  # specks everywhere
    viewer, widget = _widget_on_labels(make_napari_viewer, store, labels)
    widget.sieve_spin.setValue(8)
    assert widget.remove_specks()
    _wait(qtbot, widget)
    expected = sieve(labels, 8)
    assert (expected != 2).all() and (expected[:, :150] == 0).all()
    np.testing.assert_array_equal(np.asarray(read_labels(store, "prediction_sieve8").levels[0]),
                                  expected)
    np.testing.assert_array_equal(np.asarray(read_labels(store, "prediction").levels[0]),
                                  labels)  # the prediction is kept
    layer = viewer.layers["prediction_sieve8"]
    assert tuple(layer.scale) == (0.5, 0.5)
    np.testing.assert_array_equal(np.asarray(layer.data), expected)
    assert widget.result == "prediction_sieve8"  # and it is the one corrected now
    widget.size_spin.setValue(64)
    assert widget.edit_view((10.0, 10.0))
    _wait(qtbot, widget)
    np.testing.assert_array_equal(viewer.layers[cw.LAYER_EDIT].data, expected[:64, :64])
    widget.discard()

    # again: the copy is reused, not written twice; a copy of another origin is refused
    widget.result_combo.setCurrentText("prediction")
    stamp = (store / "labels/prediction_sieve8/0").stat().st_mtime_ns
    assert widget.remove_specks() and widget.worker is None
    assert (store / "labels/prediction_sieve8/0").stat().st_mtime_ns == stamp
    write_labels(store, "prediction_sieve16", labels)  # a user's own result of that name
    widget.result_combo.setCurrentText("prediction")
    widget.sieve_spin.setValue(16)
    assert not widget.remove_specks()
    assert "never replaced" in warnings[-1] and "another result" in warnings[-1]
    np.testing.assert_array_equal(
        np.asarray(read_labels(store, "prediction_sieve16").levels[0]), labels)
    assert set(list_results(store)["labels"]) == {"prediction", "prediction_sieve8",
                                                  "prediction_sieve16"}
