"""A finished result store is standard OME-Zarr that independent tools accept
(ome-zarr-models, `ome_zarr info`, pyarrow) and napari reopens as a user opens it (File >
Open, choosing the reader once): the input preview, Labels with class names,
probabilities, Points with features, in one world frame. The napari writers' stores reopen
the same way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_xt.engine import Finished, run
from napari_xt.engine.store import layout
from napari_xt.io import read_detections, read_labels

OUTPUTS = ("labels", "probabilities", "detections")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A finished store of the demo model on a 1100 x 520 scene with 10 m pixels (a 4-level
    label pyramid, a preview at half resolution), run on level 0 of a 2-level input."""
    from napari_xt.io import from_arrays
    from napari_xt.model.choice import load_model
    from napari_xt.train.synthetic import SceneConfig, SyntheticScene

    mp = pytest.MonkeyPatch()
    mp.setattr(layout, "MIN_PYRAMID", 200)
    try:
        model, _, norm = load_model("demo")
        img, _ = SyntheticScene(11, SceneConfig(height=1100, width=520)).read()
        image = from_arrays([img, img[:, ::2, ::2]], axes="CYX", pixel_size=(10.0, 10.0),
                            unit="meter", channel_names=("VV", "VH"))
        out = tmp_path_factory.mktemp("fmt") / "scene.xt.zarr"
        fin = list(run(image, model, out, normalize=norm, outputs=OUTPUTS))[-1]
        assert isinstance(fin, Finished) and fin.summary["complete"], fin
        assert fin.summary["detections"] > 0
    finally:
        mp.undo()
    return out


def test_store_validates_with_ome_zarr_models(store):
    import zarr
    from ome_zarr_models import open_ome_zarr
    from ome_zarr_models.v05 import Image

    root = open_ome_zarr(zarr.open_group(str(store), mode="r"))
    assert isinstance(root, Image)  # labels (ImageLabel) are validated with it
    labels = root.labels
    assert labels is not None and "prediction" in labels.label_paths
    label = labels.get_image_labels_group("prediction")
    meta = label.attributes.ome.image_label
    assert {p.label_value: p.model_extra.get("class") for p in meta.properties} == {
        0: "land", 1: "sea", 2: "lake"}
    assert len(label.ome_attributes.multiscales[0].datasets) == 4
    probs = Image.from_zarr(zarr.open_group(str(store / "probabilities/prediction"), mode="r"))
    assert [a.name for a in probs.ome_attributes.multiscales[0].axes] == ["c", "y", "x"]


