"""One image over many workers (`run_distributed`): the same store as a single-process run,
bit for bit, also when a worker is killed mid-run, after a cancel and its resume, and with
whole-image context; the parts' cache segments; what cannot be split is refused."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest
import torch
from _store_cases import (  # the autouse _small_shards: shards of 2 x 2 regions, 3 levels
    _small_shards,  # noqa: F401
    assert_same_results,
    complete,
    small_shards,
    write_scene,
)

from napari_xt.cli import main
from napari_xt.distributed import block_grid, run_distributed
from napari_xt.distributed.schedule import default_block_side, make_schedule
from napari_xt.engine import (
    Cancelled,
    EngineInputError,
    Finished,
    Planned,
    RegionEncoded,
    Written,
    run,
)
from napari_xt.engine.cache import CacheMismatchError, EmbeddingCache
from napari_xt.engine.plan import RegionPlan
from napari_xt.engine.regions import RegionBook
from napari_xt.io.box import Box

OUTPUTS = ("labels", "probabilities", "detections")


@pytest.fixture(scope="module")
def demo():
    from napari_xt.model.choice import load_model

    model, _, norm = load_model("demo")
    return model, norm


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return write_scene(tmp_path_factory.mktemp("scene"), 7, 640, 896)  # 10 x 14 regions


@pytest.fixture(scope="module")
def reference(scene, demo, tmp_path_factory):
    """The single-process run of the scene."""
    out = tmp_path_factory.mktemp("ref") / "single.zarr"
    model, norm = demo
    with small_shards():
        last = list(run(str(scene), model, out, normalize=norm, outputs=OUTPUTS))[-1]
    assert isinstance(last, Finished) and last.summary["complete"], last
    return out


def _events(scene, store, cluster, **kw):
    kw.setdefault("outputs", OUTPUTS)
    return list(run_distributed(str(scene), "demo", store, scheduler=cluster, threads=1,
                                block=4, **kw))


# ---------------------------------------------------------------------- no cluster needed
def test_blocks_cover_the_grid_once():
    blocks = block_grid((10, 14), 4)
    assert blocks[0] == Box(0, 0, 4, 4) and blocks[-1] == Box(8, 12, 10, 14)
    cover = np.zeros((10, 14), int)
    for b in blocks:
        cover[b.slices] += 1
    assert (cover == 1).all()
    assert default_block_side((10, 14), 32, 8, 2) == 8  # halved, never below a crop
    assert default_block_side((400, 400), 32, 8, 2) == 32  # a shard when that is enough


def test_schedule_waits_only_for_the_regions_its_crops_read():
    plan = RegionPlan(64 * 12, 64 * 16, 64, 4, 2)
    book = RegionBook(plan, np.zeros(plan.grid, bool))
    blocks = block_grid(plan.grid, 4)  # 3 x 4 blocks
    cached = np.zeros(plan.grid, bool)
    cached[:4] = True  # the first block row was encoded before
    s = make_schedule(plan, book, cached, blocks, book.todo_crops(), False)
    assert sorted(s.encode) == list(range(4, 12))
    assert all(r >= 4 for regions in s.encode.values() for r, _ in regions)
    assert s.waits[0] == {4, 5}  # its crops reach one region row into the blocks below
    assert s.waits[5] == {4, 5, 6, 8, 9, 10}
    assert {r for r, _ in s.reads[0]} == set(range(6))  # the regions those crops read
    assert {c for _, c in s.reads[0]} == set(range(6))
    done = np.zeros(plan.grid, bool)
    done[:4, :8] = True  # blocks 0 and 1 finished by an earlier run
    book = RegionBook(plan, done)
    s = make_schedule(plan, book, cached, blocks, book.todo_crops(), False)
    assert 0 not in s.regions and 1 not in s.regions and sorted(s.regions)[0] == 2
    whole = make_schedule(plan, book, cached, blocks, book.todo_crops(), True)
    assert sum(len(v) for v in whole.encode.values()) == int((~cached).sum())


def test_cache_parts_write_side_by_side_and_every_cache_reads_them(tmp_path):
    sig, grid = {"model": "x"}, (4, 4)
    main_cache = EmbeddingCache(tmp_path / "c", sig, grid)
    with pytest.raises(CacheMismatchError, match="made for another input"):
        EmbeddingCache(tmp_path / "c", {"model": "y"}, grid, segment="a")
    with pytest.raises(ValueError, match="letters, digits"):
        EmbeddingCache(tmp_path / "c", sig, grid, segment="../x")
    a = EmbeddingCache(tmp_path / "c", sig, grid, segment="a")
    b = EmbeddingCache(tmp_path / "c", sig, grid, segment="b")  # at once: own locks
    feats = [np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)]
    a.put([(0, 0), (0, 1)], feats)
    b.put([(3, 3), (2, 2)], [f + 100 for f in feats])
    for c in (a, b, main_cache):
        c.close()
    again = EmbeddingCache(tmp_path / "c", sig, grid)
    assert again.done.sum() == 4
    found, levels, bad, _ = again.get([(0, 1), (2, 2)])
    assert found == [(0, 1), (2, 2)] and not bad
    np.testing.assert_array_equal(levels[0][0], feats[0][1])
    np.testing.assert_array_equal(levels[0][1], feats[0][1] + 100)
    # a part handed the locations of what it reads sees exactly those (no index is read)
    known = again.locations([(0, 1), (2, 2), (1, 1)])
    assert sorted(known) == [(0, 1), (2, 2)] and known[(0, 1)][0] == "a"
    again.close()
    told = EmbeddingCache(tmp_path / "c", sig, grid, segment="r0", known=known)
    assert told.done.sum() == 2 and not told.has(0, 0)
    found, levels, bad, _ = told.get([(2, 2), (0, 1)])
    assert found == [(2, 2), (0, 1)] and not bad
    np.testing.assert_array_equal(levels[0][0], feats[0][1] + 100)
    told.close()
    seg = next(tmp_path.joinpath("c").glob("seg-b-*.bin"))
    data = bytearray(seg.read_bytes())
    data[5] ^= 0xFF  # a garbled byte in part b's blobs: that region is bad, never garbage
    seg.write_bytes(bytes(data))
    third = EmbeddingCache(tmp_path / "c", sig, grid)
    found, _, bad, _ = third.get([(0, 0), (3, 3)])
    assert found == [(0, 0)] and list(bad) == [(3, 3)]
    third.close()


def test_what_cannot_be_split_is_refused_before_any_work(scene, tmp_path):
    out = tmp_path / "x.zarr"
    for kw, words in (({"carry_state": True}, "carry_state"),
                      ({"order": "viewport"}, "viewport"),
                      ({"cache": False}, "needs the cache"),
                      ({"block": 0}, "block must be at least 1"),
                      ({"devices": ["cuda0"]}, "device 'cuda0'"),
                      ({"devices": ["cuda:0", "cuda:1"]}, "CUDA device"),
                      ({"devices": ["cpu"], "scheduler": "tcp://127.0.0.1:1"},
                       "devices are for local workers")):
        with pytest.raises(EngineInputError, match=words):
            run_distributed(str(scene), "demo", out, **kw)
    with pytest.raises(EngineInputError, match="result store"):
        run_distributed(str(scene), "demo", None)
    assert not out.exists()


def test_a_part_of_a_classifiers_run_is_refused(scene, tmp_path):
    from napari_xt.engine.parts import Part
    from napari_xt.model import create_model

    with torch.device("meta"):  # (refused before anything is read or built)
        classifier = create_model("xt_tiny_demo")
    with pytest.raises(EngineInputError, match="classifier's run is not split"):
        run(str(scene), classifier, tmp_path / "x.zarr", part=Part("encode", "e0"))
    assert not (tmp_path / "x.zarr").exists()


def test_a_rebuild_refused_by_a_live_run_empties_nothing(tmp_path):
    """A cache rebuild waits for the lock before it empties: a live run's cache (and its
    parts) are left whole when the lock is refused."""
    from napari_xt.io.lock import LockedError

    grid = (2, 2)
    live = EmbeddingCache(tmp_path / "c", {"model": "x"}, grid)
    part = EmbeddingCache(tmp_path / "c", {"model": "x"}, grid, segment="e0")
    part.put([(0, 0)], [np.ones((1, 2, 2, 2), np.float32)])
    before = sorted(p.name for p in (tmp_path / "c").iterdir())
    with pytest.raises(LockedError):
        EmbeddingCache(tmp_path / "c", {"model": "y"}, grid, rebuild=True)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == before
    part.close()
    live.close()
    rebuilt = EmbeddingCache(tmp_path / "c", {"model": "y"}, grid, rebuild=True)
    assert rebuilt.rebuilt and not rebuilt.done.any()  # (with the lock: emptied)
    rebuilt.close()


# ---------------------------------------------------------------------- on a cluster
@pytest.mark.slow
def test_one_image_over_two_workers_equals_one_process(scene, reference, tmp_path, cluster,
                                                       demo):
    out = tmp_path / "dist.zarr"
    events = _events(scene, out, cluster)
    last = events[-1]
    assert isinstance(last, Finished) and last.summary["complete"], last
    planned = next(e for e in events if isinstance(e, Planned))
    assert planned.total_regions == planned.todo_regions == 140
    written = [i for e in events if isinstance(e, Written) for i in e.indices]
    assert sorted(written) == sorted(set(written)) and len(written) == 140
    assert last.counts["encoded"] == 140  # every region encoded once, over the parts
    assert last.counts["decoded"] == 140 and last.counts["from_cache"] == 0
    assert last.counts["crops"] == len(RegionPlan(640, 896, 64, 8).crops)  # as one process
    assert_same_results(out, reference)
    # the store is an ordinary one: a single-process run finds it complete
    model, norm = demo
    again = list(run(str(scene), model, out, normalize=norm, outputs=OUTPUTS))[-1]
    assert isinstance(again, Finished) and again.counts["encoded"] == 0
    # and so does a distributed one (the last event is Finished)
    again = _events(scene, out, cluster)[-1]
    assert isinstance(again, Finished) and again.summary["complete"], again
    # a run never iterated and closed leaves the store and its cache free
    unused = run_distributed(str(scene), "demo", tmp_path / "other.zarr", scheduler=cluster,
                             outputs=OUTPUTS)
    unused.close()
    assert isinstance(list(run(str(scene), model, tmp_path / "other.zarr", normalize=norm,
                               outputs=OUTPUTS))[-1], Finished)


def test_blended_outputs_over_two_workers_equal_one_process(scene, tmp_path, cluster, demo):
    """blend="outputs" decodes a region in each of its crops; over workers, in the blocks'
    parts, it gives the single process's results bit for bit (fixed-size decode calls)."""
    model, norm = demo
    single = tmp_path / "single.zarr"
    with small_shards():
        last = list(run(str(scene), model, single, normalize=norm, outputs=OUTPUTS,
                        blend="outputs"))[-1]
    assert isinstance(last, Finished) and last.summary["complete"], last
    out = tmp_path / "dist.zarr"
    last = _events(scene, out, cluster, blend="outputs")[-1]
    assert isinstance(last, Finished) and last.summary["complete"], last
    assert_same_results(out, single)


