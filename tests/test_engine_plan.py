"""Region plan: crop placement, coverage of boundaries, blending windows, visiting orders."""

import numpy as np
import pytest

from napari_xt.engine.plan import RegionPlan, ViewportOrder, window_1d
from napari_xt.io import Box


def test_grid_padding_and_boxes():
    plan = RegionPlan(300, 260, 128, crop_regions=2)
    assert plan.grid == (3, 3)
    assert plan.box(2, 2) == (256, 256, 300, 260)
    assert plan.box(0, 1) == (0, 128, 128, 256)
    corner = plan.box(2, 2)  # a Box: (y0, x0, y1, x1) with names
    assert isinstance(corner, Box) and (corner.x0, corner.y1) == (256, 300)
    assert corner.shape == (44, 4)


@pytest.mark.parametrize("k,stride", [(2, None), (4, None), (4, 1), (3, 2)])
def test_every_interior_boundary_is_inside_a_crop(k, stride):
    plan = RegionPlan(64 * 11, 64 * 7, 64, crop_regions=k, stride=stride)
    for c in range(plan.cols - 1):  # boundary between columns c and c + 1
        assert any(cr.col0 <= c and c + 1 < cr.col0 + cr.cols for cr in plan.crops), c
    for r in range(plan.rows - 1):
        assert any(cr.row0 <= r and r + 1 < cr.row0 + cr.rows for cr in plan.crops), r
    assert (plan.coverage >= 1).all()
    assert all(cr.rows == k and cr.cols == k for cr in plan.crops)
    assert max(cr.row0 + cr.rows for cr in plan.crops) == plan.rows


def test_default_stride_bounds_decodes_per_region():
    plan = RegionPlan(128 * 20, 128 * 20, 128, crop_regions=4)
    assert plan.stride == 2
    assert plan.coverage.max() <= 4
    dense = RegionPlan(128 * 20, 128 * 20, 128, crop_regions=4, stride=1)
    assert dense.coverage.max() == 16


def test_image_smaller_than_crop_is_one_crop():
    plan = RegionPlan(100, 300, 128, crop_regions=4)
    assert plan.grid == (1, 3)
    assert len(plan.crops) == 1
    crop = plan.crops[0]
    assert (crop.rows, crop.cols) == (1, 3)


def test_window_peaks_at_centre_and_stays_flat_on_image_borders():
    w = window_1d(256)
    assert w.min() > 0 and w[0] < 1e-3 + 1e-4
    assert np.argmax(w) in (127, 128)
    assert np.allclose(w, w[::-1])
    flat = window_1d(256, flat_start=True)
    assert (flat[:128] == 1).all() and np.allclose(flat[128:], w[128:])
    plan = RegionPlan(512, 512, 128, crop_regions=2, stride=1)
    inner = plan.crops[plan.crop_grid[1] + 1]  # starts at region (1, 1): no image border
    assert plan.region_window(inner, 1, 1)[0, 0] < 1e-3 + 1e-4
    assert plan.region_window(inner, 1, 1)[-1, -1] > 0.99
    corner = plan.crops[0]  # touches the top and left image borders
    assert plan.region_window(corner, 0, 0)[0, 0] == 1.0


def test_blended_weights_cover_every_pixel():
    plan = RegionPlan(5 * 64, 7 * 64, 64, crop_regions=3, stride=1)
    total = np.zeros((plan.rows * 64, plan.cols * 64))
    for crop in plan.crops:
        for r, c in crop.regions():
            total[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64] += plan.region_window(crop, r, c)
    assert total.min() > 0.5  # every pixel is near the middle of some crop or on its border


def test_strip_orders_visit_every_crop_once():
    plan = RegionPlan(64 * 10, 64 * 40, 64, crop_regions=2, stride=1, strip_width=8)
    for kind in ("raster", "zigzag", "viewport"):
        order = plan.order(kind)
        assert sorted(order) == list(range(len(plan.crops)))
    raster = plan.order("raster")
    # the first strip holds crop columns 0..7 for every crop row before anything else
    n_rows, n_cols = plan.crop_grid
    first = raster[: n_rows * 8]
    assert {i % n_cols for i in first} == set(range(8))
    zig = plan.order("zigzag")
    assert [i % n_cols for i in zig[8:16]] == list(range(7, -1, -1))


def test_viewport_order_reprioritises():
    plan = RegionPlan(64 * 10, 64 * 10, 64, crop_regions=2, stride=1)
    points = iter([None, None, (600.0, 600.0)])
    order = ViewportOrder(plan, range(len(plan.crops)), (0.0, 0.0),
                          lambda: next(points, (600.0, 600.0)))
    a, b, c = next(order), next(order), next(order)
    assert plan.crops[a].row0 == 0 and plan.crops[a].col0 == 0
    assert plan.crops[b].row0 + plan.crops[b].col0 <= 1
    assert plan.crops[c].row0 == plan.crop_grid[0] - 1
    rest = list(order)
    assert sorted([a, b, c, *rest]) == list(range(len(plan.crops)))


def test_bad_stride_rejected():
    with pytest.raises(ValueError, match="stride"):
        RegionPlan(512, 512, 128, crop_regions=2, stride=3)


def test_a_regions_position_is_its_place_in_the_first_crop_covering_it():
    # the engine gives the model crop-relative positions; baselines use the same
    plan = RegionPlan(16 * 64, 16 * 64, 64, 8)  # crops start at 0, 4, 8 (stride 4)
    assert plan.position_in_crop(10, 13) == (6, 5)  # crop (4, 8)
    assert plan.position_in_crop(2, 3) == (2, 3)
    assert RegionPlan(16 * 64, 16 * 64, 64, 8, 8).position_in_crop(10, 13) == (2, 5)


def test_feature_slab_never_gives_two_regions_of_one_batch_the_same_slot():
    import torch

    from napari_xt.engine.pipeline import FeatureSlab

    slab = FeatureSlab(2)
    feats = lambda *v: [torch.tensor(v, dtype=torch.float32).reshape(-1, 1, 1, 1)]  # noqa: E731
    slab.put([(0, 0), (0, 1)], feats(1.0, 2.0))
    slab.pinned = {(0, 0)}  # the crop being assembled
    slab.put([(1, 0), (1, 1)], feats(3.0, 4.0))  # (1, 0) may take (0, 1)'s slot, not (1, 1)
    assert (1, 0) in slab and (1, 1) in slab and (0, 0) in slab
    (got,) = slab.stack([(0, 0), (1, 0), (1, 1)])
    assert got.flatten().tolist() == [1.0, 3.0, 4.0]
