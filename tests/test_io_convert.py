"""Pyramids and conversion to OME-Zarr 0.5: values, layout, metadata, progress, atomicity."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
from _io_files import rgb_image, write_ngff, write_pyramidal_ome_tiff

from napari_xt.io import (
    ImageIOError,
    ProgressEvent,
    build_pyramid,
    convert,
    iter_convert,
    open_image,
    pyramid_shapes,
)


def test_pyramid_shapes_stop_at_min_size():
    assert pyramid_shapes(5000, 3000, min_size=1024) == [(5000, 3000), (2500, 1500),
                                                         (1250, 750), (625, 375)]
    assert pyramid_shapes(800, 600) == [(800, 600)]


def test_build_pyramid_mean_nearest_mode(rng):
    img = rng.integers(0, 255, (9, 11, 3), dtype=np.uint8)
    levels = build_pyramid(img, "YXC", min_size=2)
    assert [lv.shape for lv in levels] == [(9, 11, 3), (4, 5, 3), (2, 2, 3)]
    want = img[:8, :10].reshape(4, 2, 5, 2, 3).astype(float).mean(axis=(1, 3))
    np.testing.assert_array_equal(levels[1].compute(), np.rint(want).astype(np.uint8))
    near = build_pyramid(img, "YXC", min_size=5, method="nearest")
    np.testing.assert_array_equal(near[1].compute(), img[:8:2, :10:2])
    labels = np.array([[1, 1, 2, 0], [1, 3, 0, 0], [5, 6, 7, 7], [8, 5, 7, 9]], dtype=np.int32)
    mode = build_pyramid(labels, "YX", min_size=1, method="mode")
    np.testing.assert_array_equal(mode[1].compute(), [[1, 0], [5, 7]])
    cyx = build_pyramid(da.from_array(rng.random((2, 64, 64)), chunks=(1, 17, 17)), "CYX",
                        min_size=16)
    assert [lv.shape for lv in cyx] == [(2, 64, 64), (2, 32, 32), (2, 16, 16)]
    np.testing.assert_allclose(
        cyx[2].compute(), cyx[0].compute().reshape(2, 16, 4, 16, 4).mean(axis=(2, 4)))
    with pytest.raises(ImageIOError, match="unknown downsampling method"):
        build_pyramid(img, "YXC", method="median")


def test_convert_rgb_array_values_layout_and_progress(tmp_path):
    data = rgb_image(2600, 2100, seed=1)
    events: list[ProgressEvent] = []
    out = convert(data, tmp_path / "out.ome.zarr", chunk=512, min_size=700,
                  progress=events.append)
    assert out.axes == "CYX" and out.channel_names == ("R", "G", "B")
    assert [out.level_shape(i) for i in range(out.num_levels)] == [(2600, 2100), (1300, 1050),
                                                                   (650, 525)]
    np.testing.assert_array_equal(out.to_yxc(0).compute(), data)
    want1 = np.rint(data.reshape(1300, 2, 1050, 2, 3).astype(float).mean(axis=(1, 3)))
    np.testing.assert_array_equal(out.to_yxc(1).compute(), want1.astype(np.uint8))
    meta = json.loads((tmp_path / "out.ome.zarr" / "0" / "zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [3, 512, 512]
    assert "zstd" in [c["name"] for c in meta["codecs"]]
    assert meta["dimension_names"] == ["c", "y", "x"]
    root = json.loads((tmp_path / "out.ome.zarr" / "zarr.json").read_text())["attributes"]
    assert root["ome"]["version"] == "0.5"
    assert [a["name"] for a in root["ome"]["multiscales"][0]["axes"]] == ["c", "y", "x"]
    assert [c["color"] for c in root["ome"]["omero"]["channels"]] == ["FF0000", "00FF00",
                                                                       "0000FF"]
    total = 6 * 5 + 3 * 3 + 2 * 2
    assert events[0].done == 0 and events[-1].done == total
    assert all(e.total == total for e in events)
    assert [e.done for e in events] == sorted(e.done for e in events)
    assert {e.level for e in events} == {0, 1, 2}


def test_convert_ome_tiff_keeps_pixel_size_and_is_reopened(tmp_path):
    data = rgb_image(700, 600, seed=2)
    write_pyramidal_ome_tiff(tmp_path / "in.ome.tif", data, levels=2, tile=128)
    out = convert(tmp_path / "in.ome.tif", tmp_path / "out.zarr", min_size=256)
    assert out.pixel_size == (0.5, 0.5) and out.unit == "micrometer"
    assert out.level_pixel_size(1) == (1.0, 1.0)
    np.testing.assert_array_equal(out.to_yxc(0).compute(), data)


def test_convert_float_keeps_nan_and_windows_from_smallest_level(tmp_path, rng):
    data = rng.normal(size=(1500, 1300)).astype(np.float32)
    data[10, 10] = np.nan
    out = convert(data, tmp_path / "f.zarr", chunk=512, min_size=512)
    got = out.levels[0].compute()
    assert np.isnan(got[10, 10])
    np.testing.assert_array_equal(np.nan_to_num(got), np.nan_to_num(data))
    lo, hi = out.contrast_limits[0]
    smallest = out.levels[-1].compute()
    assert lo == pytest.approx(np.nanmin(smallest)) and hi == pytest.approx(np.nanmax(smallest))


def test_convert_from_ngff_04_multichannel(tmp_path, rng):
    data = rng.integers(0, 4000, (2, 300, 280), dtype=np.uint16)
    write_ngff(tmp_path / "in.zarr", [data], "cyx", version="0.4", omero={"channels": [
        {"label": "a", "color": "FF00FF"}, {"label": "b", "color": "00FFFF"}]})
    out = convert(tmp_path / "in.zarr", tmp_path / "out.zarr", chunk=256)
    assert out.channel_names == ("a", "b") and out.channel_colors == ("FF00FF", "00FFFF")
    np.testing.assert_array_equal(out.levels[0].compute(), data)


def test_convert_refuses_existing_destination_and_overwrites_on_request(tmp_path, rng):
    a = rng.integers(0, 255, (300, 300), dtype=np.uint8)
    convert(a, tmp_path / "o.zarr", chunk=256)
    with pytest.raises(ImageIOError, match="already exists; pass overwrite=True"):
        convert(a + 1, tmp_path / "o.zarr", chunk=256)
    np.testing.assert_array_equal(open_image(tmp_path / "o.zarr").levels[0].compute(), a)
    convert(a + 1, tmp_path / "o.zarr", chunk=256, overwrite=True)
    np.testing.assert_array_equal(open_image(tmp_path / "o.zarr").levels[0].compute(), a + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.zarr"]


def test_failed_conversion_leaves_nothing(tmp_path):
    def explode(block, block_info=None):
        if block_info[0]["chunk-location"] == (1, 1):
            raise OSError("disk read failed")
        return block

    src = da.zeros((700, 700), dtype=np.uint8, chunks=256).map_blocks(explode, dtype=np.uint8)
    gen = iter_convert(src, tmp_path / "bad.zarr", chunk=256, workers=2)
    with pytest.raises(OSError, match="disk read failed"):
        for _ in gen:
            pass
    assert list(tmp_path.iterdir()) == []


def test_convert_rejects_bad_chunk_size(tmp_path, rng):
    with pytest.raises(ImageIOError, match="chunk must be between"):
        convert(rng.random((10, 10)), tmp_path / "x.zarr", chunk=16)
    assert not (tmp_path / "x.zarr").exists()


def test_the_2x2_mode_is_the_first_most_frequent_of_every_combination():
    # Every combination of four samples over four values: the most frequent, ties to the
    # first in (top-left, top-right, bottom-left, bottom-right) order.
    import itertools

    from napari_xt.io.pyramid import downsample_block

    combos = np.array(list(itertools.product(range(4), repeat=4)), np.uint8)  # (256, 4)
    block = np.zeros((2, 2 * len(combos)), np.uint8)  # one 2 x 2 block per combination
    block[0, 0::2], block[0, 1::2], block[1, 0::2], block[1, 1::2] = combos.T
    got = downsample_block(block, 0, 1, 2, "mode")[0]
    want = [max(c.tolist(), key=lambda v, c=c: (c.tolist().count(v), -c.tolist().index(v)))
            for c in combos]
    np.testing.assert_array_equal(got, want)
