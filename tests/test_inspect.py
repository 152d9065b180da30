"""Contribution maps (`napari_xt.inspect`) on models whose answer is known."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from napari_xt.inspect import METHODS, attention_matrices, contribution_map
from napari_xt.io.source import ImageSource
from napari_xt.model import create_model
from napari_xt.model.xt import token_layout

HEAD = {"kind": "segmentation", "num_classes": 3, "decoder_channels": [8, 8, 8, 8, 8]}


def tiny(context, crop_regions=2):
    torch.manual_seed(0)
    return create_model("xt_tiny_demo_seg", in_chans=1, num_classes=3,
                        region={"backbone": "test_convnext3", "region_size": 32, "in_chans": 1},
                        tokenizer={"region_size": 32}, context=context,
                        crop_regions=crop_regions, head=HEAD).eval()


def image(seed=0, size=64):
    return np.random.default_rng(seed).random((size, size)).astype(np.float32) + 0.5


def copy_model(beta=25.0, alpha=5.0):
    """A 2 x 2-region crop model (one token per region) whose region A = (0, 0) reads
    region B = (1, 1): its query matches only B's key (also when A is blanked), the value
    path copies B's token 25-fold into A's, the MLP adds nothing. Region tokens are one-hot
    (10 e_j for region j of the crop, 10 e_15 for a region with no content)."""
    model = tiny({"kind": "hyper", "dim": 16, "depth": 1, "head_dim": 16, "mlp_dim": 16,
                  "causal": False})
    blk = model.context.layers[0]
    d = 16
    m = torch.eye(d)
    m[:, 0] = 0.0
    m[3, 0] = 1.0  # A -> B
    m[:, 15] = 0.0
    m[3, 15] = 1.0  # a blanked A still asks for B
    with torch.no_grad():
        blk.attn.qkv.weight.copy_(torch.cat([alpha * m, torch.eye(d), torch.eye(d)]))
        blk.attn.qkv.bias.zero_()
        blk.attn.proj.weight.copy_(beta * torch.eye(d))
        blk.attn.proj.bias.zero_()
        blk.mlp.down_proj.weight.zero_()

    def region_tokens(self, last, region_rc):
        b, r = last.shape[:2]
        blank = last.flatten(2).abs().sum(-1) == 0  # (B, R)
        tokens = torch.zeros(b, r, d)
        tokens[:, torch.arange(r), torch.arange(r)] = 10.0
        tokens[blank] = 0.0
        tokens[..., 15] = torch.where(blank, 10.0, 0.0)
        _, pos = token_layout(region_rc, 1, 1)
        return tokens, pos.unsqueeze(0).expand(b, -1, -1)

    model.region_tokens = types.MethodType(region_tokens, model)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_a_region_reading_another_gives_it_nearly_all_the_weight(method):
    model = copy_model()
    cm = contribution_map(model, ImageSource(image()), (0, 0), method)
    assert cm.spans == ((0, 0, 2, 2),) and np.isclose(np.nansum(cm.values), 1.0)
    assert cm.values[1, 1] > 0.8, cm.values  # B
    assert cm.top(1)[0][0] == (1, 1)


@pytest.mark.parametrize("method", METHODS)
def test_a_region_only_model_gives_the_region_itself_all_the_weight(method):
    model = tiny({"kind": "none", "dim": 128, "depth": 0})
    cm = contribution_map(model, ImageSource(image(1, 96)), (1, 1), method)
    assert cm.self_share == pytest.approx(1.0)
    assert np.nansum(cm.values) == pytest.approx(1.0)
    assert "region-only" in cm.note


@pytest.mark.parametrize("context", [
    {"kind": "hyper", "dim": 16, "depth": 2, "head_dim": 8, "mlp_dim": 16, "causal": False},
    {"kind": "hyper", "dim": 16, "depth": 2, "head_dim": 8, "mlp_dim": 16, "causal": True},
    {"kind": "transformer_xl", "dim": 16, "depth": 2, "head_dim": 8, "mlp_dim": 16,
     "chunk_len": 3, "mem_len": 2, "causal": True},
])
def test_attention_is_the_encoders_own_and_each_row_sums_to_one(context):
    # the attention shown is that of the computation the run makes: the same output as the
    # encoder's forward; each query's weights sum to 1 over the keys it can see
    model = tiny(context)
    tokens = torch.randn(1, 10, 16)
    with torch.no_grad():
        want, _ = model.contextualize(tokens)
        out, mats, shares = attention_matrices(model, tokens)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert len(mats) == len(shares) == 2
    for a, share in zip(mats, shares):
        assert a.shape == (2, 10, 10)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 10), rtol=1e-5, atol=1e-5)
        assert ((share > 0) & (share < 1)).all()
        if context["causal"]:
            assert torch.all(a.triu(1) == 0)  # no query sees a later key
    if context["kind"] == "transformer_xl":  # token 6 (segment 6..8) sees memory 4, 5 only
        assert torch.all(mats[0][:, 6, :4] == 0) and torch.all(mats[0][:, 6, 4:7] > 0)


def test_mamba_has_no_attention_but_gradient_and_occlusion_work():
    model = tiny({"kind": "mamba", "dim": 16, "depth": 2, "d_state": 4, "expand": 2})
    src = ImageSource(image(2, 96))
    for method in ("attention", "rollout"):
        with pytest.raises(ValueError, match="gradient or occlusion"):
            contribution_map(model, src, (1, 1), method)
    for method in ("gradient", "occlusion"):
        cm = contribution_map(model, src, (1, 1), method)
        assert np.nansum(cm.values) == pytest.approx(1.0) and 0 < cm.self_share < 1


def test_crops_and_pixels_follow_the_engines_plan():
    # a region covered by several crops gets their blend of maps (weights of the run's
    # windows); a pixel narrows the answer to its own token; bad input is refused
    model = tiny({"kind": "hyper", "dim": 16, "depth": 2, "head_dim": 8, "mlp_dim": 16,
                  "causal": False})
    src = ImageSource(image(3, 128))  # 4 x 4 regions, crops of 2 x 2 at stride 1
    cm = contribution_map(model, src, (1, 2), "occlusion")
    assert len(cm.spans) == 4 and np.isclose(sum(cm.weights), 1.0)
    assert np.isnan(cm.values[3, 0]) and np.isfinite(cm.values[0:3, 1:4]).all()
    px = contribution_map(model, src, (1, 2), "attention", pixel=(5, 7))
    assert px.pixel == (5, 7) and np.isclose(np.nansum(px.values), 1.0)
    with pytest.raises(ValueError, match="outside"):
        contribution_map(model, src, (4, 0), "occlusion")
    with pytest.raises(ValueError, match="method"):
        contribution_map(model, src, (0, 0), "saliency")
    with pytest.raises(ValueError, match="layer 5"):
        contribution_map(model, src, (0, 0), "attention", layer=5)


@pytest.fixture(scope="module")
def lake_scene():
    """A held-out scene of the built-in model's task (512 px, one crop wide) and a region
    inside one of its lakes that the model calls lake (on most of its pixels)."""
    from napari_xt.model.choice import load_model
    from napari_xt.train.synthetic import SceneConfig, SyntheticScene

    model, _, norm = load_model("demo")
    for seed in range(900, 960):
        img, truth = SyntheticScene(seed, SceneConfig(height=512, width=512)).read()
        src = ImageSource(img, axes="CYX", normalize=norm)
        with torch.no_grad():
            x = torch.from_numpy(src.read((0, 0, 512, 512), 512)[0])[None]
            pred = model(x)["logits"][0].argmax(0).numpy()
        for r in range(8):
            for c in range(8):
                box = (slice(r * 64, (r + 1) * 64), slice(c * 64, (c + 1) * 64))
                if (truth[box] == 2).all() and (pred[box] == 2).mean() > 0.8:
                    return model, src, (r, c)
    pytest.fail("no held-out scene with a lake region the model gets right")


def test_the_built_in_model_reads_far_for_a_lake_and_the_region_only_one_does_not(lake_scene):
    # A lake differs from the sea only by being closed: the model must look beyond the
    # region (at its shores) to call it lake; the region-only baseline cannot.
    from napari_xt.model.choice import load_model

    model, src, region = lake_scene
    shares = {m: contribution_map(model, src, region, m).self_share
              for m in ("attention", "rollout", "occlusion", "gradient")}
    assert max(shares["attention"], shares["rollout"], shares["occlusion"]) < 0.5, shares
    assert shares["gradient"] < 0.6, shares
    alone, _, norm = load_model("demo-region-only")
    src_alone = ImageSource(src.array, axes="CYX", normalize=norm)
    cm = contribution_map(alone, src_alone, region, "occlusion")
    assert cm.self_share == pytest.approx(1.0)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A store of the built-in model on a 256 x 320 scene, and the scene."""
    from napari_xt.cli import main
    from napari_xt.train.synthetic import SceneConfig, SyntheticScene

    d = tmp_path_factory.mktemp("run")
    img, _ = SyntheticScene(907, SceneConfig(height=256, width=320)).read()
    np.save(d / "scene.npy", img)
    assert main(["predict", str(d / "scene.npy"), "--model", "demo", "--out",
                 str(d / "r.zarr")]) == 0
    return d


