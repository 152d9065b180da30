"""Many images: one engine run per image, in this process or on worker processes; a bad
image is reported without stopping the others; the same results as single runs."""

import threading

import numpy as np
import pytest

from napari_xt.cli import main
from napari_xt.distributed import ImageOutcome, output_stores, predict_many, store_name
from napari_xt.io import read_labels
from napari_xt.train.synthetic import SceneConfig, make_scene


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for seed in range(3):
        image, _, _ = make_scene(seed, SceneConfig(height=192, width=256))
        np.save(folder / f"scene{seed}.npy", image)
        paths.append(str(folder / f"scene{seed}.npy"))
    (folder / "broken.npy").write_text("not an array")
    return paths, str(folder / "broken.npy")


def single_run_labels(image, tmp_path):
    out = tmp_path / "single.zarr"
    assert main(["predict", image, "--model", "demo", "--out", str(out), "--quiet"]) == 0
    return np.asarray(read_labels(out, "prediction").levels[0])


def test_store_names_and_clashes(tmp_path):
    assert store_name("/data/scan.ome.tiff") == "scan.xt.zarr"
    assert store_name("a.b.npy") == "a.b.xt.zarr"
    assert [p.name for p in output_stores(["x/a.svs", "y/b.svs"], tmp_path)] == \
        ["a.xt.zarr", "b.xt.zarr"]
    with pytest.raises(ValueError, match="would both write"):
        output_stores(["x/a.svs", "y/a.ome.zarr"], tmp_path)


def test_one_process_runs_every_image_and_reports_the_broken_one(images, tmp_path):
    paths, broken = images
    outcomes = list(predict_many([paths[0], broken, paths[1]], "demo", tmp_path / "out"))
    assert [o.outcome for o in outcomes] == ["finished", "failed", "finished"]
    assert "not a .npy file" in outcomes[1].message
    assert outcomes[0].regions == 3 * 4 and outcomes[0].encoded == 12
    labels = np.asarray(read_labels(tmp_path / "out" / "scene0.xt.zarr", "prediction").levels[0])
    assert np.array_equal(labels, single_run_labels(paths[0], tmp_path))
    # again: every store is complete, nothing is encoded twice
    again = list(predict_many(paths[:2], "demo", tmp_path / "out"))
    assert [(o.outcome, o.encoded) for o in again] == [("finished", 0), ("finished", 0)]


def test_cancel_stops_the_running_image_and_skips_the_rest(images, tmp_path):
    paths, _ = images
    cancel = threading.Event()
    cancel.set()
    outcomes = list(predict_many(paths, "demo", tmp_path / "out", cancel=cancel))
    assert {o.outcome for o in outcomes} == {"skipped"}


@pytest.mark.slow
def test_worker_processes_give_the_same_results(images, tmp_path, cluster):
    paths, broken = images
    outcomes = list(predict_many([*paths, broken], "demo", tmp_path / "out", threads=1,
                                 scheduler=cluster))
    by_image = {o.image: o for o in outcomes}
    assert all(isinstance(o, ImageOutcome) for o in outcomes) and len(outcomes) == 4
    assert by_image[broken].outcome == "failed"
    assert {by_image[p].outcome for p in paths} == {"finished"}
    assert len({o.worker for o in outcomes}) == 2  # two processes did the work
    for p in paths[:2]:
        labels = read_labels(tmp_path / "out" / store_name(p), "prediction").levels[0]
        assert np.array_equal(np.asarray(labels), single_run_labels(p, tmp_path / p[-10:-4]))


def test_cli_many_images(images, tmp_path, capsys):
    paths, broken = images
    out = tmp_path / "many"
    assert main(["predict", *paths[:2], "--model", "demo", "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 of 2 images finished" in text and "scene1.xt.zarr" in text
    assert main(["predict", paths[0], broken, "--model", "demo", "--out-dir", str(out)]) == 1
    assert "1 of 2 images finished" in capsys.readouterr().out
    assert main(["predict", *paths[:2], "--model", "demo", "--out", str(out / "x.zarr")]) == 2
    assert "need --out-dir" in capsys.readouterr().err
    assert main(["predict", paths[0], str(tmp_path / "missing.npy"), "--model", "demo",
                 "--out-dir", str(out)]) == 2
    assert "no such image" in capsys.readouterr().err
    # values the model was not trained on are refused as for one image; the others run
    counts = tmp_path / "counts.npy"
    np.save(counts, np.random.default_rng(0).integers(0, 255, (2, 96, 96)).astype(np.uint8))
    assert main(["predict", paths[0], str(counts), "--model", "demo", "--out-dir",
                 str(out)]) == 2
    captured = capsys.readouterr()
    assert "uint8" in captured.err and "--accept-range" in captured.err
    assert "left out; the others run" in captured.err
    assert "1 of 1 images finished" in captured.out and not (out / "counts.xt.zarr").exists()
    assert main(["predict", paths[0], str(counts), "--model", "demo", "--out-dir", str(out),
                 "--accept-range"]) == 0
    assert (out / "counts.xt.zarr").is_dir()


def test_cancel_reaches_the_workers(images, tmp_path, cluster):
    paths, _ = images
    cancel = threading.Event()
    cancel.set()  # set before any worker starts: every run stops at its first region
    outcomes = list(predict_many(paths[:2], "demo", tmp_path / "out", threads=1,
                                 scheduler=cluster, cancel=cancel))
    assert [o.outcome for o in outcomes] == ["cancelled", "cancelled"]
    assert all(o.message.startswith("after 0/12 regions") for o in outcomes)
