"""napari integration: the manifest's reader, writers and sample data in a real viewer."""

from __future__ import annotations

import numpy as np
import pytest
from _io_files import rgb_image, write_ngff, write_pyramidal_ome_tiff

from napari_xt import _napari_io
from napari_xt.io import convert, read_detections, read_labels, write_detections, write_labels


def test_get_reader_claims_only_supported_paths(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    assert _napari_io.get_reader(str(tmp_path / "a.txt")) is None
    assert _napari_io.get_reader(str(tmp_path)) is None  # a plain folder
    assert _napari_io.get_reader(str(tmp_path / "a.ome.tif")) is _napari_io.read_paths
    assert _napari_io.get_reader([str(tmp_path / "a.svs"),
                                  str(tmp_path / "b.npy")]) is _napari_io.read_paths
    assert _napari_io.get_reader([str(tmp_path / "a.svs"), str(tmp_path / "a.txt")]) is None


def test_manifest_is_valid_and_lists_the_contributions():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-xt")
    ids = {c.id for c in manifest.contributions.commands}
    assert {"napari-xt.get_reader", "napari-xt.write_labels", "napari-xt.write_points",
            "napari-xt.sample_slide", "napari-xt.sample_sar"} <= ids
    patterns = manifest.contributions.readers[0].filename_patterns
    assert {"*.zarr", "*.ome.tif", "*.svs", "*.ndpi", "*.npy"} <= set(patterns)
    assert {w.layer_types[0] for w in manifest.contributions.writers} == {"labels", "points"}
    assert {s.key for s in manifest.contributions.sample_data} == {"slide", "sar"}


def test_layer_data_for_multichannel_float_never_scans_level_0(tmp_path, rng, monkeypatch):
    data = rng.normal(size=(2, 256, 256)).astype(np.float32)
    write_ngff(tmp_path / "m.zarr", [data, data[:, ::2, ::2], data[:, ::4, ::4]], "cyx",
               version="0.5", omero={"channels": [{"label": "VV", "color": "FF00FF"},
                                                  {"label": "VH", "color": "00FF00"}]})
    levels, kwargs, kind = _napari_io.read_paths(str(tmp_path / "m.zarr"))[0]
    assert kind == "image" and kwargs["multiscale"] and len(levels) == 3
    assert kwargs["channel_axis"] == 0 and kwargs["name"] == ["m VV", "m VH"]
    small = data[:, ::4, ::4]
    for (lo, hi), channel in zip(kwargs["contrast_limits"], small):
        assert (lo, hi) == pytest.approx((channel.min(), channel.max()))
    assert kwargs["colormap"] == ["magenta", "green"]
    assert kwargs["scale"] == (0.25, 0.25) and kwargs["units"] == ("micrometer", "micrometer")


@pytest.mark.gui
def test_reader_opens_files_as_multiscale_layers(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    data = rgb_image(600, 500)
    write_pyramidal_ome_tiff(tmp_path / "s.ome.tif", data, levels=3, tile=128)
    layers = viewer.open(str(tmp_path / "s.ome.tif"), plugin="napari-xt")
    (layer,) = layers
    assert layer.multiscale and layer.rgb and len(layer.data) == 3
    np.testing.assert_array_equal(np.asarray(layer.data[0][:64, :64]), data[:64, :64])
    assert tuple(layer.scale) == (0.5, 0.5)
    # converted RGB OME-Zarr (CYX with red/green/blue channels) comes back as one RGB layer
    convert(data, tmp_path / "s.zarr", chunk=256, min_size=256)
    (zlayer,) = viewer.open(str(tmp_path / "s.zarr"), plugin="napari-xt")
    assert zlayer.rgb and zlayer.multiscale and zlayer.data[0].shape == (600, 500, 3)
    # a two-channel uint16 store becomes two layers
    two = np.random.default_rng(0).integers(0, 999, (2, 300, 200), dtype=np.uint16)
    write_ngff(tmp_path / "two.zarr", [two, two[:, ::2, ::2]], "cyx", version="0.4")
    new = viewer.open(str(tmp_path / "two.zarr"), plugin="napari-xt")
    assert len(new) == 2 and all(lyr.multiscale for lyr in new)
    np.testing.assert_array_equal(np.asarray(new[1].data[0]), two[1])
    viewer.reset_view()
    assert len(viewer.layers) == 4


@pytest.mark.gui
def test_results_open_as_labels_and_points_and_writers_round_trip(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    image = np.random.default_rng(1).integers(0, 255, (400, 300), dtype=np.uint8)
    store = tmp_path / "r.zarr"
    convert(image, store, chunk=256, min_size=128)
    labels = np.zeros((400, 300), np.int32)
    labels[50:150, 60:200] = 2
    write_labels(store, "seg", labels, colors={2: (0, 1, 0)})
    write_detections(store, "dets", {"y": [10.0, 300.0], "x": [20.0, 250.0],
                                     "class": ["a", "b"], "score": [0.5, 0.8]})
    layers = viewer.open(str(store), plugin="napari-xt")
    kinds = {lyr.name: type(lyr).__name__ for lyr in layers}
    assert kinds == {"r": "Image", "seg": "Labels", "dets": "Points"}
    seg, dets = viewer.layers["seg"], viewer.layers["dets"]
    assert not seg.multiscale  # 400 x 300 is below the pyramid's 1024 px floor
    np.testing.assert_array_equal(np.asarray(seg.data), labels)
    np.testing.assert_allclose(np.ravel(seg.colormap.map(2))[:3], [0.0, 1.0, 0.0])
    np.testing.assert_allclose(dets.data, [[10.0, 20.0], [300.0, 250.0]])
    assert list(dets.features["class"]) == ["a", "b"]

    out = tmp_path / "saved.zarr"
    edited = viewer.add_labels(labels * 3, name="edited")
    edited.save(str(out), plugin="napari-xt")
    np.testing.assert_array_equal(read_labels(out, "edited").levels[0].compute(), labels * 3)
    pts = viewer.add_points([[1.0, 2.0], [3.0, 4.0]], name="picked",
                            features={"score": [0.1, 0.9], "class": ["x", "y"]})
    pts.save(str(out), plugin="napari-xt")
    table = read_detections(out, "picked")
    np.testing.assert_allclose(np.stack([table["y"], table["x"]], 1), [[1, 2], [3, 4]])
    np.testing.assert_allclose(table["score"], [0.1, 0.9])
    assert list(table["class"]) == ["x", "y"]


@pytest.mark.gui
def test_sample_data_opens_lazily(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-xt", "slide")
    (slide,) = layers
    assert slide.multiscale and slide.rgb and slide.data[0].shape == (32768, 32768, 3)
    sar = viewer.open_sample("napari-xt", "sar")
    from napari_xt._napari_io import SAMPLE_SAR_SIZE

    assert [lyr.name for lyr in sar] == ["synthetic SAR VV", "synthetic SAR VH",
                                         "synthetic SAR truth", "synthetic SAR truth vessels"]
    side = (SAMPLE_SAR_SIZE, SAMPLE_SAR_SIZE)
    assert sar[0].data[0].shape == side and sar[0].contrast_limits == [-25.0, 5.0]


def test_a_store_whose_image_is_damaged_is_an_error_not_a_missing_layer(tmp_path):
    import shutil

    from napari_xt._napari_io import store_layers
    from napari_xt.engine import run
    from napari_xt.io import ImageIOError
    from napari_xt.model.choice import load_model

    model, _, normalize = load_model("demo")
    image = np.random.default_rng(0).normal(-16, 6, (2, 128, 128)).astype(np.float32)
    store = tmp_path / "out.zarr"
    for _ in run(image, model, store, normalize=normalize, axes="CYX"):
        pass
    names = [kwargs["name"] for _, kwargs, _ in store_layers(store, "out")]
    assert "out (input preview)" in str(names[0]) and len(names) > 2
    shutil.rmtree(store / "0")  # the preview's level 0, declared by the root
    with pytest.raises(ImageIOError):
        store_layers(store, "out")
