"""`napari-xt predict` end to end on a synthetic scene: exit codes, store contents, resume."""

import numpy as np
import pytest
import torch

from napari_xt.cli import main


@pytest.fixture
def scene(tmp_path):
    path = tmp_path / "scene.npy"
    img = np.random.default_rng(0).integers(0, 255, (640, 520, 3), dtype=np.uint8)
    np.save(path, img)
    return path


def test_predict_writes_a_store_and_resumes(scene, tmp_path, capsys, monkeypatch):
    import napari_xt.engine as engine
    from napari_xt.engine import ContextStep

    out = tmp_path / "out.zarr"
    real_run = engine.run
    seen = {}

    def cancelling_run(*args, cancel=None, **kw):  # presses Ctrl-C after two crops
        def events():
            steps = 0
            for e in real_run(*args, cancel=cancel, **kw):
                if isinstance(e, ContextStep):
                    steps += 1
                    if steps == 2:
                        cancel.set()
                yield e
        seen["cancel"] = cancel
        return events()

    monkeypatch.setattr(engine, "run", cancelling_run)
    code = main(["predict", str(scene), "--model", "xt_tiny_demo_seg", "--out", str(out),
                 "--batch-size", "4"])
    assert code == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    monkeypatch.setattr(engine, "run", real_run)

    code = main(["predict", str(scene), "--model", "xt_tiny_demo_seg", "--out", str(out),
                 "--batch-size", "4"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "resuming:" in err and "from cache" in err

    from napari_xt.io import list_results, read_labels

    assert list_results(out)["labels"] == ["prediction"]
    labels = read_labels(out, "prediction")
    assert labels.levels[0].shape == (640, 520)
    assert labels.levels[0].dtype == np.uint8
    values = np.unique(np.asarray(labels.levels[0]))
    assert set(values.tolist()) <= {0, 1}

    import zarr

    attrs = zarr.open_group(str(out), mode="r").attrs["napari-xt"]
    assert attrs["complete"] is True and attrs["model"] == "xt_tiny_demo_seg"
    assert len(attrs["model_hash"]) == 64 and attrs["created"].endswith("+00:00")

    # same weights as the CLI's seeded zoo model: the store matches a direct engine run
    torch.manual_seed(0)
    from napari_xt.model import create_model

    model = create_model("xt_tiny_demo_seg")
    img = np.load(scene)
    direct = list(real_run(img, model, None, cache=tmp_path / "emb.zarr"))[-1]  # fp16 as CLI
    np.testing.assert_array_equal(np.asarray(labels.levels[0]),
                                  direct.summary["arrays"]["labels"])


def test_bad_input_exit_codes(scene, tmp_path, capsys):
    gray = tmp_path / "gray.npy"
    np.save(gray, np.zeros((100, 100), np.uint8))
    out = str(tmp_path / "o.zarr")
    assert main(["predict", str(gray), "--model", "xt_tiny_demo_seg", "--out", out]) == 2
    assert "expects 3" in capsys.readouterr().err
    assert main(["predict", str(scene), "--model", "xt_tiny_dmeo_seg", "--out", out]) == 2
    assert "close names" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing.npy"), "--model", "xt_tiny_demo_seg",
                 "--out", out]) == 2
    assert main(["predict", str(scene), "--model", "xt_tiny_demo_seg", "--out", out,
                 "--quiet", "--threshold", "0.3"]) == 0
    # another run into the same store needs --overwrite
    assert main(["predict", str(scene), "--model", "xt_tiny_demo_seg", "--out", out,
                 "--threshold", "0.6"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert main(["predict", str(scene), "--model", "xt_tiny_demo_seg", "--out", out,
                 "--threshold", "0.6", "--overwrite", "--quiet"]) == 0
    # merging crops by outputs instead of tokens is another run too; provenance says which
    assert main(["predict", str(scene), "--model", "xt_tiny_demo_seg", "--out", out,
                 "--threshold", "0.6", "--blend", "outputs"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert main(["predict", str(scene), "--model", "xt_tiny_demo_seg", "--out", out,
                 "--threshold", "0.6", "--blend", "outputs", "--overwrite", "--quiet"]) == 0
    import zarr

    assert zarr.open_group(out, mode="r").attrs["napari-xt"]["settings"]["blend"] == "outputs"
