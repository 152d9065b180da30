"""Training with whole-image context: the scene summary equals the engine's scene pass, a few
steps lower the loss, and what backward keeps does not grow with the scene."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_xt.train.config import TrainConfig
from napari_xt.train.loop import Trainer
from napari_xt.train.synthetic import SceneConfig, SyntheticScene
from napari_xt.train.whole_image import scene_summary


def _config(sizes, steps=4, pool=1, lr=2e-3, grid=8) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"checkpoint": "demo", "overrides": {"global_context": {"grid": grid}}},
        "data": {"scene": {"height": 256, "width": 256}, "scene_sizes": sizes,
                 "beacon_fraction": 1.0, "scene_pool": pool, "crops_per_scene": 2,
                 "val_count": 1},
        "optim": {"steps": steps, "batch_size": 1, "lr": lr, "warmup_steps": 1},
        "loss": {"token_weight": 0.5},
        "run": {"threads": 1, "freeze": ["region_encoder"], "checkpoint_every": 0,
                "eval_every": 0, "log_every": 1},
    })


def test_the_training_summary_is_the_engines_scene_pass(tmp_path):
    from napari_xt.engine import run
    from napari_xt.engine import scene as engine_scene

    trainer = Trainer(_config([640]), tmp_path / "run")
    model = trainer.model.eval()
    scene = SyntheticScene(3, SceneConfig(height=640, width=576, beacon=True))
    ours = scene_summary(model, scene, trainer.normalization).cells()
    seen = {}
    real = engine_scene.SceneSummary.cells

    def keep(self):
        seen["cells"] = real(self)
        return seen["cells"]

    engine_scene.SceneSummary.cells = keep
    try:
        img, _ = scene.read()
        norm = (trainer.normalization.mean, trainer.normalization.std)
        for _ in run(img, model, None, normalize=norm, context="image", cache=False):
            pass
    finally:
        engine_scene.SceneSummary.cells = real
    torch.testing.assert_close(seen["cells"], ours, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_few_whole_image_steps_lower_the_loss(tmp_path):
    trainer = Trainer(_config([512], steps=5, lr=3e-3), tmp_path / "run")
    fixed = trainer.scenes

    def step_loss() -> float:
        trainer.model.train()
        trainer._keep_frozen_eval()
        trainer.optimizer.zero_grad(set_to_none=True)
        loss, _ = fixed.forward_backward(trainer, 0)  # the same scene and crops each time
        trainer.optimizer.zero_grad(set_to_none=True)
        return loss

    before = step_loss()
    trainer.fit(5)
    after = step_loss()
    assert after < 0.8 * before, (before, after)
    frozen = dict(trainer.model.region_encoder.named_parameters())
    assert all(not p.requires_grad for p in frozen.values())


@pytest.mark.slow
def test_what_backward_keeps_does_not_grow_with_the_scene(tmp_path):
    """Bytes of the tensors autograd saves for backward in one step: a 512 px scene and a
    2048 px one (16 times the area; both pooled into 8 x 8 scene cells)."""
    kept = {}
    for size in (512, 2048):
        trainer = Trainer(_config([size]), tmp_path / f"run{size}")
        total = [0]

        def pack(t: torch.Tensor, total=total):
            total[0] += t.numel() * t.element_size()
            return t

        trainer.model.train()
        trainer._keep_frozen_eval()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trainer.scenes.forward_backward(trainer, 0)
        kept[size] = total[0]
    assert kept[512] > 0
    assert kept[2048] <= 1.05 * kept[512], kept


def test_beacon_scenes_are_drawn_as_configured(tmp_path):
    trainer = Trainer(_config([512], pool=0), tmp_path / "run")
    scenes = trainer.scenes
    kinds = [scenes.scene_config(512, s).beacon for s in range(20)]
    assert all(kinds)
    scenes.data = type(scenes.data)(**{**scenes.data.__dict__, "beacon_fraction": 0.0})
    assert not any(scenes.scene_config(512, s).beacon for s in range(20))
    picks = scenes.scenes_for_step(3, 2)
    assert picks == scenes.scenes_for_step(3, 2)  # a pure function of (seed, step)
    assert np.all([size == 512 for size, _ in picks])


def test_tiling_crops_lie_where_the_engines_crops_start(tmp_path):
    from napari_xt.engine.plan import RegionPlan

    trainer = Trainer(_config([1024], pool=0), tmp_path / "run")
    scenes = trainer.scenes
    scenes.data = type(scenes.data)(**{**scenes.data.__dict__, "crop_places": "tiling",
                                       "beacon_fraction": 0.0})
    region = trainer.model_config.region.region_size
    scene = SyntheticScene(5, SceneConfig(height=1024, width=1024))
    _, origins = scenes.crops(scene, np.random.default_rng(0), 40, region)
    plan = RegionPlan(1024, 1024, region, trainer.model_config.crop_regions)
    starts = {(c.row0, c.col0) for c in plan.crops}
    drawn = {tuple(int(v) for v in o) for o in origins}
    assert drawn <= starts
    assert len(drawn) > len(starts) // 2  # not one place over and over
    with pytest.raises(ValueError, match="crop_places"):
        TrainConfig.from_dict({"data": {"crop_places": "border"}})


def test_crop_regions_carry_gradients_into_the_scene_with_its_values(tmp_path):
    from napari_xt.train.data import collate
    from napari_xt.train.whole_image import crop_cells

    cfg = _config([512], pool=0)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "run": {**cfg.to_dict()["run"], "freeze": []}})
    trainer = Trainer(cfg, tmp_path / "run")
    model, scenes = trainer.model, trainer.scenes
    model.eval()  # the scene pass and the crops' encoder see the same weights and mode
    scene = SyntheticScene(3, scenes.scene_config(512, 3))
    region = trainer.model_config.region.region_size
    samples, origins = scenes.crops(scene, np.random.default_rng(1), 2, region)
    summary = scene_summary(model, scene, trainer.normalization)
    images = collate(samples, 2.0)["image"]
    cells = crop_cells(model, summary, images, origins)
    torch.testing.assert_close(cells.detach(), summary.cells(), rtol=0, atol=0)
    tokens = model.encode_scene(summary, cells).tokens
    model.zero_grad(set_to_none=True)
    tokens.square().sum().backward()
    grads = [p.grad for p in model.region_encoder.parameters()]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    model.zero_grad(set_to_none=True)
    model.encode_scene(summary).tokens.square().sum().backward()  # the plain scene: none
    assert all(p.grad is None for p in model.region_encoder.parameters())


def test_a_beacon_scenes_first_crop_holds_the_beacon(tmp_path):
    trainer = Trainer(_config([2048], pool=0), tmp_path / "run")
    scenes = trainer.scenes
    scenes.data = type(scenes.data)(**{**scenes.data.__dict__, "crop_places": "tiling",
                                       "beacon_crop": True})
    region = trainer.model_config.region.region_size
    k = trainer.model_config.crop_regions
    for seed in range(24):
        scene = SyntheticScene(seed, scenes.scene_config(2048, seed))
        _, cy, cx = scene.beacon
        _, origins = scenes.crops(scene, np.random.default_rng(seed), 2, region)
        r0, c0 = origins[0]
        half = scene.config.beacon_px / 2  # the whole mark, not only its centre
        assert r0 * region <= cy - half and cy + half <= (r0 + k) * region
        assert c0 * region <= cx - half and cx + half <= (c0 + k) * region


def test_cells_through_keeps_the_values_and_splits_a_tied_maximum():
    from napari_xt.model.global_context import SceneGrid, SceneSummary

    summary = SceneSummary(SceneGrid.for_regions(4, 4, 2), 2)  # cells of 2 x 2 regions
    rc = np.array([(r, c) for r in range(4) for c in range(4)])
    v = torch.zeros(16, 2, dtype=torch.float64)
    v[:, 1] = torch.arange(16.0)
    summary.add(rc, v)
    x = v.float().clone().requires_grad_(True)
    cells = summary.cells_through(rc, x)
    assert torch.equal(cells.detach(), summary.cells())
    cells[..., 2].sum().backward()  # channel 0's maximum: all 4 regions of a cell tied
    torch.testing.assert_close(x.grad[:, 0], torch.full((16,), 0.25))
    x.grad = None
    summary.cells_through(rc, x)[..., 3].sum().backward()  # channel 1: one holder per cell
    assert float(x.grad[:, 1].sum()) == 4.0 and int((x.grad[:, 1] > 0).sum()) == 4


def test_fine_tuning_a_whole_image_model_with_shallow_summary_levels_starts_as_it(tmp_path):
    """Adding `summary_levels` and `whole_scene` to a whole-image checkpoint keeps every
    weight it has; only their maps start (silent), so the model predicts what it predicted.
    Any other change of its whole-image settings is refused."""
    from dataclasses import replace

    from napari_xt.model.checkpoint import load_checkpoint
    from napari_xt.model.demo_weights import BUILT_IN
    from napari_xt.train.loop import _fine_tuned

    start = BUILT_IN["demo-image"]
    saved = load_checkpoint(start)
    gc = saved.cfg.global_context
    cfg = replace(saved.cfg, global_context=replace(gc, summary_levels=(0, 1),
                                                    whole_scene=True))
    model = _fine_tuned(cfg, start).eval()
    assert model.global_context.cell_extra is not None
    assert model.global_context.whole is not None
    x = torch.randn(1, 2, 256, 320)
    with torch.no_grad():
        torch.testing.assert_close(model(x)["logits"], saved(x)["logits"], rtol=0, atol=0)
    from napari_xt.model.checkpoint import save_checkpoint

    image = save_checkpoint(model, Path(tmp_path) / "levels.safetensors")  # has whole_scene
    # settings that hold no weights may change as before (a coarser scene grid)
    coarse = _fine_tuned(replace(cfg, global_context=replace(cfg.global_context, grid=32)),
                         start)
    assert coarse.global_context.cfg.grid == 32
    with pytest.raises(ValueError, match="can be added to, not changed"):
        _fine_tuned(replace(cfg, global_context=replace(gc, summary_levels=())), image)
    whole_only = replace(saved.cfg, global_context=replace(gc, whole_scene=True))
    whole = save_checkpoint(_fine_tuned(whole_only, start), Path(tmp_path) / "whole.safetensors")
    with pytest.raises(ValueError, match="would change the width of its whole-scene map"):
        _fine_tuned(cfg, whole)


def test_a_whole_image_model_saved_before_the_summary_options_keeps_its_hash():
    """Configs leave out the later global_context fields at their defaults, so the shipped
    demo-image keeps the hash its runs, caches and stores were made with."""
    from napari_xt.model.checkpoint import HASH_KEY, load_checkpoint, model_hash, read_metadata
    from napari_xt.model.demo_weights import BUILT_IN

    path = BUILT_IN["demo-image"]
    assert model_hash(load_checkpoint(path)) == read_metadata(path)[HASH_KEY]


def test_a_fresh_whole_scene_map_is_standardized_on_training_scenes(tmp_path, monkeypatch):
    """A fresh `whole_scene` map takes the mean and spread of the pooled cells of the first
    steps' scenes at the first step, so those scenes come to it centred; a resumed run keeps
    the statistics of its checkpoint and does not compute them again."""
    from napari_xt.model.global_context import pooled_cells
    from napari_xt.train import whole_image

    cfg = _config([512], grid=8, pool=1000)
    data = cfg.to_dict()
    data["model"]["overrides"]["global_context"] = {"grid": 8, "summary_levels": [0],
                                                    "whole_scene": True}
    data["optim"]["batch_size"] = 3
    trainer = Trainer(TrainConfig.from_dict(data), tmp_path / "run")
    whole = trainer.model.global_context.whole
    assert not whole.has_statistics  # not before the first step needs them
    pooled = []
    for size, seed in trainer.scenes.scenes_for_step(0, 3):
        scene = SyntheticScene(seed, trainer.scenes.scene_config(size, seed))
        cells = scene_summary(trainer.model, scene, trainer.normalization).cells()
        pooled.append(pooled_cells(cells.reshape(1, -1, cells.shape[-1]))[0])
    trainer.train_step()
    assert whole.has_statistics
    z = (torch.stack(pooled) - whole.shift) / whole.scale
    assert z.mean(0).abs().max() < 1e-4
    assert 0.3 < float(z.std(0).median()) <= 1.0
    shift = whole.shift.clone()
    trainer.save()

    def computed_again(*args, **kwargs):
        raise AssertionError("a resumed run computed its whole-scene statistics again")

    monkeypatch.setattr(whole_image, "pooled_cells", computed_again)
    again = Trainer(TrainConfig.from_dict(data), tmp_path / "run")
    assert again.resume() == 1
    again.train_step()
    torch.testing.assert_close(again.model.global_context.whole.shift, shift, rtol=0, atol=0)


def test_scene_detectors_added_to_a_whole_scene_model_keep_its_weights(tmp_path):
    """Adding `scene_detectors` to a checkpoint with `whole_scene` (the shipped demo-beacon
    less its detectors) keeps every weight it has and adds only the detectors; a
    checkpoint's detectors may not change in number."""
    from dataclasses import replace

    from napari_xt.model.checkpoint import load_checkpoint, save_checkpoint
    from napari_xt.model.demo_weights import BUILT_IN
    from napari_xt.model.xt import XT
    from napari_xt.train.loop import _fine_tuned

    shipped = load_checkpoint(BUILT_IN["demo-beacon"])
    gc = replace(shipped.cfg.global_context, scene_detectors=0)
    saved = XT(replace(shipped.cfg, global_context=gc)).eval()
    result = saved.load_state_dict(shipped.state_dict(), strict=False)
    assert not result.missing_keys and all(
        k.startswith("global_context.whole.detect.") for k in result.unexpected_keys)
    start = save_checkpoint(saved, Path(tmp_path) / "whole.safetensors")
    cfg = replace(saved.cfg, global_context=replace(gc, scene_detectors=4))
    model = _fine_tuned(cfg, start)
    ours, theirs = model.state_dict(), saved.state_dict()
    assert sorted(set(ours) - set(theirs)) == sorted(
        f"global_context.whole.detect.{k}" for k in model.global_context.whole.detect
        .state_dict())
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=0)
    assert not model.global_context.whole.detect.has_statistics
    with_four = save_checkpoint(model, Path(tmp_path) / "four.safetensors")
    with pytest.raises(ValueError, match="can be added to, not changed"):
        _fine_tuned(replace(cfg, global_context=replace(gc, scene_detectors=2)), with_four)


