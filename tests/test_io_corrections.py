"""Corrections of a label result: a copy beside the prediction, edited window by window."""

import json

import numpy as np
import pytest

from napari_xt.io import (
    Box,
    ImageIOError,
    read_detections,
    read_labels,
    write_detections,
    write_labels,
)
from napari_xt.io.corrections import (
    corrected_name,
    corrections_in,
    edits,
    open_correction,
    read_corrected_detections,
    read_window,
    save_detections,
    save_window,
)
from napari_xt.io.pyramid import downsample_block

COLORS = {0: (0, 0, 0, 0), 1: (0, 0, 255, 255), 2: (255, 255, 0, 255)}


def _prediction(tmp_path, rng, shape=(300, 260), fmt=3):
    import zarr

    store = tmp_path / "result.zarr"
    if fmt == 2:  # an existing zarr v2 store: results follow its format (NGFF 0.4)
        zarr.open_group(str(store), mode="w", zarr_format=2)
    labels = rng.integers(0, 3, size=shape).astype(np.uint8)
    write_labels(store, "prediction", labels, colors=COLORS, chunk=64, min_size=64,
                 properties={k: {"class": k} for k in range(3)})
    return store, labels


@pytest.mark.parametrize("fmt", [3, 2])
def test_save_window_edits_the_copy_and_its_pyramid_not_the_prediction(tmp_path, rng, fmt):
    store, labels = _prediction(tmp_path, rng, fmt=fmt)
    before = [np.asarray(level) for level in read_labels(store, "prediction").levels]
    assert len(before) == 4  # 300x260 -> 150x130 -> 75x65 -> 37x32

    window = np.full((70, 90), 2, np.uint8)
    window[10:20, 10:20] = 1
    box = (101, 35, 171, 125)  # (y0, x0, y1, x1), odd corners: pyramid boxes round outwards
    edit = save_window(store, "prediction", box, window)

    corrected = [np.asarray(level) for level in read_labels(store, "prediction-corrected").levels]
    expected = labels.copy()
    expected[101:171, 35:125] = window
    assert np.array_equal(corrected[0], expected)
    for i in range(1, len(corrected)):  # every level equals a fresh mode pyramid of level 0
        assert np.array_equal(corrected[i], downsample_block(corrected[i - 1], 0, 1, 2, "mode"))
    for old, now in zip(before, read_labels(store, "prediction").levels):
        assert np.array_equal(old, np.asarray(now))  # the prediction is untouched

    assert edit.box == box and isinstance(edit.box, Box) and edit.box.shape == (70, 90)
    assert edit.changed == int(np.count_nonzero(labels[101:171, 35:125] != window))
    assert edit.after == {1: 100, 2: 6200}
    assert sum(edit.before.values()) == 70 * 90
    assert edits(store, "prediction") == [edit]
    lab = read_labels(store, "prediction-corrected")
    assert lab.colors == read_labels(store, "prediction").colors
    assert lab.properties == {k: {"class": k} for k in range(3)}
    assert corrections_in(store) == ["labels/prediction-corrected"]


def test_windows_accumulate_and_reads_come_from_the_correction(tmp_path, rng):
    store, labels = _prediction(tmp_path, rng)
    assert np.array_equal(read_window(store, "prediction", (0, 0, 50, 50)), labels[:50, :50])
    save_window(store, "prediction", (0, 0, 50, 50), np.zeros((50, 50), np.uint8))
    second = save_window(store, "prediction", (40, 40, 60, 60), np.ones((20, 20), np.uint8))
    # the second edit saw the first one's zeros in its overlap
    assert second.before[0] >= 100
    window = read_window(store, "prediction", (0, 0, 60, 60))
    assert (window[:40, :50] == 0).all() and (window[40:60, 40:60] == 1).all()
    assert np.array_equal(read_window(store, "prediction", (0, 0, 60, 60), corrected=False),
                          labels[:60, :60])
    assert [e.box for e in edits(store, "prediction")] == [(0, 0, 50, 50), (40, 40, 60, 60)]


def test_bad_windows_are_refused_before_anything_is_written(tmp_path, rng):
    store, labels = _prediction(tmp_path, rng)
    with pytest.raises(ImageIOError, match="not classes"):
        save_window(store, "prediction", (0, 0, 10, 10), np.full((10, 10), 7, np.uint8))
    with pytest.raises(ImageIOError, match="shape"):
        save_window(store, "prediction", (0, 0, 10, 10), np.zeros((10, 11), np.uint8))
    with pytest.raises(ImageIOError, match="outside"):
        save_window(store, "prediction", (290, 0, 310, 10), np.zeros((20, 10), np.uint8))
    with pytest.raises(ImageIOError, match="integers"):
        save_window(store, "prediction", (0, 0, 10, 10), np.zeros((10, 10), np.float32))
    with pytest.raises(ImageIOError, match="no label result 'other'"):
        open_correction(store, "other")
    assert edits(store, "prediction") == []
    corrected = np.asarray(read_labels(store, corrected_name("prediction")).levels[0])
    assert np.array_equal(corrected, labels)  # the copy exists but holds the prediction