def test_cli_inspect_explains_a_region_of_a_stored_run(demo_run, capsys):
    from napari_xt.cli import main
    from napari_xt.widgets.snapshot import read_png

    d = demo_run
    args = ["inspect", str(d / "r.zarr"), str(d / "scene.npy"), "--model", "demo",
            "--region", "2,3"]
    assert main([*args, "--method", "rollout", "--out", str(d / "m.png")]) == 0
    out = capsys.readouterr().out
    assert "region (2, 3)" in out and "rollout" in out and "<- itself" in out
    pic = read_png(d / "m.png")
    assert pic.shape[:2] == (4 * (512 // 5), 5 * (512 // 5))  # the 4 x 5 region grid
    assert main([*args, "--out", str(d / "m.json"), "--pixel", "10,20"]) == 0
    import json

    doc = json.loads((d / "m.json").read_text())
    assert doc["method"] == "occlusion" and doc["pixel"] == [10, 20]
    assert len(doc["values"]) == 4 and abs(sum(x for row in doc["values"] for x in row
                                               if x is not None) - 1) < 1e-5


@pytest.mark.parametrize("extra, message", [
    (["--model", "demo-region-only"], "not the one the run used"),
    (["--model", "nosuch"], "nosuch"),
    (["--model", "demo", "--region", "4,0"], "outside the 4 x 5 grid"),
    (["--model", "demo", "--out", "map.tif"], "give a .png, .npy or .json"),
    (["--model", "demo", "--out", "nowhere/map.png"], "does not exist"),
    (["--model", "demo", "--out", "scene.npy"], "pass --overwrite to replace it"),
    (["--model", "demo", "--image-other"], "differs from the one the run read"),
])
def test_cli_inspect_refuses_what_does_not_belong_to_the_run(demo_run, capsys, extra, message):
    from napari_xt.cli import main

    d = demo_run
    image = d / "scene.npy"
    if "--image-other" in extra:
        other = np.load(image)
        other[:, :64, :64] += 1.0
        np.save(d / "other.npy", other)
        image, extra = d / "other.npy", ["--model", "demo"]
    extra = [str(d / e) if e in ("nowhere/map.png", "scene.npy") else e for e in extra]
    args = ["inspect", str(d / "r.zarr"), str(image), *extra]
    if "--region" not in args:
        args += ["--region", "1,1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_region_alone_at_a_crops_centre_is_position_neutral():
    # "centred" puts the region where its position says nothing of the image border: the
    # answer for border region (0, 0) is the answer for the same pixels at region (4, 4)
    from napari_xt.model.choice import load_model
    from napari_xt.train.synthetic import SceneConfig, SyntheticScene
    from napari_xt.widgets.context_probe import region_only_labels

    model, _, norm = load_model("demo")
    img, _ = SyntheticScene(3, SceneConfig(height=640, width=640)).read()
    moved = np.zeros_like(img)
    moved[:, 256:320, 256:320] = img[:, :64, :64]
    a = region_only_labels(model, ImageSource(img, axes="CYX", normalize=norm), 0, 0, 64,
                           "centred")
    b = region_only_labels(model, ImageSource(moved, axes="CYX", normalize=norm), 4, 4, 64,
                           "alone")
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="mode"):
        region_only_labels(model, ImageSource(img, axes="CYX", normalize=norm), 0, 0, 64,
                           "nowhere")


def test_a_detection_is_explained_by_the_centre_map(demo_run, capsys):
    # --output centre: the change of the detection score (a yes/no probability per pixel)
    from napari_xt.cli import main
    from napari_xt.io import read_detections

    d = demo_run
    table = read_detections(d / "r.zarr", "prediction")
    assert len(table["y"]) > 0
    y, x = int(table["y"][0]), int(table["x"][0])
    args = ["inspect", str(d / "r.zarr"), str(d / "scene.npy"), "--model", "demo",
            "--region", f"{y // 64},{x // 64}", "--pixel", f"{y % 64},{x % 64}",
            "--output", "centre", "--out", str(d / "det.json")]
    assert main(args) == 0
    import json

    doc = json.loads((d / "det.json").read_text())
    assert abs(sum(v for row in doc["values"] for v in row if v is not None) - 1) < 1e-5
    assert main([*args[:-4], "--output", "nope"]) == 2
    assert "no output 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("depth, causal", [(1, False), (2, False), (2, True), (3, True)])
def test_hyper_occlusion_from_first_layer_statistics_equals_a_forward_per_region(depth, causal):
    # the exact update (large crops) against one full forward per occluded region
    from napari_xt.engine.plan import RegionPlan
    from napari_xt.inspect import contributions as C

    model = tiny({"kind": "hyper", "dim": 16, "depth": depth, "head_dim": 8, "mlp_dim": 16,
                  "causal": causal}, crop_regions=4)
    src = ImageSource(image(4, 128))
    plan = RegionPlan(128, 128, 32, 4)
    inputs = C._crop_inputs(model, src, plan, plan.crops[0], (1, 2), None)
    assert C.occlusion.supports(model, inputs.tokens.shape[1], min_tokens=1)
    assert not C.occlusion.supports(model, inputs.tokens.shape[1])  # (too few to pay)
    slow = C._occlusion_contribution(model, inputs)
    fast_supports = C.occlusion.supports
    try:
        C.occlusion.supports = lambda m, n: fast_supports(m, n, min_tokens=1)
        fast = C._occlusion_contribution(model, inputs)
    finally:
        C.occlusion.supports = fast_supports
    assert slow.max() > 0
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5 * slow.max())


def test_a_view_without_context_comes_from_the_runs_embedding_cache(demo_run):
    # the regions of a view decoded with the context encoder skipped: from the store's
    # embedding cache (only the head reruns) they equal, up to the cache's fp16, the
    # region-only answer computed from the pixels
    from napari_xt.inspect.view import labels_without_context, mosaic
    from napari_xt.model.choice import load_model
    from napari_xt.widgets.context_probe import region_only_labels

    d = demo_run
    model, _, norm = load_model("demo")
    src = ImageSource(str(d / "scene.npy"), normalize=norm)
    view = [(r, c) for r in (1, 2, 3) for c in (2, 3, 4)] + [(9, 9)]  # one outside
    cached = labels_without_context(model, src, view, region_size=64, store=d / "r.zarr")
    fresh = labels_without_context(model, src, view, region_size=64)
    assert (cached.from_cache, cached.encoded) == (9, 0) and (fresh.from_cache,
                                                              fresh.encoded) == (0, 9)
    for r, c in view[:-1]:
        alone = region_only_labels(model, src, r, c, 64, "identity")
        np.testing.assert_array_equal(fresh.labels[(r, c)], alone)
        assert np.mean(cached.labels[(r, c)] != alone) < 0.01
    data, origin = mosaic(cached, 64)
    assert data.shape == (192, 192) and origin == (64, 128)
    np.testing.assert_array_equal(data[64:128, :64], cached.labels[(2, 2)])


def test_the_crops_recomputed_are_the_engines_own_away_from_the_origin():
    # The engine gives the model crop-relative region positions; the maps must explain
    # that computation: the recomputed output of a region in a crop that does not start
    # at (0, 0) equals the run's (one crop per region at stride 8, so no blending).
    from napari_xt.engine import Finished, run
    from napari_xt.engine.plan import RegionPlan
    from napari_xt.inspect import contributions as C
    from napari_xt.model.choice import load_model
    from napari_xt.train.synthetic import SceneConfig, SyntheticScene

    model, _, norm = load_model("demo")
    img, _ = SyntheticScene(12, SceneConfig(height=1024, width=1024)).read()
    fin = list(run(img, model, None, normalize=norm, axes="CYX", crop_stride=8,
                   outputs=("labels", "probabilities"), cache=False))[-1]
    assert isinstance(fin, Finished)
    stored = np.asarray(fin.summary["arrays"]["probabilities"], np.float32)  # (K, H, W)
    src = ImageSource(img, axes="CYX", normalize=norm)
    plan = RegionPlan(1024, 1024, 64, 8, 8)
    for region in [(10, 10), (3, 12), (15, 0)]:
        crop = next(c for c in plan.crops if c.contains(*region))
        inputs = C._crop_inputs(model, src, plan, crop, region, None)
        with torch.no_grad():
            probs = C._target_probs(model, model.contextualize(inputs.tokens)[0], inputs)
        r, c = region
        want = stored[:, r * 64:(r + 1) * 64, c * 64:(c + 1) * 64].reshape(3, -1)
        np.testing.assert_allclose(probs[0].numpy(), want, atol=2e-3)  # (fp16 probabilities)


def test_a_store_that_does_not_record_its_runs_settings_is_refused(demo_run, tmp_path):
    # an older store without the crop settings: refused in one line, never a map of 1 x 1
    # crops that gives the region itself all the weight
    import json
    import shutil

    from napari_xt.inspect.stored import InspectError, run_settings

    old = tmp_path / "old.zarr"
    shutil.copytree(demo_run / "r.zarr", old)
    meta = json.loads((old / "zarr.json").read_text())
    sig = meta["attributes"]["napari-xt"]["run_signature"]
    del sig["crop_regions"], sig["crop_stride"]
    (old / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(InspectError, match="does not record its run's crop_regions, crop_stride"):
        run_settings(old)


def image_model():
    """A tiny whole-image context model whose reader is not silent (random weights)."""
    torch.manual_seed(0)
    model = create_model("xt_tiny_demo_seg", in_chans=1, num_classes=3,
                         region={"backbone": "test_convnext3", "region_size": 32, "in_chans": 1},
                         tokenizer={"region_size": 32},
                         context={"kind": "hyper", "dim": 16, "depth": 1, "head_dim": 8,
                                  "mlp_dim": 16, "causal": False},
                         crop_regions=2, head=HEAD,
                         global_context={"grid": 8, "depth": 1, "head_dim": 8, "mlp_dim": 16})
    with torch.no_grad():
        model.global_context.reader.proj.weight.normal_(0, 0.5)
    return model.eval()


def test_whole_image_context_maps_span_the_whole_image_as_the_engine_computes_it():
    # the scene the crop reads is the engine's (same summaries, cells and origin): the
    # recomputed output equals the run's with context="image"; regions far outside the
    # crop then carry weight, which a crop model's map cannot show (NaN there)
    from napari_xt.engine import Finished, run
    from napari_xt.engine.plan import RegionPlan
    from napari_xt.inspect import contributions as C
    from napari_xt.inspect.whole_image import Scene, _read

    model = image_model()
    img = image(5, 192)  # 6 x 6 regions, crops of 2 x 2
    fin = list(run(img, model, None, axes="YX", context="image", crop_stride=2, cache=False,
                   outputs=("labels", "probabilities")))[-1]
    assert isinstance(fin, Finished)
    stored = np.asarray(fin.summary["arrays"]["probabilities"], np.float32)
    src = ImageSource(img)
    plan = RegionPlan(192, 192, 32, 2, 2)
    scene = Scene(model, src, plan)
    region = (3, 4)
    crop = next(c for c in plan.crops if c.contains(*region))
    inputs = C._crop_inputs(model, src, plan, crop, region, None)
    with torch.no_grad():
        read = _read(model, inputs, inputs.tokens, scene, scene.tokens(scene.summaries[None]))
        probs = C._target_probs(model, model.contextualize(read)[0], inputs)
    want = stored[:, 96:128, 128:160].reshape(3, -1)
    np.testing.assert_allclose(probs[0].numpy(), want, atol=2e-3)

    for method in ("occlusion", "gradient"):
        cm = contribution_map(model, src, region, method, stride=2)
        assert np.isfinite(cm.values).all() and np.isclose(cm.values.sum(), 1.0)
        outside = np.ones((6, 6), bool)
        outside[crop.row0:crop.row0 + 2, crop.col0:crop.col0 + 2] = False
        assert cm.values[outside].sum() > 0.1, (method, cm.values)
    with pytest.raises(ValueError, match="gradient or occlusion"):
        contribution_map(model, src, region, "attention")
    crop_only = tiny({"kind": "hyper", "dim": 16, "depth": 1, "head_dim": 8, "mlp_dim": 16,
                      "causal": False})
    assert np.isnan(contribution_map(crop_only, src, region, "occlusion", stride=2)
                    .values[0, 0])
