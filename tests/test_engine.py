"""Engine behaviour: equivalence with the model's forward, seams, cancel/resume, cache."""

import os
import platform
import sys
import threading

import numpy as np
import pytest
import torch

from napari_xt.engine import (
    Cancelled,
    ContextStep,
    Finished,
    Notice,
    Planned,
    RegionDecoded,
    run,
)
from napari_xt.engine.store import DONE, open_result
from napari_xt.model import create_model
from napari_xt.model.xt import XT, token_maps


class CountingXT(XT):
    """Records the regions each encoder call sees (by a marker pixel) and decoded counts.
    Calls have a fixed size; the regions that only fill a call (copies of the call's last
    region when encoding, rows at PAD_ROW when decoding) are not counted."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.encoded_ids: list[int] = []
        self.decoded = 0

    def encode_regions(self, x):
        ids = [int(round(v)) for v in x[:, 0, 0, 0].tolist()]
        self.encoded_ids.extend(dict.fromkeys(ids))  # copies filling the batch: once
        return super().encode_regions(x)

    def decode(self, tokens, features=None, region_rc=None):
        if region_rc is not None:
            from napari_xt.engine.crops import PAD_ROW

            self.decoded += int((np.asarray(region_rc)[:, 0] < PAD_ROW).sum())
        return super().decode(tokens, features, region_rc)


def seg_model(cls=XT, head=None, **overrides):
    """The zoo's tiny segmentation demo at 64 px regions, 2 x 2 crops, a narrow decoder."""
    head = {"decoder_channels": (32, 16, 16, 8, 8), **(head or {})}
    cfg = create_model("xt_tiny_demo_seg", crop_regions=2, tokenizer={"region_size": 64},
                       head=head, **overrides).cfg
    return cls(cfg).eval()


def marked_image(rows, cols, s=64, seed=0):
    """Random image whose region (r, c) has the id r * cols + c at its first pixel."""
    img = np.random.default_rng(seed).random((rows * s, cols * s, 3)).astype(np.float32)
    for r in range(rows):
        for c in range(cols):
            img[r * s, c * s, 0] = r * cols + c
    return img


def forward_probs(model, img):
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
        return model(x)["logits"].softmax(1)[0].numpy()  # (K, H, W)


def test_one_crop_image_equals_model_forward():
    model = seg_model()
    img = np.random.default_rng(1).random((120, 100, 3)).astype(np.float32)  # 2 x 2 regions
    events = list(run(img, model, None, cache=False, outputs=("labels", "probabilities")))
    assert isinstance(events[0], Planned) and events[0].crops == 1
    fin = events[-1]
    assert isinstance(fin, Finished)
    probs = fin.summary["arrays"]["probabilities"].astype(np.float32)
    ref = forward_probs(model, img)
    assert probs.shape == ref.shape == (2, 120, 100)
    np.testing.assert_allclose(probs, ref, atol=1e-3)  # float16 storage
    labels = fin.summary["arrays"]["labels"]
    sure = np.abs(ref[1] - ref[0]) > 2e-3
    np.testing.assert_array_equal(labels[sure], ref.argmax(0)[sure])


def test_classification_one_crop_equals_forward():
    model = create_model("xt_tiny_demo", crop_regions=2).eval()
    img = np.random.default_rng(2).random((200, 256, 3)).astype(np.float32)
    fin = list(run(img, model, None, cache=False))[-1]
    with torch.no_grad():
        ref = model(torch.from_numpy(img.transpose(2, 0, 1).copy())[None])["logits"][0]
    record = fin.summary["classification"]
    np.testing.assert_allclose(record["logits"], ref.numpy(), rtol=1e-4, atol=1e-5)
    assert record["class"] == int(ref.argmax())


