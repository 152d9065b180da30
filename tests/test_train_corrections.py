"""From corrections to a fine-tuned model: export training pairs from the saved edits of a
run, then fine-tune the run's checkpoint on them."""

import copy

import numpy as np
import pytest
import torch
from test_train_loop import TINY

from napari_xt.engine import Finished, run
from napari_xt.io import read_detections, read_labels
from napari_xt.io.corrections import save_detections, save_window
from napari_xt.model import load_checkpoint, save_checkpoint
from napari_xt.model.xt import XT
from napari_xt.train.config import TrainConfig
from napari_xt.train.data import IGNORE_INDEX, Normalization, ZarrPairDataset
from napari_xt.train.from_corrections import ExportError, export_pairs, group_boxes
from napari_xt.train.loop import Trainer
from napari_xt.train.synthetic import SceneConfig, make_scene

NORM = {"mean": [-14.0, -22.0], "std": [7.0, 7.0]}


@pytest.fixture(scope="module")
def corrected_run(tmp_path_factory):
    """A 256 px synthetic scene, a tiny untrained model's run on it, and three windows
    corrected to the scene's true classes (two near each other, one far)."""
    tmp = tmp_path_factory.mktemp("corr")
    cfg = TrainConfig.from_dict(copy.deepcopy(TINY)).model.build_config()
    torch.manual_seed(0)
    model = XT(cfg).eval()
    with torch.no_grad():
        model.head.outputs["centre"].bias.fill_(2.0)  # some detections to correct
    ckpt = tmp / "tiny.safetensors"
    save_checkpoint(model, ckpt)
    image, truth, _ = make_scene(3, SceneConfig(height=256, width=256))
    store = tmp / "run.zarr"
    events = list(run(image, load_checkpoint(ckpt), store, axes="CYX",
                      normalize=(NORM["mean"], NORM["std"]), outputs=("labels", "detections")))
    assert isinstance(events[-1], Finished)
    boxes = [(0, 0, 64, 64), (64, 80, 96, 128), (192, 192, 256, 256)]  # (y0, x0, y1, x1)
    for y0, x0, y1, x1 in boxes:
        save_window(store, "prediction", (y0, x0, y1, x1), truth[y0:y1, x0:x1])
    table = read_detections(store, "prediction")
    keep = slice(0, max(1, len(table["y"]) // 2))
    fixed = {k: np.asarray(v)[keep] for k, v in table.items()}
    save_detections(store, "prediction", fixed)
    return {"image": image, "truth": truth, "store": store, "ckpt": ckpt, "boxes": boxes,
            "table": fixed}


def test_group_boxes_joins_neighbours_within_the_margin():
    boxes = [(0, 0, 10, 10), (12, 0, 20, 10), (50, 50, 60, 60)]
    assert group_boxes(boxes, 1) == [[0], [1], [2]]
    assert group_boxes(boxes, 3) == [[0, 1], [2]]
    assert group_boxes(boxes, 100) == [[0, 1, 2]]


def test_export_pairs_hold_the_corrected_windows_only(corrected_run, tmp_path):
    r = corrected_run
    pairs = export_pairs(r["store"], r["image"], tmp_path / "pairs", margin=32, axes="CYX")
    assert [p.box for p in pairs] == [(0, 0, 128, 160), (160, 160, 256, 256)]
    assert [p.edits for p in pairs] == [2, 1]
    assert [p.labelled for p in pairs] == [64 * 64 + 32 * 48, 64 * 64]
    data = ZarrPairDataset(tmp_path / "pairs", Normalization())
    first = data[0]
    assert np.allclose(first.image, r["image"][:, 0:128, 0:160])
    expected = np.full((128, 160), IGNORE_INDEX)
    expected[0:64, 0:64] = r["truth"][0:64, 0:64]
    expected[64:96, 80:128] = r["truth"][64:96, 80:128]
    assert np.array_equal(first.mask, expected)
    # points: the corrected table's detections inside an edited window, pair coordinates
    t = r["table"]
    inside = np.zeros(len(t["y"]), bool)
    for y0, x0, y1, x1 in r["boxes"][:2]:
        inside |= (t["y"] >= y0) & (t["y"] < y1) & (t["x"] >= x0) & (t["x"] < x1)
    assert pairs[0].points == int(inside.sum())
    assert np.allclose(np.sort(first.points[:, 0]), np.sort(t["y"][inside]))
    with pytest.raises(ExportError, match="already holds 2 pair"):
        export_pairs(r["store"], r["image"], tmp_path / "pairs", margin=32, axes="CYX")
    # again with a margin that joins every window: the old pairs are replaced, not kept
    [joined] = export_pairs(r["store"], r["image"], tmp_path / "pairs", margin=100,
                            axes="CYX", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "pairs").iterdir()) == [joined.path.name]


def test_export_refuses_another_image_or_no_edits(corrected_run, tmp_path):
    r = corrected_run
    other, _, _ = make_scene(4, SceneConfig(height=256, width=256))
    with pytest.raises(ExportError, match="fingerprint"):
        export_pairs(r["store"], other, tmp_path / "a", axes="CYX")
    with pytest.raises(ExportError, match="does not match"):
        export_pairs(r["store"], r["image"][:, :128], tmp_path / "b", axes="CYX")
    with pytest.raises(ExportError, match="no saved corrections of 'other'"):
        export_pairs(r["store"], r["image"], tmp_path / "c", name="other", axes="CYX")
    for refused in ("a", "b", "c"):  # nothing written for any of the three refusals
        assert not (tmp_path / refused).exists() or not any((tmp_path / refused).iterdir())


def test_fine_tuning_a_checkpoint_on_exported_pairs(corrected_run, tmp_path):
    r = corrected_run
    export_pairs(r["store"], r["image"], tmp_path / "pairs", margin=32, axes="CYX")
    cfg = TrainConfig.from_dict({
        "model": {"checkpoint": str(r["ckpt"])},
        "data": {"kind": "zarr", "train_paths": [str(tmp_path / "pairs")], "crop_size": 64,
                 "train_count": 64, "normalize": NORM},
        "optim": {"steps": 30, "batch_size": 2, "lr": 0.003, "warmup_steps": 2},
        "run": {"threads": 2, "checkpoint_every": 0, "eval_every": 0, "log_every": 10},
    })
    trainer = Trainer(cfg, tmp_path / "ft")
    start = load_checkpoint(r["ckpt"])
    for a, b in zip(trainer.model.state_dict().values(), start.state_dict().values()):
        assert torch.equal(a, b)  # starts from the checkpoint's weights, centre bias included

    def reviewed_error(model) -> float:
        x = torch.from_numpy(Normalization((-14.0, -22.0), (7.0, 7.0))(r["image"]))[None]
        with torch.no_grad():
            pred = model.eval()(x)["logits"][0].argmax(0).numpy()
        wrong = [np.mean(pred[y0:y1, x0:x1] != r["truth"][y0:y1, x0:x1])
                 for y0, x0, y1, x1 in r["boxes"]]
        return float(np.mean(wrong))

    before = reviewed_error(start)
    trainer.fit()
    after = reviewed_error(load_checkpoint(tmp_path / "ft" / "model.safetensors"))
    assert after < before - 0.1, (before, after)


def test_fine_tuning_takes_the_checkpoints_normalization(tmp_path):
    from napari_xt.train.demo import demo_normalization, demo_weights_path

    data = {"kind": "zarr", "train_paths": [str(tmp_path)]}
    cfg = TrainConfig.from_dict({"model": {"checkpoint": "demo"}, "data": data})
    assert cfg.model.checkpoint_path() == demo_weights_path()
    assert cfg.model.build_config() == load_checkpoint(demo_weights_path()).cfg
    from napari_xt.train.loop import _normalization

    assert _normalization(cfg, demo_weights_path()) == demo_normalization()
    other = {"mean": [-10.0, -20.0], "std": [5.0, 5.0]}
    wrong = TrainConfig.from_dict({"model": {"checkpoint": "demo"},
                                   "data": {**data, "normalize": other}})
    with pytest.raises(ValueError, match="differs from the normalization"):
        _normalization(wrong, demo_weights_path())
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig.from_dict({"model": {"checkpoint": "demo", "zoo": "xt_tiny_demo_seg"},
                               "data": data}).model.build_config()
    with pytest.raises(ValueError, match="cannot change a checkpoint"):
        TrainConfig.from_dict({"model": {"checkpoint": "demo", "zero_init": ["context"]},
                               "data": data}).model.build_config()
    # settings without weights may change; the weights still load into the new model
    bigger = TrainConfig.from_dict({"model": {"checkpoint": "demo", "overrides": {
        "crop_regions": 8, "name": "demo_512"}}, "data": data})
    cfg = bigger.model.build_config()
    assert cfg.crop_regions == 8 and cfg.name == "demo_512"
    from napari_xt.model.checkpoint import CheckpointError, load_weights

    demo = load_checkpoint(demo_weights_path())
    model = load_weights(XT(cfg), demo_weights_path())
    for a, b in zip(model.state_dict().values(), demo.state_dict().values()):
        assert torch.equal(a, b)
    wider = TrainConfig.from_dict({"model": {"checkpoint": "demo", "overrides": {
        "context": {"mlp_dim": 512}}}, "data": data}).model.build_config()
    with pytest.raises(CheckpointError, match="shape"):
        load_weights(XT(wider), demo_weights_path())
    with pytest.raises(ValueError, match="no file"):
        TrainConfig.from_dict({"model": {"checkpoint": str(tmp_path / "x.safetensors")},
                               "data": data}).model.checkpoint_path()


def test_the_shipped_fine_tuning_config_builds_the_demo_model():
    from pathlib import Path

    from napari_xt.train.config import load_config
    from napari_xt.train.demo import demo_weights_path

    cfg = load_config(Path(__file__).parents[1] / "configs" / "finetune_corrections.yaml")
    assert cfg.data.kind == "zarr" and cfg.model.checkpoint_path() == demo_weights_path()
    assert cfg.model.build_config() == load_checkpoint(demo_weights_path()).cfg


def test_ignored_pixels_count_for_neither_class_nor_detection_loss():
    from napari_xt.train.losses import LossConfig, loss_terms

    torch.manual_seed(0)
    logits, centre = torch.randn(1, 3, 8, 8), torch.randn(1, 1, 8, 8)
    zeros = torch.zeros(1, 1, 8, 8)
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[..., 4:] = IGNORE_INDEX
    batch = {"mask": mask, "centre": zeros, "size": zeros, "size_weight": zeros}
    changed_logits, changed_centre = logits.clone(), centre.clone()
    changed_logits[..., 4:] += 5.0  # other predictions on the ignored half only
    changed_centre[..., 4:] += 5.0
    a = loss_terms({"logits": logits, "centre": centre}, batch, LossConfig())
    b = loss_terms({"logits": changed_logits, "centre": changed_centre}, batch, LossConfig())
    for term in ("ce", "heatmap"):
        assert torch.allclose(a[term][0], b[term][0]), term
    full = dict(batch, mask=torch.zeros_like(mask))  # nothing ignored: the change counts
    c = loss_terms({"logits": logits, "centre": centre}, full, LossConfig())
    d = loss_terms({"logits": changed_logits, "centre": changed_centre}, full, LossConfig())
    assert not torch.allclose(c["heatmap"][0], d["heatmap"][0])


def test_export_from_a_run_on_a_pyramid_level(tmp_path):
    """Labels of a level-1 run are level-1 pixels, its table level-0 pixels: the pairs are
    cut from level 1 and the points brought to it."""
    from napari_xt.io import convert, open_image
    from napari_xt.io.corrections import table_scale
    from napari_xt.train.demo import demo_normalization, load_demo_model

    image, _, _ = make_scene(7, SceneConfig(height=1536, width=1536))
    np.save(tmp_path / "big.npy", image)
    pyramid = convert(tmp_path / "big.npy", tmp_path / "big.ome.zarr", chunk=256)
    assert [lvl.shape[-1] for lvl in pyramid.levels] == [1536, 768]
    norm = demo_normalization()
    store = tmp_path / "run.zarr"
    events = list(run(tmp_path / "big.ome.zarr", load_demo_model(), store, level=1,
                      normalize=(norm.mean, norm.std), cache=False))
    assert isinstance(events[-1], Finished)
    assert table_scale(store) == (2.0, 2.0)
    # no physical pixel size: the labels are placed in level-0 pixels over the image
    assert read_labels(store, "prediction").pixel_size == (2.0, 2.0)
    save_window(store, "prediction", (0, 0, 128, 128), np.full((128, 128), 2, np.uint8))
    save_detections(store, "prediction", {"y": np.array([100.0, 900.0]),
                                          "x": np.array([60.0, 900.0]),
                                          "class": np.array([0, 0]),
                                          "score": np.array([1.0, 1.0]),
                                          "size": np.array([8.0, 8.0])})
    [pair] = export_pairs(store, tmp_path / "big.ome.zarr", tmp_path / "pairs", margin=32)
    assert pair.box == (0, 0, 160, 160) and pair.points == 1
    [sample] = ZarrPairDataset(tmp_path / "pairs", Normalization())
    level1 = np.asarray(open_image(tmp_path / "big.ome.zarr").levels[1][:, :160, :160])
    assert np.allclose(sample.image, level1)
    assert np.allclose(sample.points, [[50.0, 30.0]]) and np.allclose(sample.sizes, [4.0])
    assert (sample.mask[:128, :128] == 2).all() and (sample.mask[128:] == IGNORE_INDEX).all()