def test_fresh_scene_detectors_are_standardized_on_training_regions(tmp_path):
    """Fresh detectors take the mean and spread of every region summary of the first
    steps' scenes; the training step scores every region of a scene with gradients, to the
    peaks the engine's streamed summary keeps; a size with its own pool
    (`data.scene_pools`) keeps its scenes' summaries, a size without one does not."""
    from napari_xt.train.whole_image import scene_peaks

    data = _config([256, 512], grid=8, pool=0).to_dict()
    data["data"]["scene_pools"] = [0, 2]
    data["model"]["overrides"]["global_context"] = {"grid": 8, "whole_scene": True,
                                                    "scene_detectors": 2}
    data["optim"]["batch_size"] = 2
    trainer = Trainer(TrainConfig.from_dict(data), tmp_path / "run")
    detect = trainer.model.global_context.whole.detect
    assert not detect.has_statistics
    trainer.train_step()
    assert detect.has_statistics and trainer.model.global_context.whole.has_statistics
    assert trainer.scenes.kept and {size for size, _ in trainer.scenes.kept} == {512}
    vectors = []
    for step in range(2):
        for size, seed in trainer.scenes.scenes_for_step(step, 2):
            scene = SyntheticScene(seed, trainer.scenes.scene_config(size, seed))
            vectors.append(scene_summary(trainer.model, scene, trainer.normalization).kept())
    z = detect.standardized(torch.cat(vectors))
    assert z.mean(0).abs().max() < 1e-3
    assert 0.3 < float(z.std(0).median()) <= 1.01

    summary = next(iter(trainer.scenes.kept.values()))
    assert len(summary.kept()) == summary.regions == 64
    peaks = scene_peaks(trainer.model, summary)
    assert peaks.requires_grad
    streamed = trainer.model.new_summary(8, 8, summary.kept().shape[1])
    for part in summary.kept().split(10):
        streamed.add(torch.zeros(len(part), 2, dtype=torch.int64), part)
    torch.testing.assert_close(peaks.detach(), streamed.peaks(), rtol=1e-5, atol=1e-5)
    peaks.sum().backward()
    assert detect.net[0].weight.grad is not None and detect.net[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("pools", [[1], [1, 2, 3], [1, -1], [0, 0, 2]])
def test_scene_pools_are_one_per_size(pools):
    data = _config([256, 512, 256]).to_dict()
    data["data"]["scene_pools"] = pools
    with pytest.raises(ValueError, match="scene_pools must give one pool"):
        TrainConfig.from_dict(data)
    data["data"]["scene_pools"] = [3, 0, 3]
    cfg = TrainConfig.from_dict(data).data
    assert (cfg.pool_for(256), cfg.pool_for(512)) == (3, 0)


def _kind_config(weight: float, detectors: int = 2, beacons: float = 1.0) -> TrainConfig:
    data = _config([256], grid=8, pool=4).to_dict()
    data["data"]["beacon_fraction"] = beacons
    data["model"]["overrides"]["global_context"] = {"grid": 8, "whole_scene": True,
                                                    "scene_detectors": detectors}
    data["optim"]["batch_size"] = 2
    data["loss"]["scene_weight"] = weight
    return TrainConfig.from_dict(data)


def test_the_scene_kind_loss_reads_the_detector_peaks_and_resumes(tmp_path):
    """`loss.scene_weight`: each beacon scene's detector peaks are read by a training-only
    Linear(K -> 1) against the scene's kind; the step's "scene" term is the mean binary
    cross-entropy over its beacon scenes, its gradient reaches the detectors, and the
    reader is saved with the training state and restored on resume."""
    from napari_xt.train.whole_image import scene_kind_loss, scene_peaks

    trainer = Trainer(_kind_config(0.5, beacons=0.5), tmp_path / "run")
    head = trainer.scene_head
    assert head is not None and head.in_features == 2
    before = {k: v.clone() for k, v in head.state_dict().items()}
    trainer.scenes.ensure_whole_statistics(trainer)

    def kinds(step):
        return [trainer.scenes.scene_config(size, seed).beacon
                for size, seed in trainer.scenes.scenes_for_step(step, 2)]

    step = next(t for t in range(50) if sorted(kinds(t)) == [False, True])  # one of each
    want = []
    with torch.no_grad():
        for size, seed in trainer.scenes.scenes_for_step(step, 2):
            scene = SyntheticScene(seed, trainer.scenes.scene_config(size, seed))
            if scene.beacon is None:
                continue
            summary = scene_summary(trainer.model, scene, trainer.normalization)
            want.append(float(scene_kind_loss(head, scene_peaks(trainer.model, summary),
                                              scene.beacon[0])))
    assert len(want) == 1
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.model.train()
    trainer._keep_frozen_eval()
    loss, terms = trainer.scenes.forward_backward(trainer, step)
    assert terms["scene"] == pytest.approx(0.5 * want[0], rel=1e-4)  # weighted, beacon only
    assert loss == pytest.approx(sum(terms.values()), rel=1e-5)
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    net = trainer.model.global_context.whole.detect.net[0].weight
    assert net.grad is not None and net.grad.abs().sum() > 0

    trainer.step = step
    trainer.train_step()
    assert any(not torch.equal(before[k], v) for k, v in head.state_dict().items())
    trainer.save()
    again = Trainer(_kind_config(0.5, beacons=0.5), tmp_path / "run")
    again.resume()
    for k, v in head.state_dict().items():
        torch.testing.assert_close(again.scene_head.state_dict()[k], v, rtol=0, atol=0)
    Trainer(_kind_config(0.0), tmp_path / "plain").save()  # a run without the reader
    with pytest.raises(ValueError, match="saved without loss.scene_weight"):
        Trainer(_kind_config(0.5, beacons=0.5), tmp_path / "plain").resume()


def test_the_scene_kind_loss_needs_scene_detectors_and_beacon_scenes(tmp_path):
    with pytest.raises(ValueError, match="scene_weight needs a model with"):
        Trainer(_kind_config(1.0, detectors=0), tmp_path / "run")
    with pytest.raises(ValueError, match="scene_weight needs scenes whose kind is known"):
        Trainer(_kind_config(1.0, beacons=0.0), tmp_path / "run")


def test_scene_kinds_alone_train_only_the_detectors(tmp_path):
    """`data.crops_per_scene: 0` with `loss.scene_weight`: a step is the scene-kind term of
    its beacon scenes alone; the detectors and the reader move, no other weight does; 0
    crops without the scene-level target is refused."""
    data = _kind_config(1.0).to_dict()
    data["data"]["crops_per_scene"] = 0
    trainer = Trainer(TrainConfig.from_dict(data), tmp_path / "run")
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    loss, terms = trainer.train_step()
    assert set(terms) == {"scene"} and loss == pytest.approx(terms["scene"]) and loss > 0
    after = dict(trainer.model.named_parameters())
    moved = {k for k, v in after.items() if not torch.equal(before[k], v)}
    detect = "global_context.whole.detect."
    assert moved and all(k.startswith(detect) for k in moved), moved
    assert any(k.startswith(detect + "net.") for k in moved)
    data["loss"]["scene_weight"] = 0.0
    with pytest.raises(ValueError, match="crops_per_scene 0 leaves only"):
        Trainer(TrainConfig.from_dict(data), tmp_path / "other")


def test_class_scale_weighs_each_sample_by_its_own_class_weights():
    from napari_xt.train.data import IGNORE_INDEX
    from napari_xt.train.losses import LossConfig, loss_terms

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    mask = torch.randint(0, 3, (2, 8, 8))
    mask[0, :2] = IGNORE_INDEX
    zeros = torch.zeros(2, 1, 8, 8)
    batch = {"mask": mask, "centre": zeros, "size": zeros, "size_weight": zeros}
    same = torch.tensor([[1.0, 3.0, 0.5]] * 2)
    fixed = loss_terms({"logits": logits}, batch, LossConfig(class_weights=(1.0, 3.0, 0.5)))
    scaled = loss_terms({"logits": logits}, dict(batch, class_scale=same), LossConfig())
    for a, b in zip(fixed["ce"], scaled["ce"]):
        torch.testing.assert_close(a, b)
    # a second sample weighed twice as much on class 2 weighs its class-2 pixels twice
    own = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 2.0]])
    ce = torch.nn.functional.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX,
                                           reduction="none")
    valid = mask != IGNORE_INDEX
    pixel = torch.where((mask == 2) & (torch.arange(2)[:, None, None] == 1), 2.0, 1.0) * valid
    s, n = loss_terms({"logits": logits}, dict(batch, class_scale=own), LossConfig())["ce"]
    torch.testing.assert_close(s, (ce * pixel).sum())
    torch.testing.assert_close(n, pixel.sum())


