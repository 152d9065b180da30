import numpy as np
import pytest
import torch

from napari_xt.model.heads import (
    POINT_DTYPE,
    ClassificationHead,
    DetectionHead,
    HeadConfig,
    SegmentationHead,
    build_head,
    points_from_heatmap,
)

CHANNELS = [8, 16, 24, 40]  # region encoder levels at strides 4, 8, 16, 32
DIM = 32  # context width: the deepest level is replaced by the contextualized tokens


def _features(n=2, s=64, channels=CHANNELS, strides=(4, 8, 16, 32), dim=DIM):
    levels = [torch.randn(n, c, s // st, s // st) for c, st in zip(channels[:-1], strides[:-1])]
    return levels + [torch.randn(n, dim, s // strides[-1], s // strides[-1])]


def test_config_validation():
    cfg = HeadConfig("segmentation", 3, outputs=[["centre", 1], ["size", 2]], dim=DIM)
    assert cfg.outputs == (("centre", 1), ("size", 2))
    assert cfg.maps == (("logits", 3), ("centre", 1), ("size", 2))
    assert HeadConfig("detection", 4, outputs=(("size", 1),)).maps[0] == ("heatmap", 4)
    with pytest.raises(ValueError, match="unknown head kind"):
        HeadConfig("boxes", 2)
    with pytest.raises(ValueError, match="num_classes"):
        HeadConfig("segmentation", 0)
    with pytest.raises(ValueError, match="unique"):
        HeadConfig("segmentation", 2, outputs=(("logits", 1),))
    with pytest.raises(ValueError, match="unique"):
        HeadConfig("segmentation", 2, outputs=(("a", 1), ("a", 2)))
    with pytest.raises(ValueError, match="at least one channel"):
        HeadConfig("segmentation", 2, outputs=(("a", 0),))
    with pytest.raises(ValueError, match="segmentation or detection"):
        HeadConfig("classification", 2, outputs=(("a", 1),))


def test_classification_head_names_and_cls_token():
    head = build_head(HeadConfig("classification", 5, dim=DIM), CHANNELS)
    assert isinstance(head, ClassificationHead)
    assert set(head.state_dict()) == {"cls.0.weight", "cls.0.bias", "cls.1.weight", "cls.1.bias"}
    tokens = torch.randn(3, 7, DIM)  # (B, N, D), cls appended last
    logits = head(tokens)
    assert logits.shape == (3, 5)
    assert torch.equal(logits, head(tokens[:, -1]))
    assert not torch.allclose(logits, head(tokens[:, 0]))
    with pytest.raises(ValueError, match="cls token"):
        head(torch.randn(DIM))


def test_segmentation_head_stride_one_several_maps():
    cfg = HeadConfig("segmentation", 5, outputs=(("centre", 1), ("size", 1)), dim=DIM)
    head = build_head(cfg, CHANNELS, DIM, [4, 8, 16, 32])
    assert type(head) is SegmentationHead
    feats = _features()
    maps = head(feats)
    assert set(maps) == {"logits", "centre", "size"}
    assert maps["logits"].shape == (2, 5, 64, 64)
    assert maps["centre"].shape == (2, 1, 64, 64) and maps["size"].shape == (2, 1, 64, 64)
    sum(m.sum() for m in maps.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_segmentation_head_uses_every_level_and_is_batch_independent():
    head = build_head(HeadConfig("segmentation", 2, dim=DIM), CHANNELS).eval()
    feats = _features(n=3)
    with torch.no_grad():
        base = head(feats)["logits"]
        for level in range(4):
            changed = list(feats)
            changed[level] = changed[level] + 1.0
            assert not torch.allclose(head(changed)["logits"], base)
        one = head([f[1:2] for f in feats])["logits"]
    assert torch.allclose(one, base[1:2], atol=1e-5)  # GroupNorm: no batch statistics


def test_segmentation_head_non_power_of_two_strides_and_custom_widths():
    cfg = HeadConfig("segmentation", 3, decoder_channels=(24, 16, 8), dim=DIM)
    head = SegmentationHead(cfg, [12, 12, 12], DIM, feature_strides=[7, 14, 28])
    feats = _features(n=1, s=56, channels=[12, 12, 12], strides=(7, 14, 28))
    assert head(feats)["logits"].shape == (1, 3, 56, 56)
    with pytest.raises(ValueError, match="needs 3 widths"):
        SegmentationHead(HeadConfig("segmentation", 3, decoder_channels=(8,)), [12, 12, 12],
                         DIM, [7, 14, 28])
    with pytest.raises(ValueError, match="feature channels"):
        head(_features(n=1, s=56, channels=[12, 10, 12], strides=(7, 14, 28)))
    with pytest.raises(ValueError, match="3 feature levels"):
        head(feats[1:])


def test_head_on_region_encoder_features():
    from napari_xt.model.region import RegionEncoder, RegionEncoderConfig

    enc = RegionEncoder(RegionEncoderConfig("convnext_atto", 64, 2)).eval()
    cfg = HeadConfig("detection", 3, outputs=(("size", 1),), dim=DIM)
    head = build_head(cfg, enc.feature_channels, DIM, enc.feature_strides)
    assert isinstance(head, DetectionHead)
    with torch.no_grad():
        feats = enc(torch.randn(2, 2, 64, 64))
        tokens = torch.randn(2, 4, DIM)  # (N, h*w, D) contextualized, row-major
        feats[-1] = tokens.transpose(1, 2).reshape(2, DIM, 2, 2)
        maps = head(feats)
    assert maps["heatmap"].shape == (2, 3, 64, 64) and maps["size"].shape == (2, 1, 64, 64)
    pts = head.points(maps, threshold=0.0, min_distance=4, max_points=5)
    assert pts.dtype == POINT_DTYPE and len(pts) == 10
    assert set(pts["batch"]) == {0, 1} and np.all(pts["score"] > 0) and np.all(pts["score"] < 1)
    assert np.all(np.isfinite(pts["size"]))


def _blob(h, w, y, x, peak, sigma=2.0):
    yy, xx = np.mgrid[:h, :w]
    return peak * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2))


def _planted():
    heat = np.zeros((2, 64, 64), np.float32)
    heat[0] = np.maximum(_blob(64, 64, 10, 12, 0.9), _blob(64, 64, 11, 15, 0.6))  # 2nd too near
    heat[1] = np.maximum(_blob(64, 64, 40, 50, 0.8), _blob(64, 64, 30, 30, 0.3))  # 2nd too low
    heat[1] = np.maximum(heat[1], _blob(64, 64, 10, 13, 0.7))  # other class beside class 0
    sizes = np.zeros((2, 64, 64), np.float32)
    sizes[0, 10, 12], sizes[1, 40, 50], sizes[1, 10, 13] = 5.0, 9.0, 3.0
    return heat, sizes


def test_points_from_heatmap_finds_planted_peaks():
    heat, sizes = _planted()
    pts = points_from_heatmap(heat, sizes, threshold=0.5, min_distance=3)
    got = [(int(p["y"]), int(p["x"]), int(p["class"])) for p in pts]
    assert got == [(10, 12, 0), (40, 50, 1), (10, 13, 1)]  # sorted by score
    np.testing.assert_allclose(pts["score"], [0.9, 0.8, 0.7], rtol=1e-5)
    np.testing.assert_array_equal(pts["size"], [5.0, 9.0, 3.0])
    assert np.all(pts["batch"] == 0)
    # a single size channel is shared by all classes
    one = points_from_heatmap(torch.from_numpy(heat), torch.from_numpy(sizes[1:]), 0.5, 3)
    np.testing.assert_array_equal(one["size"], [0.0, 9.0, 3.0])
    # without a size map the size is NaN; with a small window the weak neighbour survives
    near = points_from_heatmap(heat, threshold=0.5, min_distance=1)
    assert np.isnan(near["size"]).all()
    assert (11, 15, 0) in [(int(p["y"]), int(p["x"]), int(p["class"])) for p in near]


def test_points_class_agnostic_max_points_and_batches():
    heat, _ = _planted()
    agnostic = points_from_heatmap(heat, threshold=0.5, min_distance=3, per_class=False)
    assert [(int(p["y"]), int(p["x"]), int(p["class"])) for p in agnostic] == [
        (10, 12, 0), (40, 50, 1)
    ]
    batched = np.stack([heat, heat[::-1] * 0.5])  # (B, K, H, W)
    pts = points_from_heatmap(batched, threshold=0.3, min_distance=3, max_points=2)
    assert list(pts["batch"]) == [0, 0, 1, 1]
    np.testing.assert_allclose(pts["score"], [0.9, 0.8, 0.45, 0.4], rtol=1e-5)
    assert list(pts["class"][2:]) == [1, 0]
    again = points_from_heatmap(batched, threshold=0.3, min_distance=3, max_points=2)
    assert again.tobytes() == pts.tobytes()


def test_points_plateau_and_spacing():
    heat = np.zeros((1, 20, 20), np.float32)
    heat[0, 5:8, 5:9] = 0.7  # a flat-topped peak gives one point, its first pixel
    heat[0, 15, 15] = heat[0, 15, 17] = 0.6  # two equal peaks 2 apart, min_distance 2
    pts = points_from_heatmap(heat, threshold=0.5, min_distance=2)
    assert [(int(p["y"]), int(p["x"])) for p in pts] == [(5, 5), (15, 15)]
    every = points_from_heatmap(heat, threshold=0.5, min_distance=0)
    assert len(every) == 12 + 2
    rng = np.random.default_rng(0)
    noise = rng.random((3, 50, 50)).astype(np.float32)
    pts = points_from_heatmap(noise, threshold=0.2, min_distance=3)
    for c in range(3):
        yx = np.stack([pts["y"][pts["class"] == c], pts["x"][pts["class"] == c]], 1)
        d = np.abs(yx[:, None] - yx[None]).max(-1) + np.eye(len(yx)) * 100
        assert d.min() > 3
        for y, x in yx.astype(int):  # each kept point is the maximum of its window
            window = noise[c, max(y - 3, 0): y + 4, max(x - 3, 0): x + 4]
            assert noise[c, y, x] == window.max()


def test_points_bad_input():
    with pytest.raises(ValueError, match=r"\(K, H, W\) or \(B, K, H, W\)"):
        points_from_heatmap(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="does not fit"):
        points_from_heatmap(np.zeros((2, 4, 4)), np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="min_distance"):
        points_from_heatmap(np.zeros((1, 4, 4)), min_distance=-1)
    empty = points_from_heatmap(np.zeros((1, 4, 4)))
    assert empty.dtype == POINT_DTYPE and len(empty) == 0