def test_detections_correction_keeps_the_prediction_table(tmp_path, rng):
    store, _ = _prediction(tmp_path, rng)
    table = {"y": np.array([5.0, 20.0]), "x": np.array([7.0, 9.0]), "class": np.array([1, 1]),
             "score": np.array([0.9, 0.4], np.float32), "size": np.array([3.0, 4.0], np.float32)}
    write_detections(store, "prediction", table)
    assert np.array_equal(read_corrected_detections(store, "prediction")["y"], table["y"])
    fixed = {k: v[:1] for k, v in table.items()}
    fixed = {k: np.append(v, w) for (k, v), w in zip(fixed.items(), (50.0, 60.0, 1, 1.0, 5.0))}
    save_detections(store, "prediction", fixed)
    save_detections(store, "prediction", fixed)  # saving again replaces the correction
    assert np.array_equal(read_detections(store, "prediction")["y"], table["y"])
    assert np.array_equal(read_corrected_detections(store, "prediction")["y"], [5.0, 50.0])
    assert "tables/prediction-corrected" in corrections_in(store)
    with pytest.raises(ImageIOError, match="no detection table"):
        save_detections(store, "other", fixed)


def test_box_fields_and_conversions():
    box = Box.of([1, 2, 5, 9])  # (y0, x0, y1, x1)
    assert box == Box(y0=1, x0=2, y1=5, x1=9) == (1, 2, 5, 9) and Box.of(box) is box
    assert (box.height, box.width, box.shape) == (4, 7, (4, 7))
    a = np.arange(3 * 10 * 10).reshape(3, 10, 10)
    assert np.array_equal(a[..., box.slices[0], box.slices[1]], a[:, 1:5, 2:9])
    assert np.array_equal(a[0][box.slices], a[0, 1:5, 2:9])
    assert Box.of(np.array([1, 2, 5, 9])) == box and type(Box.of((1, 2, 5, 9)).y1) is int


def test_a_window_that_is_not_square_reads_and_saves_rows_then_columns(tmp_path, rng):
    store, labels = _prediction(tmp_path, rng)
    box = Box(10, 200, 30, 250)  # rows 10:30, columns 200:250 of the 300 x 260 labels
    assert np.array_equal(read_window(store, "prediction", box), labels[10:30, 200:250])
    edit = save_window(store, "prediction", box, np.ones((20, 50), np.uint8))
    assert edit.box == box
    corrected = np.asarray(read_labels(store, "prediction-corrected").levels[0])
    assert (corrected[10:30, 200:250] == 1).all()
    with pytest.raises(ImageIOError, match="outside"):  # columns 250:290 pass 260
        read_window(store, "prediction", (10, 250, 30, 290))


def test_the_edit_log_keeps_its_y0_y1_x0_x1_order_on_disk(tmp_path, rng):
    """Stores written before `Box` hold the log's boxes as [y0, y1, x0, x1]: both the
    log written now and one written by hand in that order read back as the same Box."""
    store, _ = _prediction(tmp_path, rng)
    save_window(store, "prediction", Box(101, 35, 171, 125), np.ones((70, 90), np.uint8))
    meta = tmp_path / "result.zarr" / "labels" / "prediction-corrected" / "zarr.json"
    doc = json.loads(meta.read_text())
    log = doc["attributes"]["napari-xt"]["corrections"]["edits"]
    assert log[0]["box"] == [101, 171, 35, 125]  # (y0, y1, x0, x1), as stores always had
    log.append({"box": [0, 20, 40, 100], "time": "2024-01-01T00:00:00+0000", "changed": 3,
                "before": {"0": 1200}, "after": {"1": 1200}})  # an older store's entry
    meta.write_text(json.dumps(doc))
    assert [e.box for e in edits(store, "prediction")] == [Box(101, 35, 171, 125),
                                                           Box(0, 40, 20, 100)]
    old = edits(store, "prediction")[1]
    assert (old.box.shape, old.changed, old.before, old.after) == ((20, 60), 3, {0: 1200},
                                                                   {1: 1200})
