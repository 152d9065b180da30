"""Whole-image context (`context="image"`): the scene pass, its reading by every crop, and
its equivalence with the model's own whole-image forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_xt.engine import Cancelled, EngineInputError, Finished, run
from napari_xt.model.global_context import SceneGrid, SceneSummary
from napari_xt.model.xt import XT
from napari_xt.model.zoo import apply_overrides, get_config
from napari_xt.train.synthetic import SceneConfig, SyntheticScene

NORM = ([-14.0, -22.0], [7.0, 7.0])


def _with_scene(base: XT, seed: int = 0) -> XT:
    """`base` with whole-image context whose reader is not silent (random, seeded)."""
    model = XT(apply_overrides(base.cfg, global_context={"grid": 8}))
    model.load_state_dict(base.state_dict(), strict=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        reader = model.global_context.reader
        for p in [*reader.proj.parameters(), *reader.at.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def demo():
    from napari_xt.model.choice import load_model

    model, _, _ = load_model("demo")
    return model


@pytest.fixture(scope="module")
def demo_image(demo):
    return _with_scene(demo)


def _scene(seed: int, size: int) -> np.ndarray:
    img, _ = SyntheticScene(seed, SceneConfig(height=size, width=size)).read()
    return img


def _probs(events) -> np.ndarray:
    last = events[-1]
    assert isinstance(last, Finished), last
    return np.asarray(last.summary["arrays"]["probabilities"], np.float32)


def _run(image, model, **kw) -> list:
    kw.setdefault("outputs", ("labels", "probabilities"))
    kw.setdefault("cache", False)
    return list(run(image, model, kw.pop("store", None), normalize=NORM, **kw))


def test_a_silent_reader_leaves_the_crop_model_unchanged(demo):
    model = XT(apply_overrides(demo.cfg, global_context={}))
    model.load_state_dict(demo.state_dict(), strict=False)
    model.eval()
    x = torch.randn(1, 2, 192, 256)
    with torch.no_grad():
        a, b = demo(x), model(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_scene_summary_is_the_same_whatever_order_and_batches(rng):
    grid = SceneGrid.for_regions(37, 21, 8)  # cells of 5 x 5 regions, 8 x 5 cells
    assert grid.cell == 5 and grid.shape == (8, 5)
    rc = np.array([(r, c) for r in range(37) for c in range(21)])
    vec = torch.from_numpy(rng.normal(size=(len(rc), 6)))
    one = SceneSummary(grid, 6)
    one.add(rc, vec)
    perm = rng.permutation(len(rc))
    other = SceneSummary(grid, 6)
    for part in np.array_split(perm, 7):
        other.add(rc[part], vec[part])
    torch.testing.assert_close(one.cells(), other.cells(), rtol=1e-6, atol=1e-6)
    cells = one.cells()
    assert cells.shape == (8, 5, 12)
    inside = (rc[:, 0] // 5 == 7) & (rc[:, 1] // 5 == 4)  # the last, partial cell (2 x 1)
    assert inside.sum() == 2
    torch.testing.assert_close(cells[7, 4, :6], vec[inside].mean(0).float())
    torch.testing.assert_close(cells[7, 4, 6:], vec[inside].max(0).values.float())


def test_scene_memory_is_flat_in_the_number_of_regions():
    small = SceneSummary(SceneGrid.for_regions(64, 64, 64), 128)
    huge = SceneSummary(SceneGrid.for_regions(1600, 1600, 64), 128)  # a 100k^2 slide
    assert huge.grid.shape == small.grid.shape == (64, 64)
    assert huge.sums.numel() == small.sums.numel()


def test_one_crop_image_through_the_engine_equals_the_models_forward(demo_image):
    img = _scene(3, 512)  # 8 x 8 regions: one crop of the demo model
    probs = _probs(_run(img, demo_image, context="image"))
    x = (torch.from_numpy(img) - torch.tensor(NORM[0])[:, None, None]) / 7.0
    with torch.no_grad():
        ref = torch.softmax(demo_image(x[None])["logits"], 1)[0].numpy()
    np.testing.assert_allclose(probs, ref, atol=2e-3)  # probabilities are stored as float16


@pytest.mark.parametrize("kind", ["transformer_xl", "mamba"])
def test_every_context_encoder_kind_reads_the_scene_as_its_forward_does(kind):
    cfg = get_config("xt_tiny_demo_seg", context={"kind": kind, "chunk_len": 16,
                                                  "mem_len": 48, "d_state": 8},
                     global_context={"grid": 4})
    torch.manual_seed(1)
    model = XT(cfg)
    with torch.no_grad():
        for p in model.global_context.reader.proj.parameters():
            p.normal_(0, 0.2)
    model.eval()
    img = np.random.default_rng(2).normal(size=(3, 384, 512)).astype(np.float32)
    events = list(run(img, model, None, outputs=("probabilities",), cache=False))
    probs = _probs(events)
    with torch.no_grad():
        ref = torch.softmax(model(torch.from_numpy(img)[None])["logits"], 1)[0].numpy()
    np.testing.assert_allclose(probs, ref, atol=2e-3)


def test_shallow_summary_levels_stream_as_the_forward_and_start_silent(demo):
    """With `summary_levels` a region's summary also holds shallow levels (mean and max over
    space), with `whole_scene` every token adds a vector of the whole scene; the engine's
    run still equals the model's forward, the new maps start silent (the outputs of the
    model without them) and, once trained, change them."""
    from napari_xt.model.global_context import region_summary

    model = XT(apply_overrides(demo.cfg, global_context={
        "grid": 8, "summary_levels": [0, 2], "whole_scene": True}))
    assert model.summary_levels() == [0, 2, 3]
    without = _with_scene(demo)
    result = model.load_state_dict(without.state_dict(), strict=False)
    assert sorted(result.missing_keys) == [
        "global_context.cell_extra.bias", "global_context.cell_extra.weight",
        "global_context.whole.proj.bias", "global_context.whole.proj.weight",
        "global_context.whole.scale", "global_context.whole.shift"]
    model.eval()
    feats = model.encode_regions(torch.randn(6, 2, 64, 64))
    vectors = model.summarize(feats)
    c0, c2, c3 = (feats[i].shape[1] for i in (0, 2, 3))
    assert vectors.shape == (6, c3 + 2 * (c0 + c2))
    torch.testing.assert_close(vectors[:, :c3], feats[3].mean((-2, -1)))
    torch.testing.assert_close(vectors[:, c3 + c0:c3 + 2 * c0], feats[0].amax((-2, -1)))
    torch.testing.assert_close(model.summarize([feats[0], feats[2], feats[3]]), vectors)
    torch.testing.assert_close(region_summary([feats[3]]), demo.summarize(feats))

    img = _scene(4, 512)
    silent = _probs(_run(img, model, context="image"))
    np.testing.assert_array_equal(silent, _probs(_run(img, without, context="image")))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in [*model.global_context.cell_extra.parameters(),
                  *model.global_context.whole.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    probs = _probs(_run(img, model, context="image"))
    assert np.abs(probs - silent).max() > 1e-3
    x = (torch.from_numpy(img) - torch.tensor(NORM[0])[:, None, None]) / 7.0
    with torch.no_grad():
        ref = torch.softmax(model(x[None])["logits"], 1)[0].numpy()
    np.testing.assert_allclose(probs, ref, atol=2e-3)


def test_summary_levels_must_be_shallower_than_the_deepest(demo):
    with pytest.raises(ValueError, match="the deepest \\(3\\) is always summarized"):
        XT(apply_overrides(demo.cfg, global_context={"summary_levels": [3]}))
    with pytest.raises(ValueError, match="distinct level indices"):
        XT(apply_overrides(demo.cfg, global_context={"summary_levels": [1, 1]}))


def test_far_away_pixels_change_a_region_only_with_whole_image_context(demo_image):
    img = _scene(4, 1024)  # 16 x 16 regions; crops of 8 x 8 at stride 4
    far = img.copy()
    far[:, 768:, 768:] += 12.0  # a change more than one crop away from region (0, 0)
    corner = (slice(None), slice(0, 64), slice(0, 64))
    for context, changes in (("crop", False), ("image", True)):
        a = _probs(_run(img, demo_image, context=context))[corner]
        b = _probs(_run(far, demo_image, context=context))[corner]
        assert bool(np.abs(a - b).max() > 1e-3) is changes, context


def test_a_crop_model_cannot_run_with_whole_image_context(demo):
    with pytest.raises(EngineInputError, match="no whole-image context"):
        run(_scene(1, 256), demo, None, normalize=NORM, context="image")
    with pytest.raises(EngineInputError, match="context must be one of"):
        run(_scene(1, 256), demo, None, normalize=NORM, context="everything")


@pytest.mark.parametrize("blend", ["tokens", "outputs"])
def test_a_cancelled_image_run_resumes_to_the_same_results(demo_image, tmp_path, blend):
    """Bit for bit with either blend: decode calls have one fixed size (blend="outputs"
    decodes a crop's unfinished regions, fewer in a resumed run, padded to that size)."""
    img = _scene(5, 768)
    whole = _run(img, demo_image, context="image", store=tmp_path / "whole.zarr", cache=True,
                 blend=blend)
    assert isinstance(whole[-1], Finished)
    crops = 0

    def cancel():
        return crops >= 3

    out = tmp_path / "part.zarr"
    events = []
    for e in run(img, demo_image, out, normalize=NORM, context="image", blend=blend,
                 outputs=("labels", "probabilities"), cancel=cancel):
        events.append(e)
        crops += type(e).__name__ == "ContextStep"
    assert isinstance(events[-1], Cancelled)
    again = _run(img, demo_image, context="image", store=out, cache=True, blend=blend)
    assert isinstance(again[-1], Finished)
    from napari_xt.io import read_labels, read_probabilities

    np.testing.assert_array_equal(np.asarray(read_labels(out, "prediction").levels[0]),
                                  np.asarray(read_labels(tmp_path / "whole.zarr",
                                                         "prediction").levels[0]))
    np.testing.assert_array_equal(
        np.asarray(read_probabilities(out, "prediction").levels[0]),
        np.asarray(read_probabilities(tmp_path / "whole.zarr", "prediction").levels[0]))


def test_context_bench_ranks_the_crop_model_above_region_only(tmp_path, capsys):
    """`napari-xt bench context` through the engine on held-out scenes: the shipped crop
    model beats its region-only baseline on the sea/lake question; unknown rows, sizes that
    are not positive numbers and a count below 1 are usage errors that name the flag."""
    import json

    from napari_xt.cli import main

    out = tmp_path / "context.json"
    assert main(["bench", "context", "--coast-sizes", "256", "--beacon-sizes", "", "--count",
                 "2", "--rows", "region-only,crop", "--threads", "1", "--json", str(out)]) == 0
    rows = {r["row"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"region-only", "crop model, crop"}
    crop, alone = rows["crop model, crop"], rows["region-only"]
    assert crop["miou_sea_lake"] > alone["miou_sea_lake"] + 0.1, (crop, alone)
    assert crop["iou_land"] > 0.9 and crop["scenes"] == 2 and crop["mp_per_s"] > 0
    assert "crop model, crop" in capsys.readouterr().out
    assert main(["bench", "context", "--rows", "crop,nonsense"]) == 2
    for bad in (["--beacon-sizes", "2048,big"], ["--coast-sizes", "0"], ["--count", "0"]):
        capsys.readouterr()
        assert main(["bench", "context", *bad]) == 2
        assert bad[0] in capsys.readouterr().err


def test_scene_detectors_score_every_region_and_stream_as_the_forward(demo):
    """With `scene_detectors` the whole-scene vector adds learned detectors, each read at
    its best region of the whole image (the scene pass keeps each score's running maximum,
    in any order of regions); silent at first, and the engine's run equals the forward."""
    from napari_xt.model.global_context import GlobalContextConfig

    with pytest.raises(ValueError, match="needs whole_scene: true"):
        GlobalContextConfig(scene_detectors=4)
    with pytest.raises(ValueError, match="must be >= 0"):
        GlobalContextConfig(whole_scene=True, scene_detectors=-1)
    assert "scene_detectors" not in GlobalContextConfig(whole_scene=True).to_dict()

    plain = XT(apply_overrides(demo.cfg, global_context={"grid": 8, "whole_scene": True}))
    plain.load_state_dict(_with_scene(demo).state_dict(), strict=False)
    model = XT(apply_overrides(demo.cfg, global_context={
        "grid": 8, "whole_scene": True, "scene_detectors": 3}))
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert {k for k in result.missing_keys} == {
        "global_context.whole.detect.shift", "global_context.whole.detect.scale",
        "global_context.whole.detect.net.0.weight", "global_context.whole.detect.net.0.bias",
        "global_context.whole.detect.net.2.weight", "global_context.whole.detect.net.2.bias",
        "global_context.whole.detect.out.weight", "global_context.whole.detect.out.bias"}
    plain.eval(), model.eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in plain.global_context.whole.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.global_context.whole.load_state_dict(plain.global_context.whole.state_dict(),
                                               strict=False)
    img = _scene(6, 512)
    x = (torch.from_numpy(img) - torch.tensor(NORM[0])[:, None, None]) / 7.0
    with torch.no_grad():  # fresh detectors are silent: the model without them
        torch.testing.assert_close(model(x[None])["logits"], plain(x[None])["logits"],
                                   rtol=0, atol=0)
        for p in model.global_context.whole.detect.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        assert (model(x[None])["logits"] - plain(x[None])["logits"]).abs().max() > 1e-3

    detect = model.global_context.whole.detect
    channels = detect.shift.numel()
    vectors = torch.randn(30, channels, generator=gen)
    rc = torch.stack(torch.meshgrid(torch.arange(5), torch.arange(6), indexing="ij"), -1)
    rc = rc.reshape(-1, 2)
    one = model.new_summary(5, 6, channels)
    one.add(rc, vectors)
    parts = model.new_summary(5, 6, channels)
    for idx in torch.randperm(30, generator=gen).split(7):
        parts.add(rc[idx], vectors[idx])
    with torch.no_grad():
        scores = detect.scores(vectors)  # (30, 3)
    torch.testing.assert_close(one.peaks(), scores.amax(0))
    torch.testing.assert_close(parts.peaks(), one.peaks(), rtol=1e-5, atol=1e-5)  # batching
    assert model.new_summary(5, 6, channels).peaks() is None
    with pytest.raises(ValueError, match="needs the scene's detector peaks"):
        model.global_context.whole(one.cells().reshape(1, 30, -1))

    probs = _probs(_run(img, model, context="image"))
    with torch.no_grad():
        ref = torch.softmax(model(x[None])["logits"], 1)[0].numpy()
    np.testing.assert_allclose(probs, ref, atol=2e-3)
