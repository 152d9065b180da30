"""Second nesting level: regions cut into sub-regions that the region encoder sees alone."""

from dataclasses import replace

import pytest
import torch

from napari_xt.model import XT, get_config
from napari_xt.model.region import RegionEncoderConfig
from napari_xt.model.tokenizer import TokenizerConfig


def _nested_config(kind="segmentation"):
    name = "xt_tiny_demo_seg" if kind == "segmentation" else "xt_tiny_demo"
    cfg = get_config(name)
    return replace(
        cfg,
        region=replace(cfg.region, region_size=64),
        tokenizer=TokenizerConfig(region_size=128, sub_region_size=64),
    )


def test_region_features_are_stitched_sub_region_features():
    torch.manual_seed(0)
    model = XT(_nested_config()).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        nested = model.encode_regions(x)
        quadrants = [x[..., :64, :64], x[..., :64, 64:], x[..., 64:, :64], x[..., 64:, 64:]]
        parts = [model.region_encoder(q) for q in quadrants]
    for level, feat in enumerate(nested):
        h = parts[0][level].shape[-1]
        assert feat.shape[-2:] == (2 * h, 2 * h)
        torch.testing.assert_close(feat[..., :h, :h], parts[0][level])
        torch.testing.assert_close(feat[..., :h, h:], parts[1][level])
        torch.testing.assert_close(feat[..., h:, :h], parts[2][level])
        torch.testing.assert_close(feat[..., h:, h:], parts[3][level])


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
def test_nested_model_runs_on_odd_sizes(kind):
    model = XT(_nested_config(kind)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 200, 140))
    if kind == "segmentation":
        assert out["logits"].shape == (1, 2, 200, 140)
    else:
        assert out["logits"].shape == (1, 10)
    assert model.cfg.crop_size == 4 * 128


def test_encoder_size_must_match_sub_region_size():
    cfg = get_config("xt_tiny_demo")
    with pytest.raises(ValueError, match="sub_region_size"):
        replace(cfg, tokenizer=TokenizerConfig(region_size=128, sub_region_size=64),
                region=RegionEncoderConfig(backbone="test_convnext2", region_size=128))