@pytest.mark.parametrize("kind", ["constant", "gradient"])
def test_no_seams_beyond_the_models_own(kind):
    """The head decodes each region on its own (as `XT.forward` does), so an untrained
    model already steps at region borders; the engine must add nothing where crops end
    and regions meet: its border steps stay within the model's own and within the largest
    step inside regions."""
    model = seg_model()
    s, n = 64, 5
    if kind == "constant":
        img = np.full((n * s, n * s, 3), 0.5, np.float32)
    else:
        yy, xx = np.mgrid[: n * s, : n * s]
        img = np.repeat(((yy + 2 * xx) / (3 * n * s))[..., None], 3, -1).astype(np.float32)
    fin = list(run(img, model, None, cache=False, outputs=("labels", "probabilities")))[-1]
    p = fin.summary["arrays"]["probabilities"][1].astype(np.float32)
    ref = forward_probs(model, img)[1]
    bounds = [s * i - 1 for i in range(1, n)]
    for axis in (0, 1):
        d = np.abs(np.diff(p, axis=axis))
        d_ref = np.abs(np.diff(ref, axis=axis))
        jump = np.take(d, bounds, axis=axis)
        ref_jump = np.take(d_ref, bounds, axis=axis)
        inner = np.delete(d, bounds, axis=axis).max()
        assert jump.max() <= 1.1 * inner, (axis, jump.max(), inner)
        assert jump.max() <= ref_jump.max() + 2e-3, (axis, jump.max(), ref_jump.max())


class CropConstantXT(XT):
    """Decodes every region of a crop to one value that depends on the crop's context, so
    the unblended output would step wherever crops end."""

    def decode(self, tokens, features=None, region_rc=None):
        b, r, s = tokens.shape[0], len(region_rc), self.cfg.region.region_size
        level = 3 * torch.sin(tokens.float().mean(dim=(1, 2)) * 3000)  # (B,) differs by crop
        logits = torch.zeros(b, r, 2, s, s)
        logits[:, :, 1] = level[:, None, None, None]
        return {"logits": logits}  # (B, R, K, S, S)


class CropOffsetXT(XT):
    """The context sets every token of a crop to one crop-dependent value; each token
    decodes to one s/h x s/h block (nearest upsampling), so without blending the tokens the
    output would step wherever crops end."""

    def contextualize(self, tokens, state=None, append_cls=True):
        level = 3 * torch.sin(tokens.float().mean(dim=(1, 2)) * 3000)  # (B,) differs by crop
        return torch.zeros_like(tokens) + level[:, None, None].to(tokens.dtype), state

    def decode(self, tokens, features=None, region_rc=None):
        h, w = features[-1].shape[-2:]
        s = self.cfg.region.region_size
        deep = token_maps(tokens, region_rc, h, w)[:, :1]  # (R, 1, h, w)
        level = torch.nn.functional.interpolate(deep.float(), size=(s, s), mode="nearest")
        logits = torch.cat([torch.zeros_like(level), level], 1)
        return {"logits": logits.reshape(tokens.shape[0], -1, 2, s, s)}  # (B, R, K, S, S)