@pytest.mark.slow
def test_a_worker_killed_mid_run_changes_nothing(scene, reference, tmp_path, cluster):
    from distributed import Client

    out = tmp_path / "killed.zarr"
    killed = []
    with Client(cluster) as client:
        pids = client.run(os.getpid)
        last = None
        for e in run_distributed(str(scene), "demo", out, scheduler=cluster, threads=1,
                                 block=2, outputs=OUTPUTS, cache="rebuild"):
            last = e
            if isinstance(e, RegionEncoded) and not killed:
                busy = [w for w, tasks in client.processing().items() if tasks and w in pids]
                victim = busy[0] if busy else next(iter(pids))
                os.kill(pids[victim], signal.SIGKILL)  # as kill -9 would
                killed.append(victim)
        assert isinstance(last, Finished) and last.summary["complete"], last
        client.wait_for_workers(2, timeout=60)  # the cluster replaced it
    assert killed
    assert_same_results(out, reference)


@pytest.mark.slow
def test_cancel_reaches_the_workers_and_the_store_resumes(scene, reference, tmp_path,
                                                          cluster, demo):
    out = tmp_path / "cancelled.zarr"
    cancel = threading.Event()
    events = []
    for e in run_distributed(str(scene), "demo", out, scheduler=cluster, threads=1, block=2,
                             outputs=OUTPUTS, cancel=cancel):
        events.append(e)
        if isinstance(e, Written):
            cancel.set()
    assert isinstance(events[-1], Cancelled), events[-1]
    assert 0 < events[-1].done_regions < 140 and not complete(out)
    # a single-process run resumes it, reading what the parts cached
    model, norm = demo
    resumed = list(run(str(scene), model, out, normalize=norm, outputs=OUTPUTS))
    planned = next(e for e in resumed if isinstance(e, Planned))
    assert planned.resumed and planned.todo_regions == 140 - events[-1].done_regions
    assert resumed[-1].counts["from_cache"] > 0
    assert_same_results(out, reference)


