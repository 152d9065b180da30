"""Bad input on the command line: one line on stderr naming the problem and a command-line
remedy, exit code 2, no traceback, nothing written; real failures stay exit code 1.

Inputs are made here: checkpoints damaged in each way a file can be, TIFFs with two series
or a pyramid, integer images for a model trained on dB, a zarr that claims 10^12 pixels."""

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_xt.cli import main

PYTHON_WORDS = ("axes=", "plane=", "series=", "overwrite=True", "import_official_checkpoint",
                "in_chans=", "level=", "cache=False")


def refused(capsys, argv, *expected):
    """Run the CLI; assert exit code 2 and one stderr line holding `expected`, worded for
    the command line; return the line."""
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    line = lines[0]
    assert line.startswith(f"napari-xt {argv[0]}: "), line
    for text in expected:
        assert text in line, (text, line)
    assert not any(word in line for word in PYTHON_WORDS), line
    return line


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def scene(tmp_path):
    """(2, 96, 96) float32 values like the built-in model's dB training scenes."""
    path = tmp_path / "scene.npy"
    np.save(path, np.random.default_rng(0).normal(-16, 6, (2, 96, 96)).astype(np.float32))
    return path


# ---------------------------------------------------------------------------- checkpoints
def _tiny(name="xt_tiny_demo_seg"):
    from napari_xt.model import create_model

    torch.manual_seed(1)
    return create_model(name).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A good napari-xt checkpoint and every way of damaging one."""
    from safetensors.torch import save_file

    from napari_xt.model.checkpoint import (
        CONFIG_KEY,
        FORMAT_KEY,
        HASH_KEY,
        _config_json,
        _hash_tensors,
        save_checkpoint,
    )
    from napari_xt.model.zoo import get_config

    root = tmp_path_factory.mktemp("checkpoints")
    model = _tiny()
    good = save_checkpoint(model, root / "good.safetensors")
    data = good.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    out = {"good": good}
    out["truncated"] = root / "truncated.safetensors"
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["flipped_data"] = root / "flipped_data.safetensors"
    middle = header + (len(data) - header) // 2
    out["flipped_data"].write_bytes(data[:middle] + bytes([data[middle] ^ 0x10])
                                    + data[middle + 1:])
    out["flipped_header"] = root / "flipped_header.safetensors"
    out["flipped_header"].write_bytes(data[:20] + bytes([data[20] ^ 0xFF]) + data[21:])
    out["random"] = root / "random.safetensors"
    out["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    # tensors of one config under the header of another (its hash recomputed: it verifies)
    other = json.loads(_config_json(model.cfg))
    wider = _config_json(get_config("xt_tiny_demo_seg", num_classes=5))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert json.loads(wider) != other
    out["shapes"] = root / "shapes.safetensors"
    save_file(tensors, out["shapes"], metadata={
        FORMAT_KEY: "1", CONFIG_KEY: wider, HASH_KEY: _hash_tensors(tensors, wider)})
    out["torch_save"] = root / "official.pth"
    torch.save({"state_dict": {"module.x": torch.zeros(2)}}, out["torch_save"])
    return out


@pytest.mark.parametrize("kind, expected", [
    ("truncated", "not a readable safetensors checkpoint"),
    ("flipped_data", "content hash does not match"),
    ("flipped_header", "not a readable safetensors checkpoint"),
    ("random", "not a readable safetensors checkpoint"),
    ("shapes", "shape mismatches"),
    ("torch_save", "--model ZOO_NAME --weights"),
])
def test_every_bad_checkpoint_is_one_line_and_exit_2(checkpoints, kind, expected, scene,
                                                     tmp_path, capsys):
    out = tmp_path / "out.zarr"
    refused(capsys, ["predict", str(scene), "--model", str(checkpoints[kind]), "--out",
                     str(out)], expected)
    assert not out.exists()
    # the built-in demo refuses it the same way, before making its folder
    demo_out = tmp_path / "demo"
    refused(capsys, ["demo", "--headless", "--model", str(checkpoints[kind]), "--out",
                     str(demo_out)], expected)
    assert not demo_out.exists()


class Payload:  # an object a torch.save file may carry: never unpickled
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_weights_load_official_files_and_refuse_anything_else(scene, tmp_path, capsys):
    from napari_xt.model import create_model
    from napari_xt.model.checkpoint import model_hash, ours_to_official

    img = tmp_path / "rgb.npy"
    np.save(img, np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    torch.manual_seed(3)
    model = create_model("xt_tiny_demo").eval()  # a classifier: official xT maps its head
    official = tmp_path / "official.ckpt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v.clone()
                                          for k, v in ours_to_official(model).items()}},
               official)
    out = tmp_path / "out.zarr"
    assert main(["predict", str(img), "--model", "xt_tiny_demo", "--weights", str(official),
                 "--out", str(out), "--quiet"]) == 0
    import zarr

    attrs = zarr.open_group(str(out), mode="r").attrs["napari-xt"]
    assert attrs["model_hash"] == model_hash(model)  # exactly those weights ran
    capsys.readouterr()

    objects = tmp_path / "objects.pth"
    torch.save({"state_dict": Payload()}, objects)
    out2 = tmp_path / "out2.zarr"
    line = refused(capsys, ["predict", str(img), "--model", "xt_tiny_demo", "--weights",
                            str(objects), "--out", str(out2)], "weights_only=True",
                   "never unpickled")
    assert "unpickled!" not in capsys.readouterr().out and not out2.exists(), line
    # an official file of another architecture, and of another channel count
    refused(capsys, ["predict", str(img), "--model", "xt_tiny_demo_seg", "--weights",
                     str(official), "--out", str(out2)], "does not fit")
    refused(capsys, ["predict", str(scene), "--model", "xt_tiny_demo", "--weights",
                     str(official), "--out", str(out2)], "takes 3 channels",
            "an image with 3 channels")
    refused(capsys, ["predict", str(img), "--model", "demo", "--weights", str(official),
                     "--out", str(out2)], "needs a zoo name as --model")
    assert not out2.exists()


# ---------------------------------------------------------------------------- how to read
def test_hints_name_the_command_line_options_that_apply(tmp_path, capsys):
    stack = tmp_path / "stack.npy"
    data = np.random.default_rng(0).normal(-16, 6, (4, 2, 64, 64)).astype(np.float32)
    np.save(stack, data)
    out = tmp_path / "out.zarr"
    run = ["predict", str(stack), "--model", "demo", "--out", str(out)]
    refused(capsys, run, "cannot tell the axes", "--axes")
    refused(capsys, [*run, "--axes", "ZCYX"], "Z=4", "--plane z=0")
    refused(capsys, [*run, "--axes", "ZCYX", "--plane", "z=9"], "z=9 is out of range")
    refused(capsys, [*run, "--axes", "ZCYX", "--plane", "z"], "AXIS=INDEX")
    refused(capsys, [*run, "--axes", "ZCYX", "--plane", "z=\u00b2"], "AXIS=INDEX")
    refused(capsys, [*run, "--axes", "ZCYX", "--plane", "z=0", "--series", "1"],
            "not a TIFF file")
    refused(capsys, [*run, "--axes", "ZCYX", "--plane", "z=0", "--threads", "0"],
            "--threads must be at least 1")
    refused(capsys, [*run, "--axes", "ZCYX", "--plane", "z=1", "--level", "3"],
            "level 3 does not exist")
    assert not out.exists()
    assert main([*run, "--axes", "ZCYX", "--plane", "z=2", "--quiet"]) == 0
    from napari_xt.io import read_labels

    assert read_labels(out, "prediction").levels[0].shape == (64, 64)
    capsys.readouterr()
    # convert words its refusals for the command line too
    refused(capsys, ["convert", str(stack), str(tmp_path / "c.zarr")], "--axes")
    refused(capsys, ["convert", str(stack), str(out), "--axes", "ZCYX", "--plane", "z=0"],
            "already exists", "--overwrite")


def test_several_image_series_are_refused_and_chosen(tmp_path, capsys):
    rng = np.random.default_rng(0)
    first = rng.normal(-16, 6, (2, 96, 96)).astype(np.float32)
    second = rng.normal(-16, 6, (2, 64, 80)).astype(np.float32)
    path = tmp_path / "two.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(first, photometric="minisblack", metadata={"axes": "CYX"})
        tw.write(second, photometric="minisblack", metadata={"axes": "CYX"})
    out = tmp_path / "out.zarr"
    run = ["predict", str(path), "--model", "demo", "--out", str(out)]
    line = refused(capsys, run, "2 image series", "(2, 96, 96)", "(2, 64, 80)", "--series N")
    assert not out.exists(), line
    refused(capsys, [*run, "--series", "5"], "series 5 does not exist")
    assert main([*run, "--series", "1", "--quiet"]) == 0
    from napari_xt.io import read_labels

    assert read_labels(out, "prediction").levels[0].shape == (64, 80)  # series 1's pixels


def test_a_pyramid_and_a_slides_associated_images_are_one_series(tmp_path):
    from _io_files import rgb_image, write_pyramidal_ome_tiff, write_svs_like

    from napari_xt.io import open_image

    pyramid = tmp_path / "pyramid.ome.tif"
    write_pyramidal_ome_tiff(pyramid, rgb_image(512, 384, seed=1))
    assert len(tifffile.TiffFile(pyramid).series) == 1
    image = open_image(pyramid, series=None)
    assert image.num_levels == 3 and image.levels[0].shape == (512, 384, 3)
    slide = tmp_path / "slide.svs"
    write_svs_like(slide, rgb_image(512, 384, seed=3))
    assert len(tifffile.TiffFile(slide).series) == 4  # baseline, thumbnail, label, macro
    image = open_image(slide, series=None)
    assert image.levels[0].shape == (512, 384, 3) and image.num_levels == 2


def test_a_pyramidal_tiff_is_predicted_without_series(tmp_path, capsys):
    from _io_files import rgb_image, write_pyramidal_ome_tiff

    pyramid = tmp_path / "pyramid.ome.tif"
    write_pyramidal_ome_tiff(pyramid, rgb_image(512, 256, seed=1), levels=2)
    out = tmp_path / "out.zarr"
    assert main(["predict", str(pyramid), "--model", "xt_tiny_demo_seg", "--level", "1",
                 "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err


# ---------------------------------------------------------------------------- value range
def test_integer_images_for_a_model_trained_on_db(scene, tmp_path, capsys):
    counts = tmp_path / "counts.npy"
    np.save(counts, np.random.default_rng(0).integers(0, 4096, (2, 96, 96)).astype(np.uint16))
    out = tmp_path / "out.zarr"
    run = ["predict", str(counts), "--model", "demo", "--out", str(out)]
    line = refused(capsys, run, "uint16", "-14 +/- 7", "--accept-range")
    assert not out.exists(), line
    assert main([*run, "--accept-range"]) == 0
    err = capsys.readouterr().err
    assert "(accepted although they do not match)" in err
    # values like the training data: said, and run
    assert main(["predict", str(scene), "--model", "demo", "--out",
                 str(tmp_path / "db.zarr")]) == 0
    assert "normalized as the model was trained: (x - [-14, -22]) / [7, 7]" in \
        capsys.readouterr().err


def test_an_image_with_no_finite_value_is_refused(tmp_path, capsys):
    # all NaN / inf: every pixel would be read as missing, so there is nothing to predict from
    for model, fill in (("demo", np.nan), ("xt_tiny_demo_seg", np.inf)):
        img = tmp_path / f"blank-{model}.npy"
        np.save(img, np.full((96, 96, 3) if model != "demo" else (2, 96, 96), fill,
                             np.float32))
        out = tmp_path / f"{model}.zarr"
        run = ["predict", str(img), "--model", model, "--out", str(out)]
        line = refused(capsys, run, "no sampled value of channels 0, 1", "is finite",
                       "--accept-range")
        assert not out.exists(), line


def test_a_model_without_normalization_takes_values_unchanged(tmp_path, capsys):
    img = tmp_path / "rgb.npy"
    np.save(img, np.random.default_rng(1).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    assert main(["predict", str(img), "--model", "xt_tiny_demo_seg", "--out",
                 str(tmp_path / "o.zarr")]) == 0
    err = capsys.readouterr().err
    assert "input values: uint8, sampled [" in err and "go in unchanged" in err


def test_value_range_check_reads_only_a_sample():
    import dask.array as da

    from napari_xt.io.source import ImageSource
    from napari_xt.io.value_range import sample_values

    reads = []
    big = da.zeros((2, 40_000, 40_000), np.float32, chunks=(2, 1024, 1024))
    source = ImageSource(big.map_blocks(lambda b: reads.append(1) or b, dtype=np.float32),
                         axes="CYX")
    values = sample_values(source)
    # nine patches, from a few of the 1,600 chunks (a patch may straddle a chunk edge)
    assert values.shape == (2, 9 * 128 * 128) and len(reads) <= 20


# ---------------------------------------------------------------------------- plan budget
def test_a_zarr_of_a_trillion_pixels_is_refused_in_seconds(tmp_path, capsys):
    import zarr

    path = tmp_path / "huge.zarr"
    zarr.create_array(str(path), shape=(2, 10**6, 10**6), chunks=(2, 1024, 1024),
                      dtype="float32", fill_value=-16.0)
    out = tmp_path / "out.zarr"
    start = time.perf_counter()
    line = refused(capsys, ["predict", str(path), "--model", "demo", "--out", str(out),
                            "--quiet"], "244,140,625 regions", "needs about",
                   "napari-xt convert", "--level")
    seconds = time.perf_counter() - start
    assert seconds < 5, seconds
    assert ("of memory" in line) or ("of disk" in line)
    assert not out.exists()


def test_disk_that_cannot_hold_the_cache_names_no_cache(scene, tmp_path, capsys,
                                                        monkeypatch):
    from napari_xt.engine import budget

    out = tmp_path / "out.zarr"
    # the scene's results take 86 KB before compression, its embedding cache 112 KB
    monkeypatch.setattr(budget, "free_disk", lambda path: (150 * 1024, tmp_path))
    line = refused(capsys, ["predict", str(scene), "--model", "demo", "--out", str(out)],
                   "of disk", "embedding cache 112.0 KB", "150.0 KB free",
                   "--no-cache (saves 112.0 KB)")
    assert not out.exists(), line
    assert main(["predict", str(scene), "--model", "demo", "--out", str(out), "--no-cache",
                 "--quiet"]) == 0


def test_a_cache_on_another_disk_is_checked_against_that_disk(scene, tmp_path, monkeypatch):
    from pathlib import Path

    from napari_xt.engine import Finished, budget, run
    from napari_xt.engine.run import EngineInputError
    from napari_xt.model.choice import load_model

    model, _, normalize = load_model("demo")
    image = np.load(scene)
    (tmp_path / "disk1").mkdir()
    (tmp_path / "disk2").mkdir()
    second = str(tmp_path / "disk2")

    def on_second(path) -> bool:
        return str(Path(path).absolute()).startswith(second)

    monkeypatch.setattr(budget, "_device", lambda path: 2 if on_second(path) else 1)
    # results (86 KB) fit the store's disk; the cache (112 KB) does not fit its own
    monkeypatch.setattr(budget, "free_disk", lambda path: (
        (50 * 1024 if on_second(path) else 100 * 1024), Path(path)))
    store, cache = tmp_path / "disk1" / "out.zarr", tmp_path / "disk2" / "cache"
    with pytest.raises(EngineInputError,
                       match="embedding cache .* of disk at .*disk2.*cache=False"):
        run(image, model, store, cache=cache, normalize=normalize, axes="CYX")
    assert not store.exists() and not cache.exists()
    # the cache's own disk holds it: the store's disk needs to hold the results only
    monkeypatch.setattr(budget, "free_disk", lambda path: (
        (10 * 2**30 if on_second(path) else 100 * 1024), Path(path)))
    events = list(run(image, model, store, cache=cache, normalize=normalize, axes="CYX"))
    assert isinstance(events[-1], Finished)


def test_memory_that_cannot_hold_the_plan_names_a_coarser_level(tmp_path, capsys,
                                                                monkeypatch):
    from napari_xt.engine import budget
    from napari_xt.io import convert

    image = tmp_path / "pyramid.ome.zarr"
    convert(np.random.default_rng(0).normal(-16, 6, (2, 1024, 1024)).astype(np.float32),
            image, axes="CYX", chunk=256, min_size=256)
    before = tree(image)
    level0 = budget.PLAN_BYTES_PER_REGION * 256 + budget.PLAN_BYTES_PER_CROP * 49
    monkeypatch.setattr(budget, "available_memory", lambda: level0)  # 80 % of it is not enough
    out = tmp_path / "out.zarr"
    line = refused(capsys, ["predict", str(image), "--model", "demo", "--out", str(out)],
                   "256 regions", "of memory for the plan", "--level 1 (64 regions)")
    assert not out.exists() and tree(image) == before, line


def test_large_runs_say_their_estimate_first(tmp_path, monkeypatch):
    from napari_xt.engine import budget, run
    from napari_xt.engine.events import Notice, Planned
    from napari_xt.model.choice import load_model

    monkeypatch.setattr(budget, "LARGE_REGIONS", 4)
    model, _, normalize = load_model("demo")
    img = np.random.default_rng(0).normal(-16, 6, (2, 192, 192)).astype(np.float32)
    events = run(img, model, tmp_path / "o.zarr", normalize=normalize, axes="CYX")
    first = next(events)
    events.close()
    assert isinstance(first, Notice) and first.kind == "info"
    assert first.message.startswith("estimate: 9 regions (3 x 3 of 64 px) in 1 crops")
    assert "results up to" in first.message and "embedding cache 252.0 KB" in \
        first.message
    # a small run says nothing of the kind
    monkeypatch.setattr(budget, "LARGE_REGIONS", 10**9)
    events = run(img, model, tmp_path / "q.zarr", normalize=normalize, axes="CYX")
    assert isinstance(next(events), Planned)
    events.close()


def test_batch_size_is_capped_to_the_memory_there_is(scene, tmp_path, capsys, monkeypatch):
    import zarr

    from napari_xt.engine import budget

    monkeypatch.setattr(budget, "available_memory", lambda: 8 * 2**20)
    out = tmp_path / "out.zarr"
    assert main(["predict", str(scene), "--model", "demo", "--out", str(out),
                 "--batch-size", "100000"]) == 0
    err = capsys.readouterr().err
    notice = next(line for line in err.splitlines() if line.startswith("batch size 100000"))
    used = int(notice.split("using ")[1].split()[0])
    assert 1 <= used < 8 and "--batch-size sets it" in notice
    assert zarr.open_group(str(out), mode="r").attrs["napari-xt"]["batch_size"] == used


def test_whole_image_context_needs_a_model_trained_for_it(scene, tmp_path, capsys):
    out = tmp_path / "out.zarr"
    run = ["predict", str(scene), "--model", "demo", "--out", str(out)]
    refused(capsys, [*run, "--context", "image"], "no whole-image context",
            "--context crop")
    assert not out.exists()
    assert main([*run, "--context", "crop", "--quiet"]) == 0
    import zarr

    assert zarr.open_group(str(out), mode="r").attrs["napari-xt"]["settings"]["context"] == \
        "crop"


# ---------------------------------------------------------------------------- other commands
def test_other_subcommands_refuse_bad_input_in_one_line(tmp_path, capsys, checkpoints):
    refused(capsys, ["convert", str(tmp_path / "missing.tif"), str(tmp_path / "o.zarr")],
            "no such file")
    refused(capsys, ["export-pairs", str(tmp_path / "missing.zarr"), str(tmp_path / "x.npy"),
                     "--out", str(tmp_path / "pairs")])
    assert not (tmp_path / "pairs").exists()
    config = tmp_path / "fine.yaml"
    config.write_text(f"model: {{checkpoint: {checkpoints['flipped_data']}}}\n")
    refused(capsys, ["train", str(config), "--out", str(tmp_path / "run")], "content hash")
    assert not (tmp_path / "run").exists()
    config.write_text("# a header\nmodel: the crop model\n  checkpoint: demo\ndata:\n")
    refused(capsys, ["train", str(config), "--out", str(tmp_path / "run")], "not valid YAML",
            "line 3")
    config.write_text("- model\n- data\n")
    refused(capsys, ["train", str(config), "--out", str(tmp_path / "run")],
            "expected a mapping of sections")
    assert not (tmp_path / "run").exists()


def test_a_failure_of_the_run_itself_is_exit_1(scene, tmp_path, capsys, monkeypatch):
    from napari_xt.model.xt import XT

    def broken(self, x):
        raise RuntimeError("the device went away")

    monkeypatch.setattr(XT, "encode_regions", broken)
    assert main(["predict", str(scene), "--model", "demo", "--out", str(tmp_path / "o.zarr"),
                 "--quiet"]) == 1
    assert "the device went away" in capsys.readouterr().err