@pytest.mark.parametrize("kind", ["constant", "gradient"])
@pytest.mark.parametrize("blend", ["tokens", "outputs"])
def test_blending_has_no_seams_where_crops_end(kind, blend):
    """Crops disagree (their context differs); blending what `blend` names over the crops'
    windows must leave no step where crops end: no larger than steps inside regions and a
    fifth of the step without overlap. Token blending is at token resolution: 128 px
    regions give 4 x 4 tokens each, 8 per crop side (64 px regions, 2 per side, would leave
    only 4 window samples across a crop)."""
    s, n = (128, 5) if blend == "tokens" else (64, 5)
    cfg = create_model("xt_tiny_demo_seg", crop_regions=2, tokenizer={"region_size": s}).cfg
    model = (CropOffsetXT if blend == "tokens" else CropConstantXT)(cfg).eval()
    yy, xx = np.mgrid[: n * s, : n * s]
    img = np.full((n * s, n * s, 3), 0.5, np.float32)
    if kind == "gradient":
        img = np.repeat(((yy + 2 * xx) / (3 * n * s))[..., None], 3, -1).astype(np.float32)
    img = img + (np.sin(yy / 17.0) * np.cos(xx / 23.0))[..., None].astype(np.float32)
    hard = list(run(img, model, None, cache=False, crop_stride=2, blend=blend,
                    outputs=("labels", "probabilities")))[-1]
    p_hard = hard.summary["arrays"]["probabilities"][1].astype(np.float32)
    fin = list(run(img, model, None, cache=False, blend=blend,
                   outputs=("labels", "probabilities")))[-1]
    p = fin.summary["arrays"]["probabilities"][1].astype(np.float32)
    bounds = [s * i - 1 for i in range(1, n)]
    for axis in (0, 1):
        d_hard = np.take(np.abs(np.diff(p_hard, axis=axis)), [s * 2 - 1], axis=axis).max()
        assert d_hard > 0.05  # crops really disagree: without overlap there is a step
        d = np.abs(np.diff(p, axis=axis))
        jump = np.take(d, bounds, axis=axis).max()
        inner = np.delete(d, bounds, axis=axis).max()
        assert jump <= 1.5 * inner + 1e-3, (axis, jump, inner)
        assert jump < d_hard / 5, (axis, jump, d_hard)


def test_cancel_then_resume_recomputes_no_finished_region(tmp_path):
    rows, cols = 4, 5
    img = marked_image(rows, cols)
    out = tmp_path / "out.zarr"
    model = seg_model(CountingXT)
    stop = threading.Event()
    steps = 0
    events = []
    for ev in run(img, model, out, cancel=stop, batch_size=4):
        events.append(ev)
        if isinstance(ev, ContextStep):
            steps += 1
            if steps == 4:
                stop.set()
    assert isinstance(events[-1], Cancelled)
    state = open_result(out).region_status()
    finished = {(int(r), int(c)) for r, c in np.argwhere(state == DONE)}
    assert 0 < len(finished) < rows * cols
    first_encoded = set(model.encoded_ids)

    model.encoded_ids.clear()
    model.decoded = 0
    events = list(run(img, model, out, batch_size=4))
    assert isinstance(events[-1], Finished), events[-1]
    assert events[0].resumed and events[0].todo_regions == rows * cols - len(finished)
    assert any(isinstance(e, Notice) and "resuming" in e.message for e in events)
    ids = {r * cols + c for r, c in finished}
    assert not ids & set(model.encoded_ids)  # finished regions: from the cache
    assert not first_encoded & set(model.encoded_ids)  # nothing encoded twice
    decoded = {i for e in events if isinstance(e, RegionDecoded) for i in e.indices}
    assert not decoded & finished
    from napari_xt.engine.plan import RegionPlan

    plan = RegionPlan(img.shape[0], img.shape[1], 64, 2)
    todo = np.ones(plan.grid, bool)
    for r, c in finished:
        todo[r, c] = False
    assert model.decoded == int(todo.sum())  # blend="tokens": each unfinished region once

    # the resumed result equals an uninterrupted run
    full = tmp_path / "full.zarr"
    list(run(img, model, full, batch_size=4))
    from napari_xt.io import read_labels

    a = np.asarray(read_labels(out, "prediction").levels[0])
    b = np.asarray(read_labels(full, "prediction").levels[0])
    np.testing.assert_array_equal(a, b)

    # a finished store: nothing to do again, results untouched
    model.encoded_ids.clear()
    again = list(run(img, model, out))
    assert isinstance(again[-1], Finished) and again[0].todo_regions == 0
    assert again[-1].summary["labels"] == "labels/prediction"
    assert model.encoded_ids == []
    np.testing.assert_array_equal(np.asarray(read_labels(out, "prediction").levels[0]), b)


