"""The "Inspect context" widget: region-only prediction against the run's result."""

import numpy as np
import pytest
from test_widgets_run import SCALE, TRANSLATE, checkpoint, docked, scene, wait_done  # noqa: F401

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _settings_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_XT_CONFIG_DIR", str(tmp_path / "config"))


def test_inspect_compares_region_only_with_the_run(make_napari_viewer, qtbot, tmp_path,
                                                    checkpoint, monkeypatch):  # noqa: F811
    import napari.utils.notifications as notifications
    import torch

    from napari_xt.io import read_labels
    from napari_xt.widgets.inspect_widget import (
        LAYER_CHANGED,
        LAYER_MAP,
        LAYER_ONLY,
        InspectWidget,
    )
    from napari_xt.widgets.region_grid import grid_transform

    errors = []
    monkeypatch.setattr(notifications, "show_error", errors.append)
    from napari._qt.qt_main_window import _instantiate_dock_widget

    image = scene(384)
    viewer, run = docked(make_napari_viewer, image)
    # as napari builds plugin widgets: the viewer injected by annotation, behind its proxy
    inspect = _instantiate_dock_widget(InspectWidget, viewer)
    assert isinstance(inspect, InspectWidget) and inspect.viewer is not viewer
    viewer.window.add_dock_widget(inspect, name="Inspect context")
    inspect.compare()  # nothing to inspect yet
    assert errors and "finish a run" in errors[0]

    run.set_checkpoint(checkpoint)
    run.store_edit.setText(str(tmp_path / "run.zarr"))
    run.start()
    session = wait_done(qtbot, run)
    assert session.outcome == "finished"
    stored = np.asarray(read_labels(tmp_path / "run.zarr", "prediction").levels[0])

    inspect.sync()
    assert inspect.row_spin.maximum() == 2 and inspect.col_spin.maximum() == 2
    inspect.mode_combo.setCurrentText("region alone")
    inspect.compare()
    qtbot.waitUntil(lambda: inspect.worker is None, timeout=30000)
    only = viewer.layers[LAYER_ONLY]
    # region (0, 0) alone is exactly the model's forward pass on that region's pixels
    with torch.no_grad():
        logits = session.model(torch.from_numpy(image[:, :128, :128])[None])["logits"]
    expected = logits[0].argmax(0).numpy()
    assert np.array_equal(only.data, expected)
    fraction = float(np.mean(expected != stored[:128, :128]))
    assert inspect.last_comparison.changed_fraction == pytest.approx(fraction)
    assert f"{100 * fraction:.1f}%" in inspect.status.text()
    assert np.array_equal(viewer.layers[LAYER_CHANGED].data, expected != stored[:128, :128])
    assert tuple(only.scale) == SCALE and tuple(only.translate) == TRANSLATE

    inspect.row_spin.setValue(1)
    inspect.col_spin.setValue(2)
    inspect.mode_combo.setCurrentText("no context (identity)")
    inspect.compare()
    qtbot.waitUntil(lambda: inspect.worker is None, timeout=30000)
    only = viewer.layers[LAYER_ONLY]
    assert only.data.shape == (128, 128)
    assert tuple(only.translate) == (TRANSLATE[0] + 128 * SCALE[0], TRANSLATE[1] + 256 * SCALE[1])

    inspect.mode_combo.setCurrentText("region alone")
    inspect.context_map()
    qtbot.waitUntil(lambda: inspect.worker is None, timeout=60000)
    heat = viewer.layers[LAYER_MAP]
    assert heat.data.shape == (3, 3)
    assert heat.data[0, 0] == pytest.approx(fraction, abs=1e-6)
    assert ((heat.data >= 0) & (heat.data <= 1)).all() and heat.data.max() > 0
    scale, translate = grid_transform(128, SCALE, TRANSLATE)
    assert tuple(heat.scale) == scale and tuple(heat.translate) == translate
    assert "average over 9 regions" in inspect.status.text()

    # a click at level pixel (300, 140) picks region (2, 1)
    world = (TRANSLATE[0] + 300 * SCALE[0], TRANSLATE[1] + 140 * SCALE[1])
    assert inspect.region_at(world) == (2, 1)
    assert inspect.region_at((TRANSLATE[0] - 50, 0)) is None


