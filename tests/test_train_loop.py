"""The training loop: loss goes down, exact resume, streaming and grad_ratio, and the CLI."""

import copy

import pytest
import torch
import yaml

from napari_xt.cli import main
from napari_xt.train.config import TrainConfig, load_config
from napari_xt.train.loop import Trainer, cosine_with_warmup

TINY = {
    "model": {
        "zoo": "xt_tiny_demo_seg",
        "overrides": {
            "name": "tiny_train_test",
            "in_chans": 2,
            "num_classes": 3,
            "region": {"backbone": "test_convnext3", "region_size": 32},
            "tokenizer": {"region_size": 32},
            "context": {"kind": "hyper", "dim": 32, "depth": 1, "head_dim": 16,
                        "mlp_dim": 64, "causal": False},
            "head": {"kind": "segmentation", "num_classes": 3,
                     "outputs": [["centre", 1], ["size", 1]],
                     "decoder_channels": [8, 8, 8, 8, 8]},
            "crop_regions": 2,
        },
    },
    "data": {
        "kind": "synthetic",
        "scene": {"height": 64, "width": 64, "min_body_px": 200, "sea_depth_px": [12, 30],
                  "margin_px": 4, "feature_px": 8, "target_cell": 16},
        "val_count": 2,
        "normalize": {"mean": [-14.0, -22.0], "std": [7.0, 7.0]},
    },
    "optim": {"steps": 40, "batch_size": 2, "lr": 0.003, "warmup_steps": 2},
    "loss": {},
    "run": {"threads": 2, "checkpoint_every": 0, "eval_every": 0, "log_every": 1},
}


def tiny(**changes) -> TrainConfig:
    data = copy.deepcopy(TINY)
    for section, values in changes.items():
        if section == "context":
            data["model"]["overrides"]["context"].update(values)
        else:
            data[section].update(values)
    return TrainConfig.from_dict(data)


def fixed_batch_loss(trainer: Trainer, step: int = 10_000) -> float:
    batch = trainer.batch_for_step(step)
    loss, _ = trainer.forward_backward(batch, step)
    trainer.optimizer.zero_grad(set_to_none=True)
    return loss


@pytest.mark.slow
def test_a_few_steps_reduce_the_loss(tmp_path):
    trainer = Trainer(tiny(), tmp_path)
    before = fixed_batch_loss(trainer)
    trainer.fit()
    after = fixed_batch_loss(trainer)
    assert after < 0.8 * before
    assert (tmp_path / "model.safetensors").is_file()


def _losses(events):
    return [e.loss for e in events if e.kind == "step"]


def test_resume_continues_exactly(tmp_path):
    cfg = tiny(optim={"steps": 6}, run={"checkpoint_every": 3, "grad_ratio": 0.5},
               loss={"token_weight": 0.5})
    full_events = []
    full = Trainer(cfg, tmp_path / "full", full_events.append)
    full.fit()

    first_events = []
    Trainer(cfg, tmp_path / "cut", first_events.append).fit(steps=3)
    resumed_events = []
    resumed = Trainer(cfg, tmp_path / "cut", resumed_events.append)
    assert resumed.resume() == 3
    resumed.fit()

    assert _losses(first_events) == _losses(full_events)[:3]
    assert _losses(resumed_events) == _losses(full_events)[3:]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert resumed.scheduler.get_last_lr() == full.scheduler.get_last_lr()
    torch.testing.assert_close(full.token_head.weight, resumed.token_head.weight, rtol=0, atol=0)


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        Trainer(tiny(), tmp_path).resume()


