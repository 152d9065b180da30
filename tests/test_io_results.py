"""Results store: labels with a display pyramid, detection tables, classification records;
atomic writes, no silent overwrite, NGFF 0.4 and 0.5 layouts."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
from _io_files import write_ngff

from napari_xt.io import (
    ImageIOError,
    convert,
    list_results,
    open_image,
    read_classification,
    read_detections,
    read_labels,
    write_classification,
    write_detections,
    write_labels,
)


@pytest.fixture
def store(tmp_path, rng):
    image = rng.integers(0, 255, (1300, 1100), dtype=np.uint8)
    convert(image, tmp_path / "img.zarr", chunk=512, min_size=512)
    return tmp_path / "img.zarr"


def make_labels(shape=(1300, 1100)):
    labels = np.zeros(shape, dtype=np.int32)
    labels[100:400, 200:900] = 3
    labels[1000:1010, 50:53] = 7  # a thin object: survives level 1, may vanish later
    labels[600:1200, 600:1000] = 12
    return labels


def test_labels_round_trip_with_mode_pyramid_and_metadata(store):
    labels = make_labels()
    path = write_labels(store, "cells", labels, colors={3: (1.0, 0.0, 0.0), 12: (0, 0, 255, 128)},
                        properties={3: {"class": "tumour", "area": np.int64(210000)}},
                        chunk=512, min_size=400)
    assert path == store / "labels" / "cells"
    result = read_labels(store, "cells")
    np.testing.assert_array_equal(result.levels[0].compute(), labels)
    assert [lv.shape for lv in result.levels] == [(1300, 1100), (650, 550), (325, 275)]
    for level in result.levels[1:]:
        assert set(np.unique(level.compute())) <= {0, 3, 7, 12}  # mode never invents values
    np.testing.assert_array_equal(result.levels[1].compute()[50:200, 100:450], 3)
    assert result.colors == {3: (255, 0, 0, 255), 12: (0, 0, 255, 128)}
    assert result.properties == {3: {"class": "tumour", "area": 210000}}
    assert result.source == {"image": "../../"}
    attrs = json.loads((store / "labels" / "zarr.json").read_text())["attributes"]
    assert attrs["ome"]["labels"] == ["cells"]
    meta = json.loads((path / "zarr.json").read_text())["attributes"]["ome"]
    assert meta["version"] == "0.5" and "image-label" in meta
    # the image still opens as before, the label group does not disturb it
    assert open_image(store).shape == (1300, 1100)


def test_labels_in_ngff_04_store_use_zarr_v2(tmp_path, rng):
    img = rng.integers(0, 255, (2, 200, 150), dtype=np.uint8)
    store = write_ngff(tmp_path / "v2.zarr", [img], "cyx", version="0.4", pixel_size=0.7)
    labels = np.arange(200 * 150, dtype=np.uint16).reshape(200, 150) % 5
    path = write_labels(store, "seg", labels)
    assert (path / ".zattrs").is_file() and not (path / "zarr.json").exists()
    attrs = json.loads((path / ".zattrs").read_text())
    assert attrs["image-label"]["version"] == "0.4"
    assert attrs["multiscales"][0]["version"] == "0.4"
    result = read_labels(store, "seg")
    np.testing.assert_array_equal(result.levels[0].compute(), labels)
    assert result.pixel_size == (0.7, 0.7) and result.unit == "micrometer"
    assert json.loads((store / "labels" / ".zattrs").read_text())["labels"] == ["seg"]


def test_labels_never_overwrite_without_permission(store):
    write_labels(store, "cells", make_labels())
    with pytest.raises(ImageIOError, match="'cells' already exists; pass overwrite=True"):
        write_labels(store, "cells", np.ones((1300, 1100), np.int32))
    np.testing.assert_array_equal(read_labels(store, "cells").levels[0].compute(), make_labels())
    write_labels(store, "cells", np.ones((1300, 1100), np.int32), overwrite=True)
    assert (read_labels(store, "cells").levels[0].compute() == 1).all()
    assert sorted(p.name for p in (store / "labels").iterdir()) == ["cells", "zarr.json"]


def test_failed_label_write_leaves_no_trace(store):
    def explode(block, block_info=None):
        if block_info[0]["chunk-location"] == (2, 1):
            raise RuntimeError("model crashed")
        return block

    bad = da.zeros((1300, 1100), dtype=np.int32, chunks=512).map_blocks(explode, dtype=np.int32)
    with pytest.raises(RuntimeError, match="model crashed"):
        write_labels(store, "cells", bad, chunk=512)
    assert list_results(store)["labels"] == []
    assert sorted(p.name for p in store.iterdir()) == ["0", "1", "2", "zarr.json"]
    write_labels(store, "cells", make_labels(), chunk=512)
    with pytest.raises(RuntimeError, match="model crashed"):
        write_labels(store, "cells", bad, chunk=512, overwrite=True)
    np.testing.assert_array_equal(read_labels(store, "cells").levels[0].compute(), make_labels())
    assert sorted(p.name for p in (store / "labels").iterdir()) == ["cells", "zarr.json"]


def test_label_input_checks(store):
    with pytest.raises(ImageIOError, match=r"do not match the image \(1300, 1100\)"):
        write_labels(store, "x", np.zeros((10, 10), np.int32))
    with pytest.raises(ImageIOError, match="labels must be integers"):
        write_labels(store, "x", np.zeros((1300, 1100), np.float32))
    with pytest.raises(ImageIOError, match="must be letters"):
        write_labels(store, "../escape", make_labels())
    mask = make_labels() > 0
    write_labels(store, "mask", mask)
    assert read_labels(store, "mask").levels[0].dtype == np.uint8


def test_detections_and_classification_round_trip(store):
    table = {
        "y": np.array([10.5, 20.0, 700.25]),
        "x": np.array([30.0, 40.0, 50.0]),
        "class": np.array(["ship", "wake", "ship"]),
        "score": np.array([0.9, 0.4, 0.75], dtype=np.float32),
        "size": np.array([12, 3, 40], dtype=np.int32),
    }
    write_detections(store, "ships", table, attrs={"model": "xt-tiny", "threshold": 0.3})
    got = read_detections(store, "ships")
    assert list(got) == ["y", "x", "class", "score", "size"]
    for key, values in table.items():
        np.testing.assert_array_equal(got[key], values)
    assert got["score"].dtype == np.float32
    attrs = json.loads((store / "tables" / "ships" / "zarr.json").read_text())["attributes"]
    assert attrs["napari-xt"]["model"] == "xt-tiny" and attrs["napari-xt"]["rows"] == 3
    write_detections(store, "none", {"y": np.zeros(0), "x": np.zeros(0)})
    assert len(read_detections(store, "none")["y"]) == 0
    record = {"class": "tumour", "scores": {"tumour": np.float32(0.875), "normal": 0.125}}
    write_classification(store, "slide", record)
    assert read_classification(store, "slide") == {"class": "tumour",
                                                   "scores": {"tumour": 0.875, "normal": 0.125}}
    with pytest.raises(ImageIOError, match="already exists"):
        write_classification(store, "slide", {"class": "normal"})
    assert list_results(store) == {"labels": [], "tables": ["none", "ships"],
                                   "classifications": ["slide"], "probabilities": []}


def test_detection_table_checks_and_parquet(store):
    with pytest.raises(ImageIOError, match="needs columns y and x"):
        write_detections(store, "d", {"y": [1.0]})
    with pytest.raises(ImageIOError, match="differ in length"):
        write_detections(store, "d", {"y": [1.0, 2.0], "x": [1.0]})
    with pytest.raises(ImageIOError, match="not JSON-compatible"):
        write_classification(store, "c", {"model": object()})
    assert list_results(store) == {"labels": [], "tables": [], "classifications": [],
                                   "probabilities": []}
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ImageIOError, match="needs pyarrow"):
            write_detections(store, "d", {"y": [1.0], "x": [2.0]}, parquet=True)
        assert not (store / "tables" / "d").exists()
    else:
        path = write_detections(store, "d", {"y": [1.0], "x": [2.0]}, parquet=True)
        assert (path / "table.parquet").is_file()


def test_results_create_a_new_store_atomically(tmp_path):
    store = tmp_path / "new.zarr"
    write_detections(store, "pts", {"y": [1.0], "x": [2.0], "score": [0.5]})
    assert json.loads((store / "zarr.json").read_text())["node_type"] == "group"
    np.testing.assert_array_equal(read_detections(store, "pts")["score"], [0.5])
    write_labels(store, "lab", np.eye(20, dtype=np.uint8))
    np.testing.assert_array_equal(read_labels(store, "lab").levels[0].compute(), np.eye(20))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.zarr"]
    with pytest.raises(ImageIOError, match="no label result 'other'"):
        read_labels(store, "other")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ImageIOError, match="not a zarr store"):
        write_detections(tmp_path / "plain", "x", {"y": [1.0], "x": [1.0]})


def test_a_classification_group_without_its_record_is_named(tmp_path):
    import zarr

    from napari_xt.io.errors import ImageIOError
    from napari_xt.io.results import read_classification

    zarr.open_group(str(tmp_path / "s.zarr" / "classifications" / "c"), mode="w",
                    zarr_format=3)
    with pytest.raises(ImageIOError, match="holds no napari-xt record"):
        read_classification(tmp_path / "s.zarr", "c")
