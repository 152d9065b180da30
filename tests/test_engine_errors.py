"""Engine under bad conditions: out of memory, NaN pixels, unreadable regions, unwritable
or full output, wrong channels, images smaller than a region."""

import errno

import numpy as np
import pytest
import torch

from napari_xt.engine import (
    Cancelled,
    ContextStep,
    EngineInputError,
    Failed,
    Finished,
    Notice,
    RegionEncoded,
    RegionFailed,
    run,
)
from napari_xt.engine.store import DONE, FAILED, StoreError, open_result
from napari_xt.model import create_model
from napari_xt.model.xt import XT


def seg_model(cls=XT):
    cfg = create_model("xt_tiny_demo_seg", crop_regions=2, tokenizer={"region_size": 64},
                       head={"decoder_channels": (32, 16, 16, 8, 8)}).cfg
    return cls(cfg).eval()


class SmallMemoryXT(XT):
    """Runs out of memory on encoder batches of more than 2 regions."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.batch_sizes: list[int] = []

    def encode_regions(self, x):
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.batch_sizes.append(int(x.shape[0]))
        return super().encode_regions(x)


class Flaky:
    """An array whose pixels inside `bad` (y0, x0, y1, x1) cannot be read."""

    def __init__(self, array, bad):
        self.array, self.bad = array, bad
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, key):
        ys, xs = key[0], key[1]
        y0, x0, y1, x1 = self.bad
        if ys.start < y1 and ys.stop > y0 and xs.start < x1 and xs.stop > x0:
            raise OSError("corrupt tile at byte 4096")
        return self.array[key]


def image(rows=4, cols=4, seed=0):
    return np.random.default_rng(seed).random((rows * 64, cols * 64, 3)).astype(np.float32)


def test_oom_halves_the_batch_and_reports_it():
    model = seg_model(SmallMemoryXT)
    img = image(3, 3)
    events = list(run(img, model, None, cache=False, batch_size=8))
    assert isinstance(events[-1], Finished)
    notices = [e.message for e in events if isinstance(e, Notice) and e.kind == "oom"]
    assert notices[0] == "CPU out of memory: batch 8 -> 4"
    assert notices[1] == "CPU out of memory: batch 4 -> 2"
    # every call a full batch of 2 (the last one filled up), 9 regions encoded in all
    assert set(model.batch_sizes) == {2} and events[-1].counts["encoded"] == 9
    assert {e.batch_size for e in events if isinstance(e, RegionEncoded)} == {2}
    ref = list(run(img, model, None, cache=False, batch_size=2))[-1]
    np.testing.assert_array_equal(events[-1].summary["arrays"]["labels"],
                                  ref.summary["arrays"]["labels"])


def test_nan_pixels_are_reported_and_masked():
    img = image(2, 3)
    img[10:20, 70:90, :] = np.nan
    img[100, 5, 1] = np.inf
    events = list(run(img, seg_model(), None, cache=False,
                      outputs=("labels", "probabilities")))
    fin = events[-1]
    assert isinstance(fin, Finished)
    nan_notices = [e for e in events if isinstance(e, Notice) and e.kind == "nan"]
    assert nan_notices and "non-finite" in nan_notices[0].message
    assert fin.counts["nonfinite_pixels"] == 10 * 20 + 1
    labels = fin.summary["arrays"]["labels"]
    probs = fin.summary["arrays"]["probabilities"]
    assert (labels[10:20, 70:90] == 0).all() and labels[100, 5] == 0
    assert (probs[:, 10:20, 70:90] == 0).all()
    assert (probs.sum(0)[30:60, 30:60] > 0.99).all()  # elsewhere real probabilities


def test_read_error_stops_the_run(tmp_path):
    img = image()
    flaky = Flaky(img, (0, 128, 64, 192))  # region (0, 2) only
    events = list(run(flaky, seg_model(), tmp_path / "o.zarr", batch_size=2))
    failed = [e for e in events if isinstance(e, RegionFailed)]
    assert failed and failed[0].indices == ((0, 2),) and "corrupt tile" in failed[0].reason
    assert isinstance(events[-1], Failed) and "(0, 2)" in events[-1].message
    state = open_result(tmp_path / "o.zarr").region_status()
    assert state[0, 2] == FAILED


def test_read_error_continue_then_rerun_repairs(tmp_path):
    img = image()
    out = tmp_path / "o.zarr"
    flaky = Flaky(img, (0, 128, 64, 192))
    events = list(run(flaky, _same_weights(), out, on_error="continue", batch_size=2))
    fin = events[-1]
    assert isinstance(fin, Finished), fin
    assert fin.counts["failed"] == 1 and fin.summary["complete"] is False
    assert sum(isinstance(e, RegionFailed) for e in events) == 1
    state = open_result(out).region_status()
    # written, but not done: the failed region and the 5 regions whose crops lacked it
    assert state[0, 2] == FAILED and (state == DONE).sum() == 16 - 6
    # the source is readable again: the rerun redoes them, with their full context
    again = list(run(img, _same_weights(), out))
    assert again[0].todo_regions == 6, again[0]
    assert isinstance(again[-1], Finished) and again[-1].summary["complete"] is True
    full = tmp_path / "full.zarr"
    assert isinstance(list(run(img, _same_weights(), full))[-1], Finished)
    from napari_xt.io import read_labels

    np.testing.assert_array_equal(np.asarray(read_labels(out, "prediction").levels[0]),
                                  np.asarray(read_labels(full, "prediction").levels[0]))


def _same_weights():
    torch.manual_seed(0)
    return seg_model()


def test_unwritable_output_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    model = seg_model()
    with pytest.raises(StoreError, match="cannot write the output store"):
        run(image(1, 1), model, blocker / "out.zarr")


def test_full_disk_mid_run_keeps_finished_regions(tmp_path, monkeypatch):
    from napari_xt.engine.store import digests, layout

    monkeypatch.setattr(layout, "CHUNK", 64)  # 2 x 2 regions per shard: 4 shards
    monkeypatch.setattr(layout, "SHARD", 128)
    out = tmp_path / "o.zarr"
    original = digests.DigestStore.set
    calls = {"n": 0}

    async def full_after_two(self, key, value):
        if "/c/" in key:  # a shard file (not metadata)
            calls["n"] += 1
            if calls["n"] > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        await original(self, key, value)

    monkeypatch.setattr(digests.DigestStore, "set", full_after_two)
    events = list(run(image(), _same_weights(), out, batch_size=2))
    assert isinstance(events[-1], Failed)
    assert "No space left on device" in events[-1].message
    assert "finished regions are kept" in events[-1].message
    monkeypatch.setattr(digests.DigestStore, "set", original)
    again = list(run(image(), _same_weights(), out, batch_size=2))
    assert again[0].resumed and again[0].todo_regions == 16 - 2 * 4  # two shards committed
    assert isinstance(again[-1], Finished)
    full = tmp_path / "full.zarr"  # the same run, never interrupted
    assert isinstance(list(run(image(), _same_weights(), full, batch_size=2))[-1], Finished)
    from napari_xt.io import read_labels

    np.testing.assert_array_equal(np.asarray(read_labels(out, "prediction").levels[0]),
                                  np.asarray(read_labels(full, "prediction").levels[0]))


def test_wrong_channels_fail_before_any_work():
    model = seg_model(SmallMemoryXT)
    gray = np.zeros((128, 128), np.float32)
    with pytest.raises(EngineInputError, match="1 channel.*expects 3"):
        run(gray, model, None)
    assert model.batch_sizes == []


def test_image_smaller_than_one_region():
    img = np.random.default_rng(4).random((40, 30, 3)).astype(np.float32)
    model = _same_weights()
    fin = list(run(img, model, None, cache=False, outputs=("labels", "probabilities")))[-1]
    assert isinstance(fin, Finished)
    probs = fin.summary["arrays"]["probabilities"].astype(np.float32)
    assert probs.shape == (2, 40, 30)
    with torch.no_grad():
        ref = model(torch.from_numpy(img.transpose(2, 0, 1).copy())[None])["logits"]
    np.testing.assert_allclose(probs, ref.softmax(1)[0].numpy(), atol=1e-3)


def test_abandoned_stream_keeps_finished_regions_and_stops_threads(tmp_path):
    import threading

    from napari_xt.engine import Written

    out = tmp_path / "o.zarr"
    events = run(image(), _same_weights(), out, batch_size=2)
    for e in events:
        if isinstance(e, Written):
            break
    events.close()  # the consumer walks away mid-run
    assert not [t for t in threading.enumerate() if t.name.startswith("napari-xt-")]
    again = list(run(image(), _same_weights(), out, batch_size=2))
    assert again[0].resumed and again[0].todo_regions < 16
    assert isinstance(again[-1], Finished)


class SmallDecodeMemoryXT(XT):
    """Runs out of memory when one decode call gets more than `limit` regions, or one
    context call more than `context_limit` crops."""

    limit = 2
    context_limit = 1000

    def contextualize(self, tokens, state=None, append_cls=True):
        if tokens.shape[0] > self.context_limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return super().contextualize(tokens, state, append_cls)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.decoded_sizes: list[int] = []

    def decode(self, tokens, features=None, region_rc=None):
        n = int(features[0].shape[0]) if features is not None else 1
        if n > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        self.decoded_sizes.append(n)
        return super().decode(tokens, features, region_rc)


@pytest.mark.parametrize("blend", ["tokens", "outputs"])
@pytest.mark.parametrize("batch_size", [1, 16])
def test_oom_in_context_or_decode_backs_off_and_gives_the_same_result(batch_size, blend):
    """outputs: each crop's 4 regions go to decode calls of a fixed size (padded), which
    fail; the calls are halved to 2 regions. tokens: the context fails with more than 2
    crops per call (batch 16) and the decode of the regions completed together is done 2 at
    a time."""
    model = seg_model(SmallDecodeMemoryXT)
    if blend == "tokens":
        model.context_limit = 2
    img = image(4, 4)
    events = list(run(img, model, None, cache=False, batch_size=batch_size, blend=blend,
                      outputs=("labels", "probabilities")))
    assert isinstance(events[-1], Finished), events[-1]
    notices = [e.message for e in events if isinstance(e, Notice) and e.kind == "oom"]
    if batch_size == 16 and blend == "tokens":
        assert notices[0] == "CPU out of memory in context/decode: 4 crops -> 2 at a time"
    if blend == "outputs":
        assert "CPU out of memory in decode: 4 regions -> 2 at a time" in notices
    else:
        assert [m for m in notices if m.startswith("CPU out of memory in decode: ")], notices
    assert max(model.decoded_sizes) <= 2
    model.limit = model.context_limit = 1000  # the same weights with memory to spare
    ref = list(run(img, model, None, cache=False, batch_size=1, blend=blend,
                   outputs=("labels", "probabilities")))[-1]
    np.testing.assert_allclose(events[-1].summary["arrays"]["probabilities"],
                               ref.summary["arrays"]["probabilities"], atol=1e-3)
    assert (events[-1].summary["arrays"]["labels"] == ref.summary["arrays"]["labels"]).mean() \
        > 0.999


@pytest.mark.parametrize("blend", ["tokens", "outputs"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_every_decode_call_has_one_size_also_in_a_resumed_run(tmp_path, blend, batch_size):
    """What makes a resumed run equal an uninterrupted one bit for bit: a region's decode
    call holds exactly max(16, 2 x batch) regions (padded), whichever regions are left and
    whichever crops ran together; a resumed run (fewer regions left per crop) too."""
    model = seg_model(SmallDecodeMemoryXT)
    model.limit = 1000
    img = image(6, 5)
    out = tmp_path / "out.zarr"
    steps = 0

    def cancel():
        return steps >= 3

    events = []
    for e in run(img, model, out, batch_size=batch_size, blend=blend, cancel=cancel,
                 outputs=("labels", "probabilities")):
        events.append(e)
        steps += isinstance(e, ContextStep)
    assert isinstance(events[-1], Cancelled)
    resumed = list(run(img, model, out, batch_size=batch_size, blend=blend,
                       outputs=("labels", "probabilities")))
    assert isinstance(resumed[-1], Finished)
    assert model.decoded_sizes and set(model.decoded_sizes) == {max(16, 2 * batch_size)}


# ---------------------------------------------------------------------------- threads
class _ExplodingArray:
    """An image whose reads raise `error` once `after` boxes were read."""

    def __init__(self, array, error, after=2):
        self.array, self.error, self.after = array, error, after
        self.shape, self.dtype = array.shape, array.dtype
        self.reads = 0

    def __getitem__(self, key):
        self.reads += 1
        if self.reads > self.after:
            raise self.error
        return self.array[key]


@pytest.mark.parametrize("threaded", [False, True])
def test_an_error_in_the_reader_ends_the_run_with_failed(monkeypatch, threaded):
    """A MemoryError while reading pixels (a background reader thread beside a GPU) used to
    leave the run waiting forever after Planned."""
    import time

    from napari_xt.engine import device

    monkeypatch.setattr(device, "FORCE_THREADS", threaded)
    # the first reads (the image's identity: 4 sampled patches) go through
    img = _ExplodingArray(image(3, 3), MemoryError("cannot allocate 2 GiB"), after=5)
    t = time.perf_counter()
    events = list(run(img, _same_weights(), None, cache=False, batch_size=2))
    assert time.perf_counter() - t < 20
    assert isinstance(events[-1], Failed), events[-1]
    assert "MemoryError" in events[-1].message and "cannot allocate" in events[-1].message


class _ChunkedFlaky:
    """A source chunked in 128 px tiles (read through the engine's tile cache) whose tile
    (1, 0) cannot be read (one the image's identity samples do not touch)."""

    def __init__(self, array):
        self.array, self.shape, self.dtype = array, array.shape, array.dtype
        h, w = array.shape[:2]
        self.chunks = ((128,) * (h // 128), (128,) * (w // 128), (3,))

    def __getitem__(self, key):
        ys, xs = key[0], key[1]
        if ys.start == 128 and xs.start == 0:
            raise OSError("tile (1, 0) is unreadable")
        return self.array[key]


def test_an_error_in_a_tile_read_fails_its_regions_and_ends_the_run():
    from napari_xt.engine import RegionFailed

    events = list(run(_ChunkedFlaky(image(6, 6)), _same_weights(), None, cache=False,
                      batch_size=2))
    failed = [e for e in events if isinstance(e, RegionFailed)]
    assert failed and "tile (1, 0) is unreadable" in failed[0].reason
    assert failed[0].indices[0] in {(2, 0), (2, 1), (3, 0), (3, 1)}  # the tile's regions
    assert isinstance(events[-1], Failed) and "could not be read" in events[-1].message


@pytest.mark.parametrize("threaded", [False, True])
def test_an_error_in_the_store_writer_ends_the_run_with_failed(tmp_path, monkeypatch, threaded):
    import time

    from napari_xt.engine import device
    from napari_xt.engine.store import disk

    monkeypatch.setattr(device, "FORCE_THREADS", threaded)

    def broken(self, tiles):
        raise RuntimeError("the shard buffer is gone")

    monkeypatch.setattr(disk.DiskStore, "_place", broken)
    t = time.perf_counter()
    events = list(run(image(3, 3), _same_weights(), tmp_path / "o.zarr", batch_size=2))
    assert time.perf_counter() - t < 20
    assert isinstance(events[-1], Failed), events[-1]
    assert "the shard buffer is gone" in events[-1].message
    names = {t.name for t in __import__("threading").enumerate()}
    assert "napari-xt-writer" not in names and "napari-xt-reader" not in names
