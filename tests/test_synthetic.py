"""The synthetic SAR scene: deterministic per seed, lazy (windows agree with the whole scene),
and its classes mean what they say (sea touches the border, lakes do not; vessels on sea)."""

import time

import numpy as np
import pytest
from scipy import ndimage

from napari_xt.train.synthetic import LAKE, LAND, SEA, SceneConfig, SyntheticScene, make_scene


def test_same_seed_same_scene_other_seed_other_scene():
    a_img, a_mask, a_t = make_scene(7)
    b_img, b_mask, b_t = make_scene(7)
    c_img, c_mask, _ = make_scene(8)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    for key in a_t:
        np.testing.assert_array_equal(a_t[key], b_t[key])
    assert not np.array_equal(a_img, c_img)
    assert a_img.dtype == np.float32 and a_img.shape == (2, 256, 256)
    assert a_mask.dtype == np.uint8 and set(np.unique(a_mask)) <= {LAND, SEA, LAKE}


@pytest.mark.parametrize("window", [(0, 0, 64, 64), (37, 101, 160, 230), (200, 5, 256, 256)])
def test_windows_render_exactly_the_pixels_of_the_whole_scene(window):
    scene = SyntheticScene(3)
    image, mask = scene.read()
    y0, x0, y1, x1 = window
    part, part_mask = scene.read(y0, x0, y1, x1)
    np.testing.assert_array_equal(part, image[:, y0:y1, x0:x1])
    np.testing.assert_array_equal(part_mask, mask[y0:y1, x0:x1])


def test_large_scene_is_lazy_and_consistent_across_chunkings():
    cfg = SceneConfig(height=8192, width=8192)
    start = time.perf_counter()
    scene = SyntheticScene(11, cfg)
    a, _ = scene.read(4000, 4000, 4128, 4128)
    b, _ = scene.read(4064, 4064, 4192, 4192)
    elapsed = time.perf_counter() - start
    np.testing.assert_array_equal(a[:, 64:, 64:], b[:, :64, :64])
    assert elapsed < 20.0  # 64 M pixels are never rendered, only the layout and two windows


def test_sea_touches_the_border_and_lakes_are_enclosed():
    seen_sea = seen_lake = 0
    for seed in range(30):
        mask = SyntheticScene(seed).mask()
        water = mask != LAND
        labels, n = ndimage.label(water)
        border = np.zeros_like(water)
        border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
        for k in range(1, n + 1):
            body = labels == k
            classes = np.unique(mask[body])
            assert len(classes) == 1  # one body, one class
            assert (classes[0] == SEA) == bool((body & border).any())
            seen_sea += classes[0] == SEA
            seen_lake += classes[0] == LAKE
    assert seen_sea > 10 and seen_lake > 10


def test_water_bodies_span_more_than_one_region():
    cfg = SceneConfig()
    for seed in range(20):
        labels, n = ndimage.label(SyntheticScene(seed, cfg).mask() != LAND)
        sizes = np.bincount(labels.ravel())[1:]
        assert (sizes >= cfg.min_body_px).all()


def test_vessels_float_on_sea_and_look_like_the_other_targets():
    scene = SyntheticScene(5)
    image, mask = scene.read()
    t = scene.targets()
    cls_at = mask[t["y"].astype(int), t["x"].astype(int)]
    assert len(t["y"]) > 0
    np.testing.assert_array_equal(t["cls"] == 1, cls_at == SEA)
    peaks = image[0, t["y"].astype(int), t["x"].astype(int)]
    assert (peaks > -5).mean() > 0.8  # bright point targets, vessels or not


def test_targets_of_a_window_are_those_of_the_scene_inside_it():
    scene = SyntheticScene(9)
    whole = scene.targets()
    part = scene.targets(64, 32, 192, 160)
    inside = (whole["y"] >= 64) & (whole["y"] < 192) & (whole["x"] >= 32) & (whole["x"] < 160)
    np.testing.assert_array_equal(np.sort(part["y"]), np.sort(whole["y"][inside]))


def test_bad_windows_and_configs_are_rejected():
    scene = SyntheticScene(0)
    with pytest.raises(ValueError):
        scene.read(0, 0, 300, 10)
    with pytest.raises(ValueError):
        SceneConfig(channels=3)