def test_orders_give_the_same_result():
    img = marked_image(3, 5)
    model = seg_model()
    results = {}
    for order in ("raster", "zigzag", "viewport"):
        fin = list(run(img, model, None, cache=False, order=order, strip_width=1,
                       outputs=("labels", "probabilities"),
                       point=(150.0, 250.0)))[-1]
        results[order] = fin.summary["arrays"]["probabilities"]
    # the same sums in another order: equal up to float rounding (stored as float16)
    np.testing.assert_allclose(results["raster"], results["zigzag"], atol=1e-3)
    np.testing.assert_allclose(results["raster"], results["viewport"], atol=1e-3)


def test_crops_run_in_batches_give_the_same_result():
    img = marked_image(4, 5)
    model = seg_model()
    out = {}
    for bs in (1, 16):  # 1: crop by crop; 16: four 2 x 2 crops per context/decode batch
        events = list(run(img, model, None, cache=False, batch_size=bs,
                          outputs=("labels", "probabilities")))
        out[bs] = (events[-1].summary["arrays"]["probabilities"],
                   sorted(i for e in events if isinstance(e, RegionDecoded) for i in e.indices))
    np.testing.assert_allclose(out[1][0], out[16][0], atol=1e-3)
    assert out[1][1] == out[16][1]


def test_spilled_accumulators_give_the_same_result(monkeypatch, tmp_path):
    """Boundary accumulators sent to disk come back exactly: forcing every accumulator but
    two out of memory changes nothing in the output, and the scratch folder is removed."""
    import napari_xt.engine.execution as stages
    from napari_xt.engine.scratch import Accumulators

    img = marked_image(6, 4)
    model = seg_model()
    made = []

    class Tiny(Accumulators):
        def __init__(self, capacity, device="cpu", folder=None):
            super().__init__(2, device, folder=str(tmp_path))
            made.append(self)

    out = {}
    for label in ("memory", "spilled"):
        if label == "spilled":
            monkeypatch.setattr(stages, "Accumulators", Tiny)
        fin = list(run(img, model, None, cache=False, strip_width=1,
                       outputs=("labels", "probabilities")))[-1]
        assert isinstance(fin, Finished)
        out[label] = fin.summary["arrays"]
    assert made and made[0].spills > 0
    assert list(tmp_path.iterdir()) == []  # scratch removed at the end of the run
    for key in ("labels", "probabilities"):
        np.testing.assert_array_equal(out["memory"][key], out["spilled"][key])


def test_accumulators_spill_and_return_exactly(tmp_path):
    from napari_xt.engine.scratch import Accumulators

    acc = Accumulators(2, folder=str(tmp_path))
    rng = np.random.default_rng(0)
    want = {}
    for i in range(5):
        a = torch.from_numpy(rng.random((3, 4, 4)).astype(np.float32))
        w = torch.from_numpy(rng.random((4, 4)).astype(np.float32))
        want[(i, 0)] = (a.clone(), w.clone())
        acc.new((i, 0), a, w)
    assert len(acc) == 5 and acc.in_memory == 2 and acc.spills == 3
    slot = acc.get((0, 0))  # back from disk, now the most recent
    slot[0] += 1.0
    assert acc.in_memory == 2 and (0, 0) in acc
    for idx, (a, w) in want.items():
        got = acc.pop(idx)
        extra = 1.0 if idx == (0, 0) else 0.0
        torch.testing.assert_close(got[0], a + extra, rtol=0, atol=0)
        torch.testing.assert_close(got[1], w, rtol=0, atol=0)
    assert len(acc) == 0
    with pytest.raises(KeyError):
        acc.pop((9, 9))
    acc.close()
    assert list(tmp_path.iterdir()) == []


