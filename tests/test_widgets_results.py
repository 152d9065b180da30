"""What a run leaves in the viewer: result layers on the image at any pyramid level (and
where File > Open puts the store), class names, a classifier's class, the layers of earlier
runs kept, a region grid that ends at the image's edge and steps aside when done."""

import numpy as np
import pytest
from test_widgets_run import SCALE, TRANSLATE, checkpoint, docked, scene, wait_done  # noqa: F401

pytestmark = pytest.mark.gui

NAMES, POINTS = ("land", "sea", "lake"), ("vessel",)
SQUARE = (64, 128, 96, 160)  # (y0, y1, x0, x1) level pixels of the known feature


@pytest.fixture(autouse=True)
def _settings_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_XT_CONFIG_DIR", str(tmp_path / "config"))


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    """A 1-channel segmenter that says "sea" everywhere (its logits bias), with class names
    and a centre map: every pixel is sea except the image's NaN pixels, which the engine
    writes as label 0 (land) and where it finds no detections. A NaN square in the input is
    therefore a feature whose place in the labels is known exactly."""
    import torch

    from napari_xt.model import create_model, save_checkpoint
    from napari_xt.widgets.models import keep_triton_out

    keep_triton_out()
    torch.manual_seed(0)
    model = create_model("xt_tiny_demo_seg", in_chans=1, num_classes=3,
                         head={"num_classes": 3, "outputs": (("centre", 1),),
                               "class_names": NAMES, "point_names": POINTS})
    with torch.no_grad():
        model.head.outputs["logits"].bias.copy_(torch.tensor([0.0, 8.0, 0.0]))
        model.head.outputs["centre"].bias.fill_(2.0)
    path = tmp_path_factory.mktemp("marker") / "marker.safetensors"
    save_checkpoint(model, path)
    return str(path)