def test_streaming_bands_give_the_whole_crop_gradient(tmp_path):
    """Region-only: bands do not interact, so streaming must reproduce loss and gradients."""
    cfg = tiny(context={"kind": "none", "depth": 0})
    whole = Trainer(cfg, tmp_path / "a")
    banded = Trainer(tiny(context={"kind": "none", "depth": 0}, run={"stream_rows": 1}),
                     tmp_path / "b")
    banded.model.load_state_dict(whole.model.state_dict())
    batch = whole.batch_for_step(0)
    loss_a, _ = whole.forward_backward(batch, 0)
    loss_b, _ = banded.forward_backward(batch, 0)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for (name, p), q in zip(whole.model.named_parameters(), banded.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_streaming_with_transformer_xl_memory_trains(tmp_path):
    # Streamed band by band, the second band sees the first only through the memory:
    # with the same weights and batch, the loss must differ from a run without memory.
    def xl(mem_len, folder, **kw):
        return Trainer(tiny(context={"kind": "transformer_xl", "chunk_len": 4,
                                     "mem_len": mem_len},
                            run={"stream_rows": 1}, **kw), tmp_path / folder)

    with_memory, without = xl(8, "m"), xl(0, "n")
    without.model.load_state_dict(with_memory.model.state_dict())
    batch = with_memory.batch_for_step(0)
    loss_m, _ = with_memory.forward_backward(batch, 0)
    loss_n, _ = without.forward_backward(batch, 0)
    assert abs(loss_m - loss_n) > 1e-6 * abs(loss_n)
    events = []
    Trainer(tiny(context={"kind": "transformer_xl", "chunk_len": 4, "mem_len": 8},
                 run={"stream_rows": 1}, optim={"steps": 3}), tmp_path / "fit",
            events.append).fit()
    assert len(_losses(events)) == 3 and all(torch.isfinite(torch.tensor(_losses(events))))


def test_grad_ratio_keeps_the_forward_and_limits_encoder_gradients(tmp_path):
    full = Trainer(tiny(), tmp_path / "a")
    part = Trainer(tiny(run={"grad_ratio": 0.25}), tmp_path / "b")
    part.model.load_state_dict(full.model.state_dict())
    batch = full.batch_for_step(0)
    loss_full, _ = full.forward_backward(batch, 0)
    loss_part, _ = part.forward_backward(batch, 0)
    assert loss_full == pytest.approx(loss_part, rel=1e-5)
    head_a = dict(full.model.head.named_parameters())
    for name, q in part.model.head.named_parameters():
        torch.testing.assert_close(head_a[name].grad, q.grad, rtol=1e-3, atol=5e-5)
    enc_a = [p.grad for p in full.model.region_encoder.parameters()]
    enc_b = [p.grad for p in part.model.region_encoder.parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(enc_a, enc_b))


def test_checkpointing_option_gives_the_same_gradients(tmp_path):
    plain = Trainer(tiny(), tmp_path / "a")
    recomputed = Trainer(tiny(run={"checkpointing": True}), tmp_path / "b")
    recomputed.model.load_state_dict(plain.model.state_dict())
    batch = plain.batch_for_step(1)
    plain.forward_backward(batch, 1)
    recomputed.forward_backward(batch, 1)
    for p, q in zip(plain.model.parameters(), recomputed.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_token_targets_are_class_fractions_per_token_cell():
    from napari_xt.train.losses import token_class_targets, token_loss_sum

    mask = torch.zeros(1, 4, 4, dtype=torch.int64)
    mask[0, :2, :2] = 1
    mask[0, 0, 0] = 2
    mask[0, 3, 3] = 255
    t = token_class_targets(mask, 2, 3)  # (1, 3, 2, 2)
    torch.testing.assert_close(t[0, :, 0, 0], torch.tensor([0.0, 0.75, 0.25]))
    torch.testing.assert_close(t[0, :, 1, 1], torch.tensor([0.75, 0.0, 0.0]))
    positions = torch.tensor([[[0, 0], [1, 1]]])
    good = torch.tensor([[[0.0, 9.0, 0.0], [9.0, 0.0, 0.0]]])
    bad = torch.tensor([[[9.0, 0.0, 0.0], [0.0, 9.0, 0.0]]])
    assert token_loss_sum(good, t, positions) < token_loss_sum(bad, t, positions)


def test_schedule_warms_up_then_decays():
    f = cosine_with_warmup(10, 100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55, abs=1e-6) and f(100) == pytest.approx(0.1)


def test_unknown_config_keys_are_errors():
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict({"optim": {"stepz": 3}})


def test_cli_trains_prints_progress_and_resumes(tmp_path, capsys):
    cfg = copy.deepcopy(TINY)
    cfg["optim"]["steps"] = 4
    cfg["run"].update(checkpoint_every=2, eval_every=4)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert load_config(path).optim.steps == 4
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "step 2/4" in printed and "checkpoint" in printed
    assert not (out / "model.safetensors").exists()
    assert main(["train", str(path), "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resumed at step 2" in printed and "miou=" in printed and "[      done]" in printed
    assert (out / "model.safetensors").is_file()
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2


def test_zero_init_silences_the_named_parameters(tmp_path):
    data = copy.deepcopy(TINY)
    data["model"]["zero_init"] = ["context.layers.0.attn.proj"]
    trainer = Trainer(TrainConfig.from_dict(data), tmp_path)
    proj = trainer.model.context.layers[0].attn.proj
    assert proj.weight.abs().sum() == 0 and proj.bias.abs().sum() == 0
    data["model"]["zero_init"] = ["no_such_module"]
    with pytest.raises(ValueError, match="matches no parameter"):
        Trainer(TrainConfig.from_dict(data), tmp_path / "b")


def test_scene_sizes_take_turns_by_step(tmp_path):
    trainer = Trainer(tiny(data={"scene_sizes": [64, 96]}), tmp_path)
    assert trainer.batch_for_step(0)["image"].shape[-2:] == (64, 64)
    assert trainer.batch_for_step(1)["image"].shape[-2:] == (96, 96)
    assert trainer.batch_for_step(2)["image"].shape[-2:] == (64, 64)
    loss, _ = trainer.forward_backward(trainer.batch_for_step(1), 1)  # a 3 x 3 region crop
    assert loss == loss and loss > 0
    with pytest.raises(ValueError, match="scene_sizes"):
        tiny(data={"scene_sizes": [0]})


def test_training_starts_from_a_local_timm_backbone_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    base = timm.create_model("test_convnext3", pretrained=False, in_chans=2, num_classes=5)
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    trainer = Trainer(tiny(model={"region_weights": str(path)}), tmp_path / "run")
    ours = list(trainer.model.region_encoder.state_dict().values())
    loaded = [v for k, v in base.state_dict().items() if not k.startswith("head")]
    assert loaded and all(any(o.shape == v.shape and torch.equal(o, v) for o in ours)
                          for v in loaded)  # every backbone tensor, as in the file
    with pytest.raises(ValueError, match="region_weights: no file"):
        Trainer(tiny(model={"region_weights": str(tmp_path / "missing.safetensors")}),
                tmp_path / "run2")
    with pytest.raises(ValueError, match="start a new model"):
        tiny(model={"zoo": None, "overrides": {}, "checkpoint": "demo",
                    "region_weights": str(path)}).model.build_config()


def test_lr_scale_gives_the_named_parameters_their_own_rate(tmp_path):
    """`optim.lr_scale` multiplies the rate of parameters by name prefix (the longest prefix
    wins), through warm-up and decay; an unknown prefix or a factor <= 0 is an error."""
    trainer = Trainer(tiny(optim={"lr_scale": {"context": 10.0, "context.layers.0.mlp": 0.5}}),
                      tmp_path / "a")
    rate = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    named = dict(trainer.model.named_parameters())
    base = rate[id(named["head.outputs.centre.weight"])]
    for name, p in named.items():
        want = 0.5 if name.startswith("context.layers.0.mlp") else (
            10.0 if name.startswith("context") else 1.0)
        assert rate[id(p)] == pytest.approx(base * want), name
    trainer.optimizer.step()
    trainer.scheduler.step()
    rate = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert rate[id(named["context.layers.0.attn.qkv.bias"])] == pytest.approx(
        10 * rate[id(named["head.outputs.centre.weight"])])
    with pytest.raises(ValueError, match="no parameter of the model starts with"):
        Trainer(tiny(optim={"lr_scale": {"no_such_part": 2.0}}), tmp_path / "b")
    with pytest.raises(ValueError, match="factors must be numbers > 0"):
        tiny(optim={"lr_scale": {"context": 0}})