@pytest.mark.slow
def test_contribution_maps_of_the_last_run_and_of_a_reopened_store(
        make_napari_viewer, qtbot, tmp_path, checkpoint, monkeypatch):  # noqa: F811
    import napari.utils.notifications as notifications

    from napari_xt.cli import main
    from napari_xt.widgets.contribution_view import LAYER_CONTRIB, LAYER_SPAN
    from napari_xt.widgets.inspect_widget import InspectWidget
    from napari_xt.widgets.region_grid import grid_transform

    errors = []
    monkeypatch.setattr(notifications, "show_error", errors.append)
    viewer, run = docked(make_napari_viewer, scene(384))
    inspect = InspectWidget(viewer)
    viewer.window.add_dock_widget(inspect, name="Inspect context")
    run.set_checkpoint(checkpoint)
    run.store_edit.setText(str(tmp_path / "run.zarr"))
    run.start()
    assert wait_done(qtbot, run).outcome == "finished"

    # a click on level pixel (300, 140) with "contribution map": region (2, 1)
    inspect.click_combo.setCurrentText("contribution map")
    inspect.method_combo.setCurrentText("occlusion")
    inspect._picked((TRANSLATE[0] + 300 * SCALE[0], TRANSLATE[1] + 140 * SCALE[1]))
    qtbot.waitUntil(lambda: inspect.worker is None, timeout=60000)
    assert not errors, errors
    layer = viewer.layers[LAYER_CONTRIB]
    assert layer.data.shape == (3, 3) and layer.colorbar.visible
    assert np.nansum(layer.data) == pytest.approx(1.0, abs=1e-5)
    scale, translate = grid_transform(128, SCALE, TRANSLATE)
    assert tuple(layer.scale) == scale and tuple(layer.translate) == translate
    cm = inspect.last_contributions.map
    assert cm.region == (2, 1) and "region (2, 1), occlusion" in inspect.status.text()
    spans = viewer.layers[LAYER_SPAN]
    assert len(spans.data) == len(cm.spans) + 1
    assert list(spans.features["kind"]) == ["crop"] * len(cm.spans) + ["region"]
    y0, x0 = spans.data[-1].min(0)  # the region's outline, in world coordinates
    assert (y0, x0) == pytest.approx((TRANSLATE[0] + (256 - 0.5) * SCALE[0],
                                      TRANSLATE[1] + (128 - 0.5) * SCALE[1]))

    inspect.method_combo.setCurrentText("attention")  # switching the method recomputes
    inspect.head_spin.setValue(0)
    inspect.contributions()
    qtbot.waitUntil(lambda: inspect.worker is None, timeout=60000)
    again = inspect.last_contributions.map
    assert again.method == "attention" and again.head == 0
    assert viewer.layers[LAYER_CONTRIB].metadata["contribution"]["method"] == "attention"

    # a store reopened from disk (a CLI run on a file, so the store knows the image)
    from napari_xt.train.synthetic import SceneConfig, SyntheticScene

    img, _ = SyntheticScene(907, SceneConfig(height=256, width=320)).read()
    np.save(tmp_path / "s.npy", img)
    assert main(["predict", str(tmp_path / "s.npy"), "--model", "demo", "--out",
                 str(tmp_path / "cli.zarr")]) == 0
    inspect.store_edit.setText(str(tmp_path / "cli.zarr"))
    inspect.sync()
    assert inspect.row_spin.maximum() == 3 and inspect.col_spin.maximum() == 4
    assert inspect.region_at((130.0, 200.0)) == (2, 3)
    inspect.model_combo.setCurrentText("demo")
    inspect.method_combo.setCurrentText("rollout")
    inspect.head_spin.setValue(-1)
    inspect.row_spin.setValue(2)
    inspect.col_spin.setValue(3)
    inspect.contributions()
    qtbot.waitUntil(lambda: inspect.worker is None, timeout=60000)
    assert not errors, errors
    reopened = viewer.layers[LAYER_CONTRIB]
    assert reopened.data.shape == (4, 5) and inspect.last_contributions.map.region == (2, 3)
    assert reopened.metadata["contribution"]["where"] == str(tmp_path / "cli.zarr")
    # the view re-decoded without context, from the store's embedding cache
    from napari_xt.widgets.contribution_view import LAYER_VIEW

    viewer.reset_view()
    inspect.view_check.setChecked(True)
    qtbot.waitUntil(lambda: inspect.worker is None, timeout=60000)
    assert not errors, errors
    view = inspect.last_view
    assert view.from_cache == 20 and view.encoded == 0  # the whole 4 x 5 grid in view
    layer = viewer.layers[LAYER_VIEW]
    assert layer.data.shape == (256, 320) and tuple(layer.translate) == (0.0, 0.0)
    assert "20 regions without context (20 from the embedding cache" in inspect.status.text()
    inspect.view_check.setChecked(False)
    assert LAYER_VIEW not in viewer.layers

    inspect.model_combo.setCurrentText("demo-region-only")  # not the run's model
    inspect.contributions()
    qtbot.waitUntil(lambda: inspect.worker is None, timeout=60000)
    assert errors and "not the one the run used" in errors[-1]
