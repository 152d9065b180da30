"""Model zoo: the paper's parameter counts, names, overrides."""

import json

import pytest
import torch

from napari_xt.model import PAPER_PARAMS, XTConfig, create_model, get_config, list_models

# Swin-T <xT> Mamba: the official block (4 layers of Mamba, d_state 16, expand 2, dt_rank 48,
# conv 4, width 768 + LayerNorm) gives 43.48M, 1.19% under the printed 44M; the same block
# matches the Swin-B (103M, -0.01%) and Swin-L (212M, -0.15%) Mamba rows, and 3 or 5 layers
# give 39.7M / 47.3M, so the printed figure is a rounding slip. Every other row is within 1%.
TOLERANCE = {"xt_swin_t_mamba_512_256": 0.012}


def _count(name, **overrides):
    with torch.device("meta"):
        model = create_model(name, **overrides)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_parameter_counts(name):
    measured = _count(name) / 1e6
    paper = PAPER_PARAMS[name]
    assert abs(measured - paper) / paper <= TOLERANCE.get(name, 0.01), (name, measured, paper)


def test_exact_counts_pin_the_architecture():
    swin_t = 27_576_618  # timm swinv2_tiny_window16_256 features (no final norm, no head)
    proj = 768 * 768 + 768
    hyper_layer = (768 * 2304 + 2304) + (768 * 768 + 768) + 3 * 768 * 3072 + 2 * 768
    mamba_layer = (768 * 3072 + 1536 * 4 + 1536 + 1536 * 80 + 48 * 1536 + 1536
                   + 1536 * 16 + 1536 + 1536 * 768 + 2 * 768)
    head = 768 + 2 * 768 + 768 * 284 + 284  # cls token, LayerNorm, Linear
    assert _count("xt_swin_t_hyper_512_256") == swin_t + proj + 2 * hyper_layer + head
    assert _count("xt_swin_t_mamba_512_256") == swin_t + proj + 4 * mamba_layer + head
    baseline_head = 768 * 3072 + 3072 + 2 * 3072 + 3072 * 284 + 284
    assert _count("swinv2_t_baseline") == swin_t + baseline_head


def test_every_paper_row_and_demo_is_listed_and_consistent():
    names = list_models()
    assert set(PAPER_PARAMS) <= set(names)
    assert {"xt_tiny_demo", "xt_tiny_demo_seg", "xt_hiera_b_hyper_448_224"} <= set(names)
    assert list_models("mamba") == [n for n in names if "mamba" in n]
    for name in names:
        cfg = get_config(name)
        assert cfg.name == name
        assert XTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        if "_512_256" in name:
            assert cfg.crop_regions == 2 and cfg.region.region_size == 256
    assert get_config("xt_swin_l_hyper_512_256").region.backbone.startswith("swinv2_large")
    assert get_config("xt_swin_t_mamba_512_256").context.depth == 4
    assert get_config("xt_swin_t_hyper_256_256").context.causal


def test_unknown_name_lists_close_names():
    with pytest.raises(KeyError, match="xt_swin_t_hyper_512_256"):
        get_config("xt_swin_t_hyper_512")
    with pytest.raises(KeyError, match="unknown model 'nothing_like_it'"):
        create_model("nothing_like_it")


def test_overrides_reach_nested_configs():
    cfg = get_config("xt_tiny_demo", num_classes=3, in_chans=5, context={"depth": 1})
    assert (cfg.num_classes, cfg.head.num_classes) == (3, 3)
    assert (cfg.in_chans, cfg.region.in_chans) == (5, 5)
    assert cfg.context.depth == 1 and cfg.context.kind == "hyper"
    model = create_model("xt_tiny_demo", num_classes=3, in_chans=5).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 5, 128, 128))["logits"].shape == (1, 3)
    with pytest.raises(ValueError, match="unknown ContextConfig fields"):
        get_config("xt_tiny_demo", context={"layers": 3})
    with pytest.raises(ValueError, match="unknown XTConfig fields"):
        get_config("xt_tiny_demo", colour="red")