@pytest.mark.slow
def test_whole_image_context_over_workers(tmp_path, cluster, demo):
    from napari_xt.model.checkpoint import save_checkpoint
    from napari_xt.model.xt import XT
    from napari_xt.model.zoo import apply_overrides

    base, norm = demo
    model = XT(apply_overrides(base.cfg, global_context={"grid": 4}))
    model.load_state_dict(base.state_dict(), strict=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a reader that is not silent
        for p in model.global_context.reader.proj.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    path = save_checkpoint(model.eval(), tmp_path / "scene_model.safetensors")
    image = write_scene(tmp_path, 3, 512, 768)
    single = tmp_path / "single.zarr"
    opts = {"outputs": OUTPUTS, "context": "image", "normalize": norm}
    last = list(run(str(image), model, single, **opts))[-1]
    assert isinstance(last, Finished), last
    out = tmp_path / "dist.zarr"
    stop = threading.Event()
    stop.set()  # cancelled before anything runs: the scene part and every part after it
    events = list(run_distributed(str(image), str(path), out, scheduler=cluster, threads=1,
                                  block=4, cancel=stop, **opts))
    assert isinstance(events[-1], Cancelled), events[-1]
    events = list(run_distributed(str(image), str(path), out, scheduler=cluster, threads=1,
                                  block=4, **opts))
    assert isinstance(events[-1], Finished) and events[-1].summary["complete"], events[-1]
    assert_same_results(out, single)


@pytest.mark.slow
def test_cli_one_image_over_workers(scene, reference, tmp_path, cluster, capsys):
    out = tmp_path / "cli.zarr"
    assert main(["predict", str(scene), "--model", "demo", "--out", str(out), "--outputs",
                 ",".join(OUTPUTS), "--scheduler", cluster, "--block", "4", "--threads", "1",
                 "--quiet"]) == 0
    assert "distributed: " in capsys.readouterr().err
    assert_same_results(out, reference)
    assert main(["predict", str(scene), "--model", "demo", "--out", str(out), "--outputs",
                 ",".join(OUTPUTS), "--scheduler", cluster, "--quiet"]) == 0  # complete
    assert "already done" in capsys.readouterr().err
    assert main(["predict", str(scene), "--model", "demo", "--out-dir", str(tmp_path / "d"),
                 "--block", "4"]) == 2
    assert "split one image" in capsys.readouterr().err
