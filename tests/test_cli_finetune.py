"""The annotator loop from the command line: predict with the demo model, correct a window,
export training pairs, fine-tune the demo model on them."""

import numpy as np
import yaml

from napari_xt.cli import main
from napari_xt.io.corrections import save_window
from napari_xt.train.synthetic import SceneConfig, make_scene


def test_predict_correct_export_finetune(tmp_path, capsys):
    image, truth, _ = make_scene(2_000_000_005, SceneConfig(height=256, width=256))
    scene = tmp_path / "scene.npy"
    np.save(scene, image)  # (2, 256, 256) dB
    store = tmp_path / "scene.xt.zarr"
    assert main(["predict", str(scene), "--model", "demo", "--out", str(store)]) == 0
    from napari_xt.io import list_results

    # by default a segmentation model with a centre map writes its detections too
    assert list_results(store)["tables"] == ["prediction"]
    save_window(store, "prediction", (0, 0, 128, 128), truth[:128, :128])
    from napari_xt.widgets.correction_jobs import recorded_image

    assert recorded_image(store) == str(scene.resolve())  # what the widget exports from

    pairs = tmp_path / "pairs"
    assert main(["export-pairs", str(store), str(scene), "--out", str(pairs),
                 "--margin", "64"]) == 0
    out = capsys.readouterr().out
    assert "rows 0:192, columns 0:192, 1 edit(s), 16,384 labelled pixels" in out
    assert main(["export-pairs", str(store), str(scene), "--out", str(pairs)]) == 2
    assert "already holds 1 pair(s)" in capsys.readouterr().err
    other = tmp_path / "other.npy"
    np.save(other, image[:, :, ::-1].copy())
    assert main(["export-pairs", str(store), str(other), "--out", str(tmp_path / "o")]) == 2
    assert "differs from the one the run was made on" in capsys.readouterr().err

    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"checkpoint": "demo"},
        "data": {"kind": "zarr", "train_paths": [str(pairs)], "crop_size": 128},
        "optim": {"steps": 2, "batch_size": 2, "lr": 1e-4, "warmup_steps": 1},
        "run": {"threads": 2, "checkpoint_every": 0, "eval_every": 0, "log_every": 1},
    }))
    assert main(["train", str(config), "--out", str(tmp_path / "ft")]) == 0
    model = tmp_path / "ft" / "model.safetensors"
    assert model.is_file()
    # the fine-tuned checkpoint carries the demo model's normalization and runs as a model
    from napari_xt.model.choice import load_model

    _, _, normalization = load_model(str(model))
    assert np.allclose(np.ravel(normalization[0]), [-14.0, -22.0])
    assert main(["predict", str(scene), "--model", str(model),
                 "--out", str(tmp_path / "again.zarr")]) == 0


def test_bad_fine_tuning_configs_are_bad_input(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"checkpoint": str(tmp_path / "missing.safetensors")},
        "data": {"kind": "zarr", "train_paths": [str(tmp_path)]}}))
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "no file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start
    scene = tmp_path / "a.npy"
    np.save(scene, np.zeros((2, 64, 64), np.float32))
    assert main(["predict", str(scene), str(scene), "--model", str(tmp_path / "none.st"),
                 "--out-dir", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
