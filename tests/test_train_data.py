"""Training data and metrics: zarr pair stores, crops, detection target maps, IoU and F1."""

import numpy as np
import pytest

from napari_xt.train.data import (
    IGNORE_INDEX,
    Normalization,
    SyntheticDataset,
    ZarrPairDataset,
    collate,
    target_maps,
    write_pair,
)
from napari_xt.train.metrics import ConfusionMatrix, DetectionCounts, match_points
from napari_xt.train.synthetic import SceneConfig


def _pair(rng, h=96, w=80, c=2):
    image = rng.normal(size=(c, h, w)).astype(np.float32)
    mask = rng.integers(0, 3, (h, w)).astype(np.uint8)
    points = np.array([[10.5, 20.5], [50.0, 70.0], [90.0, 5.0]])
    return image, mask, points


def test_zarr_pairs_whole_and_cropped(tmp_path, rng):
    image, mask, points = _pair(rng)
    write_pair(tmp_path / "a.zarr", image, mask, points, sizes=[3.0, 4.0, 5.0], chunk=32)
    write_pair(tmp_path / "b.zarr", image[0], mask)  # single channel, no points
    norm = Normalization(mean=(1.0,), std=(2.0,))

    whole = ZarrPairDataset(tmp_path, norm)
    assert len(whole) == 2
    s = whole[0]
    np.testing.assert_allclose(s.image, (image - 1.0) / 2.0, rtol=1e-6)
    np.testing.assert_array_equal(s.mask, mask)
    np.testing.assert_array_equal(s.points, points)
    np.testing.assert_array_equal(s.sizes, [3.0, 4.0, 5.0])
    assert whole[1].image.shape == (1, 96, 80) and len(whole[1].points) == 0

    crops = ZarrPairDataset([tmp_path / "a.zarr"], norm, crop_size=48, length=10, seed=3)
    assert len(crops) == 10
    for i in range(10):
        c = crops[i]
        assert c.image.shape == (2, 48, 48) and c.mask.shape == (48, 48)
        assert ((c.points >= 0) & (c.points < 48)).all()
    again = ZarrPairDataset([tmp_path / "a.zarr"], norm, crop_size=48, length=10, seed=3)
    np.testing.assert_array_equal(again[4].image, crops[4].image)


def test_crop_larger_than_image_is_padded_and_ignored(tmp_path, rng):
    image, mask, _ = _pair(rng, h=40, w=30)
    write_pair(tmp_path / "small.zarr", image, mask)
    s = ZarrPairDataset(tmp_path / "small.zarr", Normalization(), crop_size=64)[0]
    assert s.image.shape == (2, 64, 64)
    np.testing.assert_array_equal(s.mask[:40, :30], mask)
    assert (s.mask[40:] == IGNORE_INDEX).all() and (s.mask[:, 30:] == IGNORE_INDEX).all()
    assert (s.image[:, 40:] == 0).all()


def test_crop_points_are_shifted_into_the_crop(tmp_path, rng):
    _, mask, points = _pair(rng)
    yy, xx = np.mgrid[0:96, 0:80]
    image = np.stack([yy, xx]).astype(np.float32)  # each pixel holds its own (y, x)
    write_pair(tmp_path / "p.zarr", image, mask, points)
    data = ZarrPairDataset(tmp_path / "p.zarr", Normalization(), crop_size=48, length=20)
    found = 0
    for i in range(20):
        s = data[i]
        for (y, x) in s.points:
            origin = s.image[:, 0, 0]  # stored (y, x) of the crop's first pixel
            assert any(np.allclose(p, origin + [y, x]) for p in points)
            found += 1
    assert found > 0


def test_missing_or_broken_stores_raise(tmp_path, rng):
    with pytest.raises(FileNotFoundError):
        ZarrPairDataset(tmp_path / "none.zarr", Normalization())
    image, mask, _ = _pair(rng)
    with pytest.raises(ValueError):
        write_pair(tmp_path / "bad.zarr", image, mask[:10])


def test_target_maps_and_collate():
    heat, size, weight = target_maps(np.array([[5.2, 7.9]]), np.array([6.0]), (16, 16), 2.0)
    assert heat[5, 7] == 1.0 and heat.max() == 1.0 and 0 < heat[5, 9] < 1
    assert size[5, 7] == 6.0 and size.sum() == 6.0 and weight.sum() == 1.0
    data = SyntheticDataset(SceneConfig(height=64, width=64), 0, 3, Normalization())
    batch = collate([data[i] for i in range(3)])
    assert batch["image"].shape == (3, 2, 64, 64)
    assert batch["mask"].shape == (3, 64, 64) and batch["centre"].shape == (3, 1, 64, 64)
    assert int(batch["size_weight"].sum()) == sum(len(p) for p in batch["points"])


def test_confusion_iou():
    cm = ConfusionMatrix(3)
    truth = np.array([0, 0, 1, 1, 2, IGNORE_INDEX])
    pred = np.array([0, 1, 1, 1, 0, 2])
    cm.update(truth, pred)
    np.testing.assert_allclose(cm.iou(), [1 / 3, 2 / 3, 0.0])
    assert cm.miou() == pytest.approx((1 / 3 + 2 / 3) / 3)
    assert cm.miou([1, 2]) == pytest.approx(1 / 3)
    assert cm.accuracy() == pytest.approx(3 / 5)
    for wrong in (3, -1):  # a prediction outside the classes is an error, not another cell
        with pytest.raises(ValueError, match="classes 0..2"):
            cm.update(np.array([0]), np.array([wrong]))
    cm.update(np.array([IGNORE_INDEX]), np.array([7]))  # (ignored truth: nothing counted)


def test_greedy_matching_by_score_within_radius():
    true = np.array([[10.0, 10.0], [30.0, 30.0]])
    pred = np.array([[11.0, 10.0], [10.0, 12.0], [60.0, 60.0]])
    # the higher-scored prediction takes the ground truth; the other becomes a false positive
    assert match_points(pred, [0.9, 0.8, 0.7], true, radius=3) == (1, 2, 1)
    assert match_points(pred, [0.9, 0.8, 0.7], true, radius=1.5) == (1, 2, 1)
    assert match_points(pred[:0], [], true, radius=3) == (0, 0, 2)
    det = DetectionCounts(radius=3)
    det.update(pred, [0.9, 0.8, 0.7], true)
    assert det.f1 == pytest.approx(2 * 1 / (2 * 1 + 2 + 1))


def test_detection_metrics_follow_the_centre_map_the_loss_names():
    import torch

    from napari_xt.train.data import Sample
    from napari_xt.train.evaluate import evaluate

    class Beacons(torch.nn.Module):  # a "model" whose centre map is called "beacon"
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            b, _, h, w = x.shape
            beacon = torch.full((b, 1, h, w), -9.0)
            beacon[:, 0, 8, 8] = 9.0
            return {"logits": torch.zeros(b, 2, h, w), "beacon": beacon}

    sample = Sample(np.zeros((1, 16, 16), np.float32), np.zeros((16, 16), np.int64),
                    np.array([[8.5, 8.5]]), np.array([2.0]))
    assert "det_f1" not in evaluate(Beacons(), [sample], 2)  # no "centre" output
    metrics = evaluate(Beacons(), [sample], 2, centre_map="beacon")
    assert metrics["det_f1"] == pytest.approx(1.0)
