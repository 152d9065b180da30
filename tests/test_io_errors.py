"""Bad input: one clear ImageIOError each, naming the path and what is wrong."""

from __future__ import annotations

import subprocess
import sys

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from _io_files import write_ngff

from napari_xt.io import (
    ImageIOError,
    check_finite,
    contrast_limits,
    convert,
    image_stats,
    open_image,
)


def test_error_type_is_a_value_error():
    assert issubclass(ImageIOError, ValueError)


def test_missing_path(tmp_path):
    with pytest.raises(ImageIOError, match=r"nothere\.tif: no such file or directory"):
        open_image(tmp_path / "nothere.tif")


def test_not_an_image(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageIOError, match="notes.txt: not a supported image"):
        open_image(tmp_path / "notes.txt")
    (tmp_path / "fake.tif").write_bytes(b"GIF89a" + bytes(100))
    with pytest.raises(ImageIOError, match=r"fake.tif: not a \.tif file"):
        open_image(tmp_path / "fake.tif")
    (tmp_path / "empty.svs").write_bytes(b"")
    with pytest.raises(ImageIOError, match="empty file"):
        open_image(tmp_path / "empty.svs")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ImageIOError, match="a directory but neither a zarr store"):
        open_image(tmp_path / "folder")
    (tmp_path / "trunc.tif").write_bytes(b"II*\x00" + b"\xff" * 4)
    with pytest.raises(ImageIOError, match="trunc.tif: TIFF holds no image series"):
        open_image(tmp_path / "trunc.tif")
    with pytest.raises(ImageIOError, match="cannot open an object of type dict"):
        open_image({"a": 1})


def test_zarr_group_without_multiscales_lists_its_arrays(tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    group.create_array("raw", shape=(10, 10), dtype="u1")
    with pytest.raises(ImageIOError, match=r"without OME-NGFF 'multiscales'.*\['raw'\]"):
        open_image(tmp_path / "g.zarr")
    assert open_image(tmp_path / "g.zarr" / "raw").shape == (10, 10)


def test_corrupt_zarr_chunk_is_named(tmp_path, rng):
    data = rng.integers(0, 255, (128, 128), dtype=np.uint8)
    path = write_ngff(tmp_path / "c.zarr", [data], "yx", version="0.5", chunks=32)
    (path / "0" / "c" / "1" / "2").write_bytes(b"not zstd at all")
    image = open_image(path)  # opening reads metadata only
    np.testing.assert_array_equal(image.levels[0][:32, :].compute(), data[:32])
    with pytest.raises(ImageIOError, match=r"level 0 \('0'\): cannot read chunk \(1, 2\)"):
        image.levels[0][32:64, 64:96].compute()
    with pytest.raises(ImageIOError, match=r"chunk \(1, 2\)"):
        convert(path, tmp_path / "out.zarr", chunk=256)
    assert not (tmp_path / "out.zarr").exists()


def test_corrupt_tiff_tile_is_named(tmp_path, rng):
    data = rng.integers(0, 255, (256, 256), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "t.tif", data, tile=(64, 64), compression="zlib",
                     metadata=None)
    with tifffile.TiffFile(tmp_path / "t.tif") as tif:
        offset = tif.pages.first.dataoffsets[6]  # tile row 1, column 2
    raw = bytearray((tmp_path / "t.tif").read_bytes())
    raw[offset : offset + 16] = b"\x00" * 16
    (tmp_path / "t.tif").write_bytes(bytes(raw))
    image = open_image(tmp_path / "t.tif")
    with pytest.raises(ImageIOError, match=r"series 0 level 0: cannot read chunk \(1, 2\)"):
        image.levels[0][64:128, 128:192].compute()


def test_unsupported_axes(tmp_path, rng):
    with pytest.raises(ImageIOError, match=r"cannot tell the axes of an array of shape"):
        open_image(rng.random((3, 4, 20, 20)))
    with pytest.raises(ImageIOError, match=r"axes 'TYX'.*T=3.*plane=\{'t': 0\}"):
        open_image(rng.random((3, 20, 20)), axes="TYX")
    with pytest.raises(ImageIOError, match="have no Y and X"):
        open_image(rng.random((3, 20)), axes="CX")
    with pytest.raises(ImageIOError, match="plane names axis 'Z'"):
        open_image(rng.random((20, 20)), plane={"z": 0})
    tifffile.imwrite(tmp_path / "stack.tif", rng.integers(0, 9, (4, 30, 30), dtype=np.uint8),
                     photometric="minisblack", metadata={"axes": "ZYX"})
    with pytest.raises(ImageIOError, match=r"Z=4.*plane=\{'z': 0\}"):
        open_image(tmp_path / "stack.tif")
    assert open_image(tmp_path / "stack.tif", plane={"z": 2}).axes == "YX"


def test_zero_size(tmp_path):
    with pytest.raises(ImageIOError, match="zero size"):
        open_image(np.zeros((0, 10), np.uint8))
    np.save(tmp_path / "z.npy", np.zeros((10, 0), np.float32))
    with pytest.raises(ImageIOError, match="zero size"):
        open_image(tmp_path / "z.npy")
    zarr.create_array(str(tmp_path / "z.zarr"), shape=(0, 5), dtype="u1", chunks=(1, 5))
    with pytest.raises(ImageIOError, match="zero size"):
        open_image(tmp_path / "z.zarr")


@pytest.mark.parametrize("dtype, match", [(np.bool_, "boolean data is a mask"),
                                          (np.complex64, "complex data")])
def test_bool_and_complex_refused(tmp_path, dtype, match):
    arr = np.zeros((8, 8), dtype=dtype)
    with pytest.raises(ImageIOError, match=match):
        open_image(arr)
    np.save(tmp_path / "a.npy", arr)
    with pytest.raises(ImageIOError, match=match):
        open_image(tmp_path / "a.npy")
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=(8, 8), dtype=dtype, chunks=(4, 4))
    z[...] = arr
    with pytest.raises(ImageIOError, match=match):
        open_image(tmp_path / "a.zarr")
    with pytest.raises(ImageIOError, match=match):
        convert(arr, tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()


def test_nan_is_reported_not_zeroed(rng):
    data = rng.normal(size=(64, 64)).astype(np.float32)
    data[3, 4] = np.nan
    data[5, 6] = np.inf
    data[7, 8] = -np.inf
    image = open_image(da.from_array(data, chunks=16))
    stats = image_stats(image, 0)
    assert (stats.nan, stats.posinf, stats.neginf, stats.size) == (1, 1, 1, 4096)
    finite = data[np.isfinite(data)]
    assert stats.minimum == pytest.approx(finite.min())
    assert stats.maximum == pytest.approx(finite.max())
    with pytest.raises(ImageIOError, match=r"1 NaN, 1 \+inf, 1 -inf of 4096"):
        check_finite(image)
    got = image.levels[0].compute()
    assert np.isnan(got[3, 4]) and np.isposinf(got[5, 6]) and np.isneginf(got[7, 8])
    (lo, hi), = contrast_limits(image)
    assert (lo, hi) == pytest.approx((finite.min(), finite.max()))
    assert check_finite(open_image(np.ones((4, 4), np.float32))).all_finite
    all_nan = open_image(np.full((4, 4), np.nan, np.float32))
    assert image_stats(all_nan).minimum is None and contrast_limits(all_nan) == ((0.0, 1.0),)


def test_io_package_never_imports_qt_or_napari():
    code = ("import sys, napari_xt.io, napari_xt.sample_data; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('napari', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'qtpy', 'vispy')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
