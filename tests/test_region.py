import pytest
import torch
from safetensors.torch import save_file
from timm.layers import DropPath

from napari_xt.model.region import RegionEncoder, RegionEncoderConfig

S = 64  # small regions keep the CPU tests fast; every family below accepts 64 px

FAMILIES = [
    ("swinv2_tiny_window8_256", [96, 192, 384, 768]),
    ("swin_tiny_patch4_window7_224", [96, 192, 384, 768]),
    ("hiera_tiny_224", [96, 192, 384, 768]),
    ("convnext_atto", [40, 80, 160, 320]),
    ("vit_tiny_patch16_224", [192, 192, 192, 192]),
    ("deit_tiny_patch16_224", [192, 192, 192, 192]),
]


@pytest.mark.parametrize("in_chans", [1, 2, 4])
@pytest.mark.parametrize(("backbone", "channels"), FAMILIES)
def test_families_give_nchw_pyramid(backbone, channels, in_chans):
    enc = RegionEncoder(RegionEncoderConfig(backbone, region_size=S, in_chans=in_chans)).eval()
    assert enc.feature_channels == channels
    assert enc.feature_strides == [4, 8, 16, 32]
    assert enc.num_features == channels[-1]
    with torch.no_grad():
        feats = enc(torch.randn(2, in_chans, S, S))
    assert [tuple(f.shape) for f in feats] == [
        (2, c, S // s, S // s) for c, s in zip(channels, enc.feature_strides)
    ]
    assert all(torch.isfinite(f).all() for f in feats)


def test_swin_nhwc_is_permuted_not_reshaped():
    enc = RegionEncoder(RegionEncoderConfig("swin_tiny_patch4_window7_224", S, 3)).eval()
    x = torch.randn(1, 3, S, S)
    with torch.no_grad():
        raw = enc.model(x)  # timm gives (N, h, w, C)
        feats = enc(x)
    assert raw[0].shape == (1, 16, 16, 96)
    assert torch.equal(feats[0], raw[0].permute(0, 3, 1, 2))
    assert torch.equal(feats[0][0, :, 3, 5], raw[0][0, 3, 5, :])


def test_official_swinv2_region_size_and_key_names():
    enc = RegionEncoder(RegionEncoderConfig("swinv2_tiny_window16_256", 256, 3)).eval()
    with torch.no_grad():
        feats = enc(torch.randn(1, 3, 256, 256))
    assert [f.shape[-1] for f in feats] == [64, 32, 16, 8]
    keys = set(enc.state_dict())
    assert "model.patch_embed.proj.weight" in keys
    assert "model.layers_1.downsample.reduction.weight" in keys
    assert "model.layers_3.blocks.1.attn.cpb_mlp.0.weight" in keys
    assert {k.split(".")[1] for k in keys} == {"patch_embed", "layers_0", "layers_1",
                                              "layers_2", "layers_3"}


def test_meta_device_construction_counts_large_models():
    with torch.device("meta"):
        enc = RegionEncoder(RegionEncoderConfig("swinv2_base_window16_256", 256, 3))
        hiera = RegionEncoder(RegionEncoderConfig("hiera_base_224", 224, 3))
    assert all(p.is_meta for p in enc.parameters())
    assert enc.num_features == 1024 and hiera.num_features == 768
    assert 80e6 < sum(p.numel() for p in enc.parameters()) < 95e6
    assert 45e6 < sum(p.numel() for p in hiera.parameters()) < 55e6


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("backbone", ["convnext_atto", "vit_tiny_patch16_224"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_roundtrip(tmp_path, backbone, suffix):
    cfg = RegionEncoderConfig(backbone, S, 2)
    src = RegionEncoder(cfg).eval()
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    torch.manual_seed(123)
    fresh = RegionEncoder(cfg).eval()
    x = torch.randn(2, 2, S, S)
    with torch.no_grad():
        ref = src(x)
        assert _max_diff(ref, fresh(x)) > 1e-4
        loaded = RegionEncoder(cfg, weights=path).eval()
        assert _max_diff(ref, loaded(x)) == 0.0


def test_plain_timm_state_dict_is_renamed_and_head_ignored(tmp_path):
    import timm

    base = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, in_chans=1,
                             img_size=S, num_classes=7, drop_path_rate=0.0).eval()
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    assert "head.fc.weight" in base.state_dict() and "norm.weight" in base.state_dict()
    enc = RegionEncoder(RegionEncoderConfig("swin_tiny_patch4_window7_224", S, 1), weights=path)
    ours = enc.state_dict()
    theirs = base.state_dict()
    assert torch.equal(ours["model.layers_2.downsample.reduction.weight"],
                       theirs["layers.2.downsample.reduction.weight"])
    assert torch.equal(ours["model.patch_embed.proj.weight"], theirs["patch_embed.proj.weight"])
    # the deepest map equals timm's own stage-4 output (before its final norm)
    x = torch.randn(1, 1, S, S)
    with torch.no_grad():
        expected = base.layers(base.patch_embed(x)).permute(0, 3, 1, 2)
        assert torch.allclose(enc.eval()(x)[-1], expected, atol=1e-5)


def test_mismatched_weights_give_one_clear_error(tmp_path):
    src = RegionEncoder(RegionEncoderConfig("convnext_atto", S, 3))
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / "convnext.safetensors"
    save_file(state, str(path))
    # the key check needs only shapes, so the receiving models can live on the meta device
    with torch.device("meta"), pytest.raises(ValueError) as info:
        RegionEncoder(RegionEncoderConfig("swin_tiny_patch4_window7_224", S, 3), weights=path)
    msg = str(info.value)
    assert "missing keys: [model.patch_embed.proj.weight" in msg
    assert "unexpected keys: [model.stages_0." in msg
    # same backbone, other channel count: the mis-shaped stem is named with both shapes
    with torch.device("meta"), pytest.raises(
        ValueError, match=r"model\.stem_0\.weight \(40, 3, 4, 4\) vs \(40, 4, 4, 4\)"
    ):
        RegionEncoder(RegionEncoderConfig("convnext_atto", S, 4), weights=path)
    # a file missing one tensor
    state.pop("model.stages_3.blocks.1.mlp.fc2.bias")
    save_file(state, str(tmp_path / "partial.safetensors"))
    with torch.device("meta"), pytest.raises(
        ValueError, match=r"1 missing keys: \[model\.stages_3\.blocks\.1\.mlp\.fc2\.bias\]"
    ):
        RegionEncoder(RegionEncoderConfig("convnext_atto", S, 3),
                      weights=tmp_path / "partial.safetensors")
    # a fitting file still cannot fill parameters that have no storage
    with torch.device("meta"), pytest.raises(ValueError, match="meta device"):
        RegionEncoder(RegionEncoderConfig("convnext_atto", S, 3), weights=path)
    with pytest.raises(FileNotFoundError):
        src.load_weights(tmp_path / "absent.safetensors")


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="close names: .*swinv2_tiny_window16_256"):
        RegionEncoder(RegionEncoderConfig("swinv2_tiny_window16_265", 256, 3))
    with pytest.raises(ValueError, match="in_chans"):
        RegionEncoderConfig("convnext_atto", 64, 0)
    with pytest.raises(ValueError, match="multiple of the deepest stride 32"):
        RegionEncoder(RegionEncoderConfig("convnext_atto", 70, 3))
    enc = RegionEncoder(RegionEncoderConfig("convnext_atto", S, 2))
    with pytest.raises(ValueError, match=r"expects \(N, 2, 64, 64\)"):
        enc(torch.randn(1, 3, S, S))
    with pytest.raises(ValueError, match=r"expects \(N, 2, 64, 64\)"):
        enc(torch.randn(1, 2, 32, 32))


def test_out_indices_and_drop_path():
    cfg = RegionEncoderConfig("convnext_atto", S, 3, drop_path_rate=0.1, out_indices=[2, 3])
    assert cfg.out_indices == (2, 3)
    enc = RegionEncoder(cfg).train()
    assert enc.model.stages_3.blocks[1].drop_path.drop_prob == pytest.approx(0.1)
    assert enc.feature_strides == [16, 32] and enc.feature_channels == [160, 320]
    feats = enc(torch.randn(2, 3, S, S))
    feats[-1].sum().backward()
    assert enc.model.stem_0.weight.grad is not None
    with torch.device("meta"):
        still = RegionEncoder(RegionEncoderConfig("swin_tiny_patch4_window7_224", S, 3))
        vit = RegionEncoder(RegionEncoderConfig("vit_tiny_patch16_224", S, 3, out_indices=(5, 11)))
    assert all(not isinstance(m, DropPath) for m in still.modules())  # 0 means 0, not timm's 0.1
    assert vit.feature_strides == [16, 32] and len(vit.pyramid) == 2