def square_pyramid(level: int, size: int = 256):
    """Levels 0..`level` of a grey image whose level `level` is `size` px with a NaN square
    at SQUARE (level 0 is lazy: at level 4 it is 4096 px a side)."""
    import dask.array as da

    levels = []
    for k in range(level + 1):
        f = 2 ** (level - k)
        n = size * f
        rng = np.random.default_rng(k)
        noise = da.from_array(rng.normal(size=(256, 256)).astype(np.float32), chunks=256)
        base = da.tile(noise, (n // 256, n // 256)).rechunk(512)
        yy, xx = da.meshgrid(da.arange(n, chunks=512), da.arange(n, chunks=512), indexing="ij")
        y0, y1, x0, x1 = (v * f for v in SQUARE)
        inside = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
        levels.append(da.where(inside, np.float32(np.nan), base).astype(np.float32))
    return levels


def edges(layer, y0, y1, x0, x1):
    """World (top, bottom, left, right) edges of data pixels y0..y1-1, x0..x1-1."""
    top_left = layer.data_to_world((y0 - 0.5, x0 - 0.5))
    bottom_right = layer.data_to_world((y1 - 0.5, x1 - 0.5))
    return np.array([top_left[0], bottom_right[0], top_left[1], bottom_right[1]])


def zero_box(data):
    ys, xs = np.nonzero(np.asarray(data) == 0)
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def run_on_level(make_napari_viewer, qtbot, tmp_path, marker, level):
    from napari_xt.widgets.run_widget import RunWidget

    viewer = make_napari_viewer()
    image = viewer.add_image(square_pyramid(level), multiscale=True, name="grey",
                             scale=SCALE, translate=TRANSLATE)
    widget = RunWidget(viewer)
    widget.set_checkpoint(marker)
    widget.device_combo.setCurrentText("cpu")
    widget.level_combo.setCurrentIndex(level)
    widget.probs_check.setChecked(True)
    store = tmp_path / f"level{level}.xt.zarr"
    widget.store_edit.setText(str(store))
    widget.start()
    session = wait_done(qtbot, widget)
    assert session.outcome == "finished", widget.status.text()
    return viewer, image, widget, store


@pytest.mark.parametrize("level", [1, 4])
def test_labels_and_points_sit_on_the_image_at_any_level(make_napari_viewer, qtbot, tmp_path,
                                                          marker, level):
    viewer, image, widget, store = run_on_level(make_napari_viewer, qtbot, tmp_path, marker,
                                                level)
    f = 2 ** level
    y0, y1, x0, x1 = (v * f for v in SQUARE)  # the NaN square in level-0 pixels
    truth = edges(image, y0, y1, x0, x1)  # where napari draws it (image data = level 0)
    name = f"grey xT marker L{level}"
    labels = viewer.layers[f"{name} labels"]
    assert labels.multiscale or np.asarray(labels.data).shape == (256, 256)
    level0 = labels.data[0] if labels.multiscale else labels.data
    box = zero_box(level0)
    assert box == SQUARE  # the engine wrote label 0 exactly on the NaN pixels
    np.testing.assert_allclose(edges(labels, *box), truth, atol=1e-6)
    # probabilities too (their own layers, same frame)
    sea = viewer.layers[f"{name} p(sea)"]
    np.testing.assert_allclose(edges(sea, *SQUARE), truth, atol=1e-6)
    # detections: none on the square, each on the label pixel it was found at
    points = viewer.layers[f"{name} detections"]
    assert len(points.data) > 10
    world = np.array([points.data_to_world(p) for p in points.data])
    inside = ((world[:, 0] > truth[0]) & (world[:, 0] < truth[1])
              & (world[:, 1] > truth[2]) & (world[:, 1] < truth[3]))
    assert not inside.any()
    pixels = np.array([labels.world_to_data(w) for w in world])
    np.testing.assert_allclose(pixels, points.data, atol=1e-6)
    assert set(points.features["class_name"]) == {"vessel"}
    # File > Open of the store: the same places, on the input's level 0 (no layer translate)
    opened = viewer.open(str(store), plugin="napari-xt")
    by_name = {lay.name: lay for lay in opened}
    reopened = by_name["prediction"]
    shift = np.array([TRANSLATE[0], TRANSLATE[0], TRANSLATE[1], TRANSLATE[1]])
    level0 = reopened.data[0] if reopened.multiscale else reopened.data
    assert zero_box(level0) == SQUARE
    np.testing.assert_allclose(edges(reopened, *SQUARE), truth - shift, atol=1e-6)
    table = by_name["prediction detections"]
    np.testing.assert_allclose(np.array([table.data_to_world(p) for p in table.data]),
                               world - np.array(TRANSLATE), atol=1e-6)
    assert "vessel" in set(table.features["class_name"])


def test_class_names_in_layers_and_inspect_status(make_napari_viewer, qtbot, tmp_path,
                                                  marker):
    from napari_xt.widgets.inspect_widget import LAYER_ONLY, InspectWidget, changes_text

    viewer, image, widget, _ = run_on_level(make_napari_viewer, qtbot, tmp_path, marker, 0)
    name = "grey xT marker"
    labels = viewer.layers[f"{name} labels"]
    assert list(labels.features["class"]) == list(NAMES)
    assert [f"{name} p({n})" in viewer.layers for n in NAMES] == [True] * 3
    assert list(viewer.layers[f"{name} detections"].features["class_name"].unique()) == \
        ["vessel"]
    inspect = InspectWidget(viewer)
    inspect.sync()
    inspect.row_spin.setValue(0)
    inspect.col_spin.setValue(1)  # region (0, 1) holds part of the NaN square
    inspect.compare()
    qtbot.waitUntil(lambda: inspect.worker is None, timeout=30000)
    assert list(viewer.layers[LAYER_ONLY].features["class"]) == list(NAMES)
    assert "class 1" not in inspect.status.text()
    alone = np.array([[1, 1], [2, 0]])
    context = np.array([[1, 2], [2, 1]])
    assert changes_text(alone, context, NAMES) == \
        "; without -> with context: land -> sea 50%, sea -> lake 50%"


def test_a_classifier_run_shows_its_class(make_napari_viewer, qtbot, tmp_path):
    """A classifier's result exists only as a record in the store: the widget shows it as a
    rectangle around the image with the class name and score, and in its status line."""
    import torch

    from napari_xt.io import read_classification
    from napari_xt.model import create_model, save_checkpoint

    torch.manual_seed(0)
    names = ("cat", "dog", "eel", "owl")
    model = create_model("xt_tiny_demo", in_chans=1, num_classes=4,
                         head={"num_classes": 4, "class_names": names})
    path = tmp_path / "pets.safetensors"
    save_checkpoint(model, path)
    from napari_xt.widgets.run_widget import RunWidget

    viewer = make_napari_viewer()
    viewer.add_image(scene(256)[0], name="img", scale=SCALE, translate=TRANSLATE)
    widget = RunWidget(viewer)
    widget.set_checkpoint(str(path))
    widget.device_combo.setCurrentText("cpu")
    store = tmp_path / "pets.xt.zarr"
    widget.store_edit.setText(str(store))
    widget.start()
    assert wait_done(qtbot, widget).outcome == "finished", widget.status.text()
    record = read_classification(store, "prediction")
    shown = viewer.layers["img xT pets class"]
    assert shown.features["class_name"][0] == names[record["class"]]
    assert shown.features["score"][0] == pytest.approx(record["score"])
    assert shown.metadata["classification"]["class"] == record["class"]
    assert f"{names[record['class']]} ({record['score']:.2f})" in shown.features["label"][0]
    assert names[record["class"]] in widget.status.text()
    corners = np.array([shown.data_to_world(c) for c in shown.data[0]])
    truth = edges(viewer.layers["img"], 0, 256, 0, 256)
    assert corners[:, 0].min() == pytest.approx(truth[0])
    assert corners[:, 0].max() == pytest.approx(truth[1])
    assert corners[:, 1].min() == pytest.approx(truth[2])
    assert corners[:, 1].max() == pytest.approx(truth[3])
    # reopened from disk: the same record, as a labelled rectangle
    opened = {lay.name: lay for lay in viewer.open(str(store), plugin="napari-xt")}
    assert opened["prediction class"].features["class"][0] == record["class"]


def test_a_second_run_keeps_the_first_runs_layers(make_napari_viewer, qtbot, tmp_path,
                                                  checkpoint):  # noqa: F811
    from napari_xt.io import read_labels

    viewer, widget = docked(make_napari_viewer, scene(256))
    widget.set_checkpoint(checkpoint)
    first_store = widget.store_edit.text()
    assert first_store.endswith("VV.tiny.xt.zarr")
    widget.store_edit.setText(str(tmp_path / "VV.tiny.xt.zarr"))
    widget.start()
    assert wait_done(qtbot, widget).outcome == "finished"
    widget.model_combo.setCurrentText("xt_tiny_demo_seg")
    assert widget.store_edit.text() == str(tmp_path / "VV.tiny.xt.zarr")  # chosen: kept
    widget.store_edit.setText(str(tmp_path / "VV.zoo.xt.zarr"))
    widget.probs_check.setChecked(False)
    widget.start()
    assert wait_done(qtbot, widget).outcome == "finished"
    names = [lay.name for lay in viewer.layers]
    for tag in ("tiny", "xt_tiny_demo_seg"):
        assert f"VV xT {tag} labels" in names
    first = viewer.layers["VV xT tiny labels"]
    second = viewer.layers["VV xT xt_tiny_demo_seg labels"]
    assert first.metadata["napari-xt"]["store"] == str(tmp_path / "VV.tiny.xt.zarr")
    stored = np.asarray(read_labels(tmp_path / "VV.tiny.xt.zarr", "prediction").levels[0])
    assert np.array_equal(np.asarray(first.data), stored)  # still the first run's result
    assert not np.array_equal(np.asarray(first.data), np.asarray(second.data))
    # the same run again (resume) replaces only its own layers
    count = len(viewer.layers)
    widget.start()
    assert wait_done(qtbot, widget).outcome == "finished"
    assert len(viewer.layers) == count and "VV xT tiny labels" in viewer.layers


def test_region_grid_ends_at_the_image_edge_and_steps_aside(make_napari_viewer, qtbot,
                                                            tmp_path, checkpoint):  # noqa: F811
    from napari_xt.widgets.region_grid import (
        DECODED,
        DONE_OPACITY,
        LAYER_NAME,
        QUEUED,
        cell_size,
    )

    assert cell_size(128, 384, 384) == 128  # whole regions: one cell each
    assert cell_size(128, 300, 200) == 4  # 300 and 200 are multiples of 4
    assert cell_size(256, 100_001, 100_000) == 128  # none exact: the finest that fits
    from napari_xt.train.synthetic import SceneConfig, make_scene

    image, _, _ = make_scene(1, SceneConfig(height=200, width=300))
    viewer, widget = docked(make_napari_viewer, image)
    widget.set_checkpoint(checkpoint)
    widget.store_edit.setText(str(tmp_path / "grid.zarr"))
    widget.resume_check.setChecked(True)
    session = widget.start()
    seen = []

    def look(item):
        if not seen and LAYER_NAME in viewer.layers:
            grid = viewer.layers[LAYER_NAME]
            rows, cols = grid.data.shape
            seen.append((grid.visible, grid.opacity, edges(grid, 0, rows, 0, cols)))

    session.worker.yielded.connect(look)
    session = wait_done(qtbot, widget)
    assert session.outcome == "finished"
    visible, opacity, extent = seen[0]
    assert visible and opacity > DONE_OPACITY
    np.testing.assert_allclose(extent, edges(viewer.layers["VV"], 0, 200, 0, 300))  # no overhang
    grid = viewer.layers[LAYER_NAME]
    assert not grid.visible  # all decoded: hidden
    assert (session.painter.states == DECODED).all()
    # a run that stops early fades: decoded regions transparent, the rest still shown
    session.painter.layer.visible = True
    session.painter.states[0, 0] = QUEUED
    session.painter._dirty = True
    session.painter.stop("cancelled")
    assert grid.visible and grid.opacity == DONE_OPACITY
    assert grid.colormap.map(np.array([DECODED]))[0, 3] == 0.0
    assert grid.colormap.map(np.array([QUEUED]))[0, 3] > 0.0
