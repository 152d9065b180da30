import numpy as np
import pytest
import torch

from napari_xt.model.tokenizer import (
    RegionGrid,
    TokenizerConfig,
    merge_regions,
    merge_subregions,
    split_regions,
    split_subregions,
    tokenize,
    untokenize,
)


@pytest.mark.parametrize("channels", [3, 2])
def test_odd_size_padding_and_mask(channels):
    x = torch.rand(2, channels, 1000, 777) + 0.5  # strictly positive so padding is visible
    regions, valid, grid = split_regions(x, 256)
    assert (grid.rows, grid.cols) == (4, 4)
    assert (grid.padded_height, grid.padded_width) == (1024, 1024)
    assert regions.shape == (2, 16, channels, 256, 256)
    assert valid.shape == (2, 16, 1, 256, 256) and valid.dtype == torch.bool
    # region (3, 3) is the bottom-right corner: 1000 - 768 = 232 rows, 777 - 768 = 9 cols real
    last = regions[:, grid.index(3, 3)]
    assert torch.all(last[:, :, :232, :9] > 0)
    assert torch.all(last[:, :, 232:, :] == 0) and torch.all(last[:, :, :, 9:] == 0)
    assert valid[0, 15, 0].sum().item() == 232 * 9
    assert valid[1, 0].all()
    # padding is exactly where the mask is False, for every region
    assert torch.equal(regions.ne(0).all(dim=2, keepdim=True), valid)
    assert valid[0].sum().item() == 1000 * 777
    assert grid.box(3, 3) == (768, 768, 1000, 777)
    assert grid.box(0, 1) == (0, 256, 256, 512)
    frac = grid.valid_fraction()
    assert frac[0, 0] == 1.0 and frac[3, 3] == pytest.approx(232 * 9 / 256**2)


def test_merge_split_roundtrip_and_no_resize():
    x = torch.randn(1, 4, 300, 130)
    regions, _, grid = split_regions(x, 64)
    assert regions.shape == (1, 5 * 3, 4, 64, 64)
    # region (2, 1) holds exactly the pixels of its box: no resampling anywhere
    y0, x0, y1, x1 = grid.box(2, 1)
    assert torch.equal(regions[0, grid.index(2, 1)], x[0, :, y0:y1, x0:x1])
    merged = merge_regions(regions, grid.rows, grid.cols)
    assert merged.shape == (1, 4, 320, 192)
    assert torch.equal(merged[..., :300, :130], x)
    assert torch.all(merged[..., 300:, :] == 0)


def test_single_channel_smaller_than_region():
    x = torch.randn(3, 1, 5, 7)
    regions, valid, grid = split_regions(x, 16)
    assert grid.num_regions == 1 and regions.shape == (3, 1, 1, 16, 16)
    assert valid[:, 0, 0, :5, :7].all() and valid.sum().item() == 3 * 35
    assert torch.equal(merge_regions(regions, 1, 1)[..., :5, :7], x)


def test_numpy_input():
    x = np.arange(2 * 10 * 10, dtype=np.float32).reshape(1, 2, 10, 10)
    regions, _, grid = split_regions(x, 4)
    assert regions.shape == (1, 9, 2, 4, 4)
    assert regions[0, 4, 1, 0, 0].item() == x[0, 1, 4, 4]


def test_zigzag_order():
    grid = RegionGrid(30, 40, 10)
    zz = grid.order("zigzag")
    expected = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 3), (1, 2), (1, 1), (1, 0),
                (2, 0), (2, 1), (2, 2), (2, 3)]
    assert [tuple(rc) for rc in zz] == expected
    # consecutive regions are always neighbours
    assert np.all(np.abs(np.diff(zz, axis=0)).sum(axis=1) == 1)
    raster = grid.order("raster")
    assert [tuple(rc) for rc in raster[:5]] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    np.testing.assert_array_equal(grid.order_indices("zigzag")[4:8], [7, 6, 5, 4])


def test_split_zigzag_matches_grid_and_merges_back():
    x = torch.randn(1, 2, 30, 40)
    regions, valid, grid = split_regions(x, 10, order="zigzag")
    raster, _, _ = split_regions(x, 10)
    for i, (r, c) in enumerate(grid.order("zigzag")):
        assert torch.equal(regions[0, i], raster[0, grid.index(r, c)])
    assert torch.equal(merge_regions(regions, 3, 4, order="zigzag"), x)
    assert not torch.equal(merge_regions(regions, 3, 4), x)


def test_subregion_nesting_roundtrip():
    x = torch.randn(2, 3, 100, 70)
    regions, _, _ = split_regions(x, 32)
    sub = split_subregions(regions, 8)
    assert sub.shape == (2, regions.shape[1], 16, 3, 8, 8)
    # sub-region p = 5 is row 1, col 1 inside its region
    assert torch.equal(sub[1, 2, 5], regions[1, 2, :, 8:16, 8:16])
    assert torch.equal(merge_subregions(sub), regions)


@pytest.mark.parametrize("order", ["raster", "zigzag"])
def test_tokenize_nested_roundtrip(order):
    x = torch.randn(1, 2, 90, 50)
    cfg = TokenizerConfig(region_size=32, sub_region_size=16, order=order)
    tok = tokenize(x, cfg)
    assert tok.nested
    assert tok.regions.shape == (1, 6, 4, 2, 16, 16)
    assert tok.valid.shape == (1, 6, 4, 1, 16, 16)
    assert tok.valid.sum().item() == 90 * 50
    assert tok.order.shape == (6, 2)
    assert torch.equal(untokenize(tok), x)
    flat = tokenize(x, TokenizerConfig(region_size=32, order=order))
    assert not flat.nested and flat.regions.shape == (1, 6, 2, 32, 32)
    assert torch.equal(untokenize(flat), x)


def test_bad_inputs():
    with pytest.raises(ValueError, match="4-D"):
        split_regions(torch.zeros(3, 10, 10), 4)
    with pytest.raises(ValueError, match="zero-sized"):
        split_regions(torch.zeros(1, 3, 0, 10), 4)
    with pytest.raises(ValueError, match="region_size must be > 0"):
        split_regions(torch.zeros(1, 1, 10, 10), 0)
    with pytest.raises(ValueError, match="region_size must be > 0"):
        TokenizerConfig(region_size=-4)
    with pytest.raises(ValueError, match="must divide"):
        TokenizerConfig(region_size=256, sub_region_size=100)
    with pytest.raises(ValueError, match="must divide"):
        split_subregions(torch.zeros(1, 1, 1, 10, 10), 4)
    with pytest.raises(ValueError, match="scan order"):
        TokenizerConfig(order="spiral")
    with pytest.raises(ValueError, match="cannot fill"):
        merge_regions(torch.zeros(1, 5, 1, 4, 4), 2, 3)
    with pytest.raises(ValueError, match="height must be > 0"):
        RegionGrid(0, 5, 4)
    with pytest.raises(IndexError):
        RegionGrid(10, 10, 4).box(3, 0)