def test_ome_zarr_info_lists_image_and_labels(store):
    exe = Path(sys.executable).with_name("ome_zarr")
    out = subprocess.run([str(exe), "info", str(store)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Multiscales" in out.stdout and "labels/prediction" in out.stdout
    assert "(1100, 520)" in out.stdout  # the label image at full resolution


def test_detections_are_a_parquet_table_with_class_names(store):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(store / "tables/prediction/table.parquet")
    zarr_table = read_detections(store, "prediction")
    assert table.num_rows == len(zarr_table["y"]) > 0
    np.testing.assert_array_equal(table.column("y").to_numpy(), zarr_table["y"])
    names = table.column("class_name")
    assert pa.types.is_dictionary(names.type)
    assert set(names.to_pylist()) == {"vessel"}


def test_a_finished_store_is_a_few_files_with_private_state_hidden(store):
    files = [p for p in store.rglob("*") if p.is_file()]
    assert len(files) < 60, len(files)
    import zarr

    root = zarr.open_group(str(store), mode="r")
    assert sorted(root.group_keys()) == [".napari-xt", "labels", "probabilities", "tables"]
    assert not any(p.name.endswith(".partial") or ".tmp-" in str(p) for p in files)


def _open_as_a_user_would(viewer, path):
    """File > Open: with several readers napari asks which one (MultipleReaderError here,
    a dialog in the GUI); the choice, once remembered, opens every store after it."""
    from napari.errors import MultipleReaderError
    from napari.settings import get_settings

    with pytest.raises(MultipleReaderError, match="napari-xt"):
        viewer.open(str(path), plugin=None)
    settings = get_settings().plugins
    folders = f"*.zarr{os.sep}"  # the pattern the dialog records for a .zarr folder
    settings.extension2reader = {**settings.extension2reader, folders: "napari-xt"}
    return viewer.open(str(path), plugin=None)


@pytest.mark.gui
def test_napari_reopens_the_store_without_naming_the_plugin(make_napari_viewer, store):
    viewer = make_napari_viewer()
    layers = _open_as_a_user_would(viewer, store)
    kinds = {lyr.name: type(lyr).__name__ for lyr in layers}
    assert kinds["prediction"] == "Labels" and kinds["prediction p(sea)"] == "Image"
    assert kinds["scene.xt (input preview) VV"] == "Image"
    assert [k for k, v in kinds.items() if v == "Points"] == ["prediction detections"]
    labels = next(lyr for lyr in layers if type(lyr).__name__ == "Labels")
    assert labels.multiscale and len(labels.data) == 4
    assert list(labels.features["class"]) == ["land", "sea", "lake"]
    np.testing.assert_array_equal(np.asarray(labels.data[0]),
                                  np.asarray(read_labels(store, "prediction").levels[0]))
    assert labels.colormap.map(0)[-1] == 0  # land (background) transparent
    # one world frame (10 m pixels): a label pixel's centre is where its input pixel is;
    # a preview pixel (f x f input pixels) sits at the centre of the pixels it averages
    from napari_xt.engine.store.layout import root_attrs

    f = root_attrs(store)["preview"]["first_factor"]
    preview = viewer.layers["scene.xt (input preview) VV"]
    prob = viewer.layers["prediction p(sea)"]
    assert f == 2
    for i, j in ((0, 0), (3, 7), (1099 // f, 519 // f)):
        np.testing.assert_allclose(labels.data_to_world((f * i, f * j)), (10 * f * i, 10 * f * j))
        np.testing.assert_allclose(prob.data_to_world((f * i, f * j)), (10 * f * i, 10 * f * j))
        np.testing.assert_allclose(preview.data_to_world((i, j)),
                                   ((f * i + (f - 1) / 2) * 10, (f * j + (f - 1) / 2) * 10))
    points = next(lyr for lyr in layers if type(lyr).__name__ == "Points")
    table = read_detections(store, "prediction")
    world = np.asarray([points.data_to_world(p) for p in points.data])
    np.testing.assert_allclose(world, np.stack([table["y"], table["x"]], 1) * 10.0)
    assert set(points.features.columns) >= {"class", "class_name", "score", "size"}
    # a detection sits on a pixel the labels call sea
    y, x = (int(v) for v in points.data[np.argmax(table["score"])])
    assert np.asarray(labels.data[0])[y, x] == 1


@pytest.mark.gui
def test_the_plugins_writers_make_stores_that_reopen(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    labels = np.zeros((300, 200), np.uint8)
    labels[40:90, 30:120] = 3
    viewer.add_labels(labels, name="drawn").save(str(tmp_path / "a.zarr"), plugin="napari-xt")
    viewer.add_points([[5.0, 6.0], [50.0, 60.0]], name="picked",
                      features={"score": [0.2, 0.7]}).save(str(tmp_path / "a.zarr"),
                                                           plugin="napari-xt")
    viewer.layers.clear()
    layers = _open_as_a_user_would(viewer, tmp_path / "a.zarr")
    kinds = {lyr.name: type(lyr).__name__ for lyr in layers}
    assert kinds == {"drawn": "Labels", "picked": "Points"}
    np.testing.assert_array_equal(np.asarray(viewer.layers["drawn"].data), labels)
    np.testing.assert_allclose(viewer.layers["picked"].features["score"], [0.2, 0.7])
    assert os.path.isdir(tmp_path / "a.zarr" / "labels" / "drawn")


def test_a_class_index_without_a_name_is_named_by_its_index_not_by_another_class():
    from napari_xt.engine.store.publish import class_names

    got = class_names(np.array([0, 1, 2, -1], np.int64), ("vessel", "buoy"))
    assert list(got) == ["vessel", "buoy", "class 2", "class -1"]
    assert class_names(np.empty(0, np.int64), ("vessel",)).shape == (0,)
