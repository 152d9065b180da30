"""Synthetic scenes: deterministic, chunking-independent, plausible values, any size."""

from __future__ import annotations

import numpy as np
import pytest

from napari_xt.sample_data import render_sar_chunk, sar_scene, slide_scene


@pytest.mark.slow
def test_slide_scene_is_deterministic_and_chunking_independent():
    a = slide_scene(5000, 4000, seed=7, chunk=512)
    b = slide_scene(5000, 4000, seed=7, chunk=1024)
    assert a.axes == "YXC" and a.is_rgb and a.pixel_size == (0.5, 0.5)
    assert [lv.shape[:2] for lv in a.levels] == [(5000, 4000), (2500, 2000), (1250, 1000),
                                                 (625, 500)]
    ra = a.levels[0][900:1700, 300:1400].compute()
    np.testing.assert_array_equal(ra, b.levels[0][900:1700, 300:1400].compute())
    np.testing.assert_array_equal(
        ra, slide_scene(5000, 4000, seed=7).levels[0][900:1700, 300:1400].compute())
    other = slide_scene(5000, 4000, seed=8).levels[0][900:1700, 300:1400].compute()
    assert not np.array_equal(ra, other)


def test_slide_scene_has_background_tissue_and_nuclei():
    small = slide_scene(20000, 20000, seed=0).levels[-1].compute().astype(int)
    background = (small.min(axis=-1) > 225).mean()
    tissue = (small[..., 1] < 200).mean()
    assert 0.2 < background < 0.9 and 0.1 < tissue < 0.8
    # at full resolution, inside tissue: dark purple nuclei (blue > red, low green)
    scene = slide_scene(20000, 20000, seed=0)
    ys, xs = np.nonzero(small[..., 1] < 170)
    f = 20000 / small.shape[0]
    y, x = int(ys[len(ys) // 2] * f), int(xs[len(xs) // 2] * f)
    block = scene.levels[0][y : y + 256, x : x + 256].compute().astype(int)
    nuclei = (block[..., 1] < 90) & (block[..., 2] > block[..., 0])
    assert 0.02 < nuclei.mean() < 0.6


def test_sar_scene_db_channels_land_and_water():
    scene = sar_scene(8192, 8192, seed=1)
    assert scene.axes == "CYX" and scene.dtype == np.float32
    assert scene.channel_names == ("VV", "VH") and scene.unit == "meter"
    small = scene.levels[-1].compute()
    assert np.isfinite(small).all()
    vv, vh = small
    assert np.median(vh) < np.median(vv)  # cross-pol is darker
    smooth = vv.reshape(64, 16, 64, 16).mean(axis=(1, 3))  # average out the speckle
    assert smooth.max() - smooth.min() > 6.0  # land and water differ by many dB
    np.testing.assert_array_equal(render_sar_chunk(1, 0, 100, 200, 16, 16),
                                  render_sar_chunk(1, 0, 100, 200, 16, 16))
    np.testing.assert_array_equal(render_sar_chunk(1, 0, 100, 200, 16, 16)[:, 4:8, 4:8],
                                  scene.levels[0][:, 104:108, 204:208].compute())
