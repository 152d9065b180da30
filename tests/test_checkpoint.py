"""Checkpoints: our safetensors format and imports of official xT trainer checkpoints."""

import os
import re

import pytest
import torch

from napari_xt.model import (
    CheckpointError,
    create_model,
    import_official_checkpoint,
    load_checkpoint,
    model_hash,
    read_metadata,
    save_checkpoint,
)
from napari_xt.model.checkpoint import official_to_ours, ours_to_official


def _randomized(name, **kw):
    model = create_model(name, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _logits(model, x):
    with torch.no_grad():
        return model(x)["logits"]


def _official_state(model):
    """Our weights under the official xT names, written out rule by rule (not via our map)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("attn.lsh_projections"):
            continue  # ours only: the official hyperplanes are not persistent
        for ours, theirs in (
            ("region_encoder.model.", "encoder.model."),
            ("context.layers.", "decoder.layers."),
            ("input_proj.", "decoder.input_proj."),
            ("head.cls.", "decoder.cls."),
            ("head.mlp.", "decoder.layers."),
            ("cls_token", "decoder.cls_token"),
        ):
            if key.startswith(ours):
                out[theirs + key[len(ours) :]] = value.clone()
                break
        else:
            raise AssertionError(f"no official name for {key}")
    return out


def _write_official(path, state, epoch=3):
    torch.save(
        {
            "epoch": epoch,
            "state_dict": {"module." + k: v for k, v in state.items()},
            "optimizer_state_dict": {"state": {}, "param_groups": []},
            "metrics": {"accuracy_top1": 0.5},
        },
        path,
    )


def test_save_load_gives_identical_outputs(tmp_path):
    model = _randomized("xt_tiny_demo")
    path = save_checkpoint(model, tmp_path / "m.safetensors", extra_metadata={"note": "hi"})
    meta = read_metadata(path)
    assert meta["note"] == "hi" and '"name":"xt_tiny_demo"' in meta["napari_xt.config"]
    loaded = load_checkpoint(path)
    assert loaded.cfg == model.cfg and not loaded.training
    x = torch.randn(1, 3, 256, 256)
    assert torch.equal(_logits(loaded, x), _logits(model, x))
    assert model_hash(loaded) == model_hash(model) == meta["napari_xt.hash"]


def test_segmentation_round_trip(tmp_path):
    model = _randomized("xt_tiny_demo_seg")
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "seg.safetensors"))
    x = torch.randn(1, 3, 128, 200)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_never_overwrites_without_permission(tmp_path):
    first, second = _randomized("xt_tiny_demo_region_only"), _randomized("xt_tiny_demo_region_only")
    path = save_checkpoint(first, tmp_path / "m.safetensors")
    with pytest.raises(FileExistsError):
        save_checkpoint(second, path)
    assert model_hash(load_checkpoint(path)) == model_hash(first)
    save_checkpoint(second, path, overwrite=True)
    assert model_hash(load_checkpoint(path)) == model_hash(second) != model_hash(first)
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary files left behind


def test_model_hash_is_stable_and_content_sensitive():
    model = create_model("xt_tiny_demo_region_only")
    h = model_hash(model)
    assert h == model_hash(model) and re.fullmatch(r"[0-9a-f]{64}", h)
    with torch.no_grad():
        model.head.mlp[3].bias[0] += 1.0
    assert model_hash(model) != h


@pytest.mark.parametrize(
    "name", ["xt_tiny_demo", "xt_tiny_demo_mamba", "xt_tiny_demo_region_only"]
)
def test_official_import_round_trip(tmp_path, name):
    source = _randomized(name)
    path = tmp_path / "official.ckpt"
    _write_official(path, _official_state(source))
    imported = import_official_checkpoint(path, name, strict=True)
    x = torch.randn(1, 3, 256, 256)
    assert torch.equal(_logits(imported, x), _logits(source, x))


def test_official_import_names_missing_unexpected_and_mismatched_keys(tmp_path):
    state = _official_state(_randomized("xt_tiny_demo"))
    del state["decoder.layers.1.mlp.up_proj.weight"]
    state["decoder.layers.1.extra.weight"] = torch.zeros(2)
    state["decoder.cls.1.weight"] = torch.zeros(5, 128)
    path = tmp_path / "bad.ckpt"
    _write_official(path, state)
    with pytest.raises(CheckpointError) as err:
        import_official_checkpoint(path, "xt_tiny_demo")
    msg = str(err.value)
    assert "context.layers.1.mlp.up_proj.weight" in msg
    assert "decoder.layers.1.extra.weight" in msg
    assert "head.cls.1.weight (5, 128) vs model (10, 128)" in msg
    # non-strict tolerates missing/unexpected keys, never a wrong shape
    with pytest.raises(CheckpointError, match="shape mismatches"):
        import_official_checkpoint(path, "xt_tiny_demo", strict=False)
    state["decoder.cls.1.weight"] = torch.zeros(10, 128)
    _write_official(path, state)
    model = import_official_checkpoint(path, "xt_tiny_demo", strict=False)
    assert torch.equal(model.head.cls[1].weight, torch.zeros(10, 128))


def test_official_key_names_for_swin():
    with torch.device("meta"):
        model = create_model("xt_swin_t_hyper_512_256")
    official = ours_to_official(model)
    for key in (
        "encoder.model.patch_embed.proj.weight",
        "encoder.model.layers_0.blocks.0.attn.qkv.weight",
        "encoder.model.layers_0.blocks.1.attn.cpb_mlp.0.weight",
        "encoder.model.layers_1.downsample.reduction.weight",
        "encoder.model.layers_3.blocks.1.mlp.fc2.bias",
        "decoder.input_proj.weight",
        "decoder.layers.1.attn.qkv.bias",
        "decoder.layers.0.mlp.gate_proj.weight",
        "decoder.layers.1.post_attention_layernorm.weight",
        "decoder.cls_token",
        "decoder.cls.0.weight",
        "decoder.cls.1.bias",
    ):
        assert key in official, key
    # a file from an older timm: downsample at the end of a stage, persistent swin buffers
    old = {}
    for key, value in official.items():
        m = re.match(r"encoder\.model\.layers_(\d)\.downsample\.(.*)", key)
        old[f"encoder.model.layers_{int(m[1]) - 1}.downsample.{m[2]}" if m else key] = value
    old["encoder.model.layers_0.blocks.0.attn.relative_position_index"] = torch.zeros(1)
    renamed, unmapped = official_to_ours(model, old)
    assert unmapped == []
    expected = {k for k in model.state_dict() if not k.endswith("lsh_projections")}
    assert set(renamed) == expected
    assert renamed["region_encoder.model.layers_1.downsample.norm.weight"].shape == (192,)


def test_corrupt_and_foreign_files_raise_checkpoint_errors(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="weights_only"):
        import_official_checkpoint(garbage, "xt_tiny_demo")
    good = save_checkpoint(_randomized("xt_tiny_demo_region_only"), tmp_path / "good.safetensors")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError):
        load_checkpoint(truncated)
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))
    with pytest.raises(CheckpointError, match="content hash"):
        load_checkpoint(flipped)
    pickle = tmp_path / "official.ckpt"
    torch.save({"epoch": 1, "metrics": {"a": 1.0}}, pickle)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        import_official_checkpoint(pickle, "xt_tiny_demo")
    with pytest.raises(CheckpointError, match="import_official_checkpoint"):
        load_checkpoint(pickle)


def test_config_missing_is_an_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file(dict(create_model("xt_tiny_demo_region_only").state_dict()), path)
    with pytest.raises(CheckpointError, match="no napari-xt config"):
        load_checkpoint(path)


def test_channel_count_mismatch(tmp_path):
    model = _randomized("xt_tiny_demo", in_chans=2)
    path = save_checkpoint(model, tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError, match="expects 2 channels, 3 were requested"):
        load_checkpoint(path, in_chans=3)
    assert load_checkpoint(path, in_chans=2).cfg.in_chans == 2
    official = tmp_path / "two.ckpt"
    _write_official(official, _official_state(model))
    with pytest.raises(CheckpointError, match="takes 2 channels, the model 3"):
        import_official_checkpoint(official, "xt_tiny_demo")
    x = torch.randn(1, 2, 128, 128)
    imported = import_official_checkpoint(official, "xt_tiny_demo", in_chans=2)
    assert torch.equal(_logits(imported, x), _logits(model, x))