def test_tile_cache_is_sized_by_the_strip_not_the_image():
    import dask.array as da

    from napari_xt.io.source import ImageSource

    sizes = {}
    for side in (16384, 65536):
        src = ImageSource(da.zeros((side, side, 3), dtype=np.uint8, chunks=(512, 512, 3)))
        sizes[side] = src.fit_tile_cache(width=(16 * 2 + 4) * 128, height=2 * 4 * 128)
    assert sizes[16384] == sizes[65536] == (9 + 1) * (2 + 1) * 512 * 512 * 3
    big = ImageSource(da.zeros((65536, 65536, 3), dtype=np.uint8, chunks=(2048, 2048, 3)))
    assert big.fit_tile_cache(4608, 1024) == (3 + 1) * (1 + 1) * 2048 * 2048 * 3


def test_tile_cache_reads_a_tile_once_when_two_threads_want_it():
    """The reader thread and a direct read want the same tile at once: it is read once, and
    the cache's byte count stays the bytes it holds (a double insert used to count a tile
    twice, shrinking the cache until it thrashed)."""
    import time

    import dask.array as da

    from napari_xt.io.source import ImageSource

    reads = []

    def slow_block(block, block_info=None):
        reads.append(block_info[None]["chunk-location"])
        time.sleep(0.2)
        return block

    arr = da.map_blocks(slow_block, da.ones((256, 256), dtype=np.uint8, chunks=(64, 64)),
                        dtype=np.uint8)
    src = ImageSource(arr)
    out = [None, None]

    def read(n):
        out[n] = src.read_box(10, 10, 20, 20)

    threads = [threading.Thread(target=read, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reads == [(0, 0)]
    assert (out[0] == 1).all() and (out[1] == 1).all()
    src.tile_cache_bytes = 2 * 64 * 64  # two tiles
    for y in range(0, 256, 64):
        src.read_box(y, 0, y + 8, 8)
    assert len(src._tiles) == 2 and src._tile_bytes == sum(t.nbytes for t in src._tiles.values())


def test_embedding_cache_says_what_disk_it_will_take(tmp_path, monkeypatch):
    import collections
    import shutil

    img = marked_image(3, 4)
    events = list(run(img, seg_model(), tmp_path / "a.zarr", batch_size=4))
    notes = [e for e in events if isinstance(e, Notice) and "embedding cache" in e.message]
    assert len(notes) == 1 and notes[0].kind == "cache"
    assert "more for 8 regions" in notes[0].message  # 12 regions, the first batch of 4 done
    assert " free" in notes[0].message and "NOT" not in notes[0].message

    # a disk that fills after the run was planned (a disk full at the start is refused
    # before anything is written: tests/test_cli_bad_input.py)
    from napari_xt.engine import budget

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(budget, "free_disk", lambda path: (10**9, tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    events = list(run(img, seg_model(), tmp_path / "b.zarr", batch_size=4))
    warn = [e for e in events if isinstance(e, Notice) and "embedding cache" in e.message]
    assert len(warn) == 1 and warn[0].kind == "warning" and "will NOT fit" in warn[0].message
    assert "--no-cache" in warn[0].message and isinstance(events[-1], Finished)


HEAP_CHILD = r"""
import sys
import numpy as np
if sys.argv[1] == "bound":
    from napari_xt.engine.device import bound_heap
    assert bound_heap()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
a = np.ones(16 << 20, np.uint8); del a  # glibc would now keep buffers up to 16 MB in its heap
base = rss()
blocks = [np.ones(8 << 20, np.uint8) for _ in range(20)]
del blocks[:-1]  # all but the last freed (the last keeps the heap's top in use)
print(rss() - base)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_a_run_gives_freed_buffers_back_to_the_system():
    """The engine fixes glibc's mmap threshold (device.bound_heap): 160 MB of 8 MB buffers
    freed go back to the system, where the default would keep them in the heap."""
    import subprocess

    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    kept = {mode: float(subprocess.run([sys.executable, "-c", HEAP_CHILD, mode], env=env,
                                       capture_output=True, text=True, check=True).stdout)
            for mode in ("default", "bound")}
    assert kept["default"] > 100, kept  # the failure this guards against is real here
    assert kept["bound"] < 30, kept
