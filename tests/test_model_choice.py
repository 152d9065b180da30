"""A model choice (demo / zoo name / checkpoint path) resolves the same way everywhere."""

import numpy as np
import pytest
import torch

from napari_xt.cli import main
from napari_xt.io import read_labels
from napari_xt.model import save_checkpoint
from napari_xt.model.choice import load_model


def test_demo_alias_loads_the_shipped_model_with_its_normalization():
    model, what, normalize = load_model("demo")
    assert what == "built-in demo model"
    assert model.cfg.in_chans == 2 and not model.training
    mean, std = normalize
    assert len(mean) == len(std) == 2


def test_zoo_names_are_seeded_and_checkpoints_keep_their_weights(tmp_path):
    a, _, _ = load_model("xt_tiny_demo_seg")
    b, _, _ = load_model("xt_tiny_demo_seg")
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    path = save_checkpoint(a, tmp_path / "m.safetensors")
    c, what, normalize = load_model(str(path))
    assert what == "checkpoint m.safetensors" and normalize is None
    torch.testing.assert_close(next(c.parameters()), next(a.parameters()))


def test_bad_choices_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_model(str(tmp_path / "missing.safetensors"))
    with pytest.raises(KeyError, match="xt_tiny_demo"):
        load_model("xt_tiny_dem")


def test_predict_with_the_builtin_model(tmp_path):
    from napari_xt.train.synthetic import SceneConfig, make_scene

    image, mask, _ = make_scene(123, SceneConfig(height=256, width=256))
    npy = tmp_path / "scene.npy"
    np.save(npy, np.asarray(image, np.float32))  # (C, H, W) dB
    out = tmp_path / "out.zarr"
    assert main(["predict", str(npy), "--model", "demo", "--out", str(out), "--quiet",
                 "--threads", "1"]) == 0
    labels = np.asarray(read_labels(out, "prediction").levels[0])
    assert labels.shape == (256, 256)
    water = np.asarray(mask) > 0
    # the built-in model separates land from water on a held-out scene
    assert ((labels > 0) == water).mean() > 0.9
