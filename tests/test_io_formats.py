"""Round trips per format: files written with zarr/tifffile, read back by open_image with the
same values, axes and physical metadata."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from _io_files import halve, rgb_image, write_ngff, write_pyramidal_ome_tiff, write_svs_like

from napari_xt.io import ImageIOError, MultiscaleImage, open_image


def test_ngff_04_zarr_v2_channels_scale_translation_omero(tmp_path, rng):
    data = rng.integers(0, 4000, (2, 200, 150), dtype=np.uint16)
    levels = [data, halve(data, "cyx"), halve(halve(data, "cyx"), "cyx")]
    omero = {"channels": [
        {"label": "DAPI", "color": "0000FF", "window": {"start": 10, "end": 3000, "min": 0,
                                                         "max": 4000}},
        {"label": "GFP", "color": "00FF00", "window": {"start": 20, "end": 2000, "min": 0,
                                                        "max": 4000}},
    ]}
    path = write_ngff(tmp_path / "img.zarr", levels, "cyx", version="0.4",
                      translation=(5.0, 7.0), omero=omero)
    assert (path / ".zattrs").is_file()
    image = open_image(path)
    assert image.axes == "CYX" and image.num_levels == 3
    for got, want in zip(image.levels, levels):
        np.testing.assert_array_equal(got.compute(), want)
    assert image.pixel_size == (0.25, 0.25) and image.unit == "micrometer"
    assert image.translation == (5.0, 7.0)
    assert image.channel_names == ("DAPI", "GFP")
    assert image.channel_colors == ("0000FF", "00FF00")
    assert image.contrast_limits == ((10.0, 3000.0), (20.0, 2000.0))
    assert image.levels[0].chunksize == (1, 64, 64)  # the zarr chunks, not a rechunk
    assert "0.4" in image.source
    np.testing.assert_array_equal(image.to_yxc(1).compute(), np.moveaxis(levels[1], 0, -1))


def test_ngff_05_zarr_v3_single_channel_float(tmp_path, rng):
    data = rng.normal(size=(130, 170)).astype(np.float32)
    path = write_ngff(tmp_path / "img.ome.zarr", [data, halve(data, "yx")], "yx", version="0.5",
                      pixel_size=10.0, unit="meter")
    assert (path / "zarr.json").is_file()
    image = open_image(path)
    assert image.axes == "YX" and image.dtype == np.float32
    np.testing.assert_array_equal(image.levels[0].compute(), data)
    np.testing.assert_array_equal(image.levels[1].compute(), halve(data, "yx"))
    assert image.pixel_size == (10.0, 10.0) and image.unit == "meter"
    assert "0.5" in image.source
    assert image.to_cyx(0).shape == (1, 130, 170)


def test_ngff_tczyx_plane_selection(tmp_path, rng):
    data = rng.integers(0, 255, (3, 2, 4, 40, 50), dtype=np.uint8)
    path = write_ngff(tmp_path / "t.zarr", [data], "tczyx", version="0.5")
    with pytest.raises(ImageIOError, match=r"TCZYX.*T=3.*Z=4.*plane="):
        open_image(path)
    image = open_image(path, plane={"t": 2, "z": 1})
    assert image.axes == "CYX"
    np.testing.assert_array_equal(image.levels[0].compute(), data[2, :, 1])
    single = open_image(path, plane={"t": 0, "z": 3, "c": 1})
    assert single.axes == "YX"
    np.testing.assert_array_equal(single.levels[0].compute(), data[0, 1, 3])
    with pytest.raises(ImageIOError, match="out of range"):
        open_image(path, plane={"t": 5, "z": 0})


def test_pyramidal_ome_tiff_with_subifds(tmp_path):
    data = rgb_image(600, 500)
    pyramid = write_pyramidal_ome_tiff(tmp_path / "slide.ome.tif", data, levels=3, tile=128)
    with tifffile.TiffFile(tmp_path / "slide.ome.tif") as tif:
        assert tif.is_ome and len(tif.pages.first.subifds) == 2
    image = open_image(tmp_path / "slide.ome.tif")
    assert image.axes == "YXC" and image.is_rgb and image.num_levels == 3
    for got, want in zip(image.levels, pyramid):
        np.testing.assert_array_equal(got.compute(), want)
    assert image.levels[0].chunksize == (128, 128, 3)  # dask chunks = TIFF tiles
    assert image.pixel_size == (0.5, 0.5) and image.unit == "micrometer"
    assert image.level_pixel_size(2) == (2.0, 2.0)
    assert "OME-TIFF" in image.source
    image.close()


def test_ome_tiff_multichannel_names(tmp_path, rng):
    data = rng.integers(0, 60000, (3, 90, 80), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "mc.ome.tiff", data, tile=(32, 32), metadata={
        "axes": "CYX", "Channel": {"Name": ["a", "b", "c"]},
        "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.3, "PhysicalSizeXUnit": "nm",
        "PhysicalSizeYUnit": "nm"})
    image = open_image(tmp_path / "mc.ome.tiff")
    assert image.axes == "CYX" and image.channel_names == ("a", "b", "c")
    assert image.pixel_size == (0.3, 0.2) and image.unit == "nanometer"
    np.testing.assert_array_equal(image.levels[0].compute(), data)
    np.testing.assert_array_equal(image.levels[0][:, 40:50, 30:70].compute(),
                                  data[:, 40:50, 30:70])


def test_svs_like_aperio_tiff(tmp_path):
    data = rgb_image(512, 384, seed=3)
    written = write_svs_like(tmp_path / "slide.svs", data, mpp=0.499)
    image = open_image(tmp_path / "slide.svs")
    assert image.source.startswith("SVS") and image.axes == "YXC"
    assert image.num_levels == 2
    for got, want in zip(image.levels, written):
        np.testing.assert_array_equal(got.compute(), want)
    assert image.pixel_size == (0.499, 0.499) and image.unit == "micrometer"
    assert image.levels[0].chunksize[:2] == (128, 128)
    label = open_image(tmp_path / "slide.svs", series=2)
    np.testing.assert_array_equal(label.levels[0].compute(), data[::16, ::16])
    with pytest.raises(ImageIOError, match="series 9 does not exist"):
        open_image(tmp_path / "slide.svs", series=9)


def test_tiled_tiff_resolution_in_centimetres(tmp_path, rng):
    data = rng.integers(0, 255, (300, 260), dtype=np.uint8)
    # 40000 pixels per cm = 0.25 um pixels (how NDPI files state their resolution)
    tifffile.imwrite(tmp_path / "plain.tif", data, tile=(64, 64), resolution=(40000, 40000),
                     resolutionunit="CENTIMETER", metadata=None)
    image = open_image(tmp_path / "plain.tif")
    assert image.axes == "YX" and image.levels[0].chunksize == (64, 64)
    assert image.pixel_size == pytest.approx((0.25, 0.25)) and image.unit == "micrometer"
    np.testing.assert_array_equal(image.levels[0].compute(), data)


@pytest.mark.parametrize("fmt", [2, 3])
def test_plain_zarr_arrays(tmp_path, rng, fmt):
    data = rng.integers(0, 255, (3, 70, 90), dtype=np.uint8)
    kwargs = {"dimension_names": ["band", "y", "x"]} if fmt == 3 else {}
    arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=data.shape, chunks=(1, 32, 32),
                            dtype=data.dtype, zarr_format=fmt, **kwargs)
    arr[...] = data
    if fmt == 2:
        arr.attrs["_ARRAY_DIMENSIONS"] = ["c", "y", "x"]
    image = open_image(tmp_path / "a.zarr")
    assert image.axes == "CYX" and image.levels[0].chunksize == (1, 32, 32)
    assert f"zarr v{fmt} array" in image.source
    np.testing.assert_array_equal(image.levels[0].compute(), data)


def test_npy_is_memory_mapped(tmp_path, rng):
    data = rng.random((300, 200, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", data)
    image = open_image(tmp_path / "a.npy")
    assert image.axes == "YXC" and not image.is_rgb
    graph = dict(image.levels[0].__dask_graph__())
    assert any(isinstance(v, np.memmap) for v in graph.values())
    np.testing.assert_array_equal(image.levels[0].compute(), data)


def test_numpy_dask_and_lists_of_levels(rng):
    a = rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)
    image = open_image(a)
    assert image.axes == "YXC" and image.is_rgb
    np.testing.assert_array_equal(image.to_cyx(0).compute(), np.moveaxis(a, -1, 0))
    d = da.from_array(rng.random((2, 30, 40)), chunks=(1, 16, 16))
    assert open_image(d).axes == "CYX"
    levels = open_image([a, a[::2, ::2]])
    assert levels.num_levels == 2 and levels.downsample(1) == (2.0, 2.0)
    yx = open_image(rng.random((20, 30)), axes="XY")
    assert yx.axes == "YX" and yx.shape == (30, 20)
    cube = rng.random((2, 5, 16, 16))
    assert open_image(cube, axes="ZCYX", plane={"z": 1}).axes == "CYX"
    assert open_image(image) is image


def test_level_option_starts_the_pyramid_lower(tmp_path):
    data = rgb_image(400, 320)
    write_pyramidal_ome_tiff(tmp_path / "p.ome.tif", data, levels=3, tile=64)
    image = open_image(tmp_path / "p.ome.tif", level=1)
    assert image.num_levels == 2 and image.shape == (200, 160, 3)
    assert image.pixel_size == (1.0, 1.0)
    np.testing.assert_array_equal(image.levels[0].compute(), data[::2, ::2])
    with pytest.raises(ImageIOError, match="level 3 does not exist"):
        open_image(tmp_path / "p.ome.tif", level=3)


def test_fsspec_urls_memory_and_file(tmp_path, rng):
    data = rng.integers(0, 255, (2, 50, 60), dtype=np.uint8)
    local = write_ngff(tmp_path / "remote.zarr", [data], "cyx", version="0.5")
    image = open_image("file://" + str(local))
    np.testing.assert_array_equal(image.levels[0].compute(), data)
    group = zarr.open_group("memory://xt-test/img.zarr", mode="w", zarr_format=3)
    arr = group.create_array("0", shape=(40, 30), chunks=(16, 16), dtype="u2")
    arr[...] = np.arange(1200, dtype=np.uint16).reshape(40, 30)
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [2.0, 3.0]}]}]}]}
    mem = open_image("memory://xt-test/img.zarr")
    assert mem.pixel_size == (2.0, 3.0) and mem.unit is None
    np.testing.assert_array_equal(mem.levels[0].compute(),
                                  np.arange(1200, dtype=np.uint16).reshape(40, 30))


def test_multiscale_image_validation():
    a = da.zeros((10, 10), dtype=np.uint8)
    with pytest.raises(ImageIOError, match="axes 'XYZ'"):
        MultiscaleImage([a], "XYZ", np.uint8)
    with pytest.raises(ImageIOError, match="dtype"):
        MultiscaleImage([a, a.astype(np.uint16)], "YX", np.uint8)
    with pytest.raises(ImageIOError, match="2 channel names for 1"):
        MultiscaleImage([a], "YX", np.uint8, channel_names=("a", "b"))