def test_class_growth_follows_the_scene_side():
    from napari_xt.train.losses import LossConfig

    cfg = LossConfig(class_weights=(1.0, 2.0, 1.0), class_growth=(0.5, 0.0, 1.0))
    torch.testing.assert_close(cfg.class_scale(256, 3), torch.tensor([1.0, 2.0, 1.0]))
    torch.testing.assert_close(cfg.class_scale(2048, 3), torch.tensor([2.0, 2.0, 4.0]))
    assert LossConfig().class_scale(4096, 3) is None
    with pytest.raises(ValueError, match="class_growth must be >= 0"):
        LossConfig(class_growth=(0.5, float("nan"), 0.0))
    with pytest.raises(ValueError, match="growth_from must be a positive"):
        LossConfig(growth_from=0)


def _growth_config(growth, sizes=(1024,)) -> TrainConfig:
    cfg = _config(list(sizes)).to_dict()
    cfg["data"]["beacon_fraction"] = 0.0
    cfg["loss"]["class_growth"] = growth
    return TrainConfig.from_dict(cfg)


def test_class_growth_weighs_the_crops_of_a_larger_scene(tmp_path):
    seen = []
    trainer = Trainer(_growth_config([1.0, 0.0, 0.0]), tmp_path / "run")
    real = trainer.forward_backward

    def keep(batch, step, counts, *args, **kwargs):
        seen.append((batch, counts))
        return real(batch, step, counts, *args, **kwargs)

    trainer.forward_backward = keep
    grown, _ = trainer.scenes.forward_backward(trainer, 0)
    batch, counts = seen[0]
    assert batch["class_scale"].tolist() == [[2.0, 1.0, 1.0]] * 2  # 1024 px = 2 x 512
    from napari_xt.train.data import IGNORE_INDEX

    mask = batch["mask"]
    weights = torch.tensor([2.0, 1.0, 1.0])[mask.clamp(0, 2)][mask != IGNORE_INDEX]
    assert counts["ce"] == pytest.approx(float(weights.sum()))
    plain = Trainer(_growth_config([0.0, 0.0, 0.0]), tmp_path / "plain")
    same, _ = plain.scenes.forward_backward(plain, 0)  # the same scene and crops, unweighted
    assert grown != pytest.approx(same)


def test_class_growth_needs_whole_image_training_and_one_exponent_per_class(tmp_path):
    with pytest.raises(ValueError, match="class_growth has 2 entries for 3 classes"):
        Trainer(_growth_config([0.5, 0.0]), tmp_path / "run")
    cfg = _growth_config([0.5, 0.0, 0.5]).to_dict()
    cfg["model"]["overrides"] = {}
    cfg["data"]["scene_sizes"] = []
    with pytest.raises(ValueError, match="class_growth weighs pixels by the size"):
        Trainer(TrainConfig.from_dict(cfg), tmp_path / "run2")
