"""The result store under faults: kills in every phase, lost or damaged state, damaged
results and caches, concurrent runs, outputs that must be refused. After each: the rerun's
results are bit-identical to an uninterrupted run's, or one clear error (exit 2) and
nothing of the user's changed.

Small shards (64 px chunks, 128 px shards: 12 shards on a 384 x 448 scene) make every
case cross shard borders. Killed runs are real processes ended with os._exit at an
injected point (no timing)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from _store_cases import (  # the fixtures _small_shards, demo and scene among them
    OUTPUTS,
    _small_shards,
    assert_same_results,
    complete,
    demo,
    demo_model,
    reference_run,
    run_demo,
    scene,
    small_shards,
    write_scene,
)

from napari_xt.engine import Finished, Notice, Planned, run
from napari_xt.engine.store import StoreError, layout
from napari_xt.io import read_detections, read_labels

KILL = r"""
import os, sys, torch
torch.set_num_threads(1)
from napari_xt.engine.store import layout, publish
layout.CHUNK, layout.SHARD, layout.MIN_PYRAMID = 64, 128, 128
image, store, fault = sys.argv[1], sys.argv[2], sys.argv[3]
kind, _, where = fault.partition(":")
if kind == "finish":
    def hook(step):
        if step == where:
            os._exit(9)
    publish.FAULT_HOOK = hook
else:
    from napari_xt.engine.store import disk
    original = disk.DiskStore._commit_complete
    count = [0]
    def commit(self, key):
        original(self, key)
        count[0] += 1
        if count[0] == int(where):
            os._exit(9)
    disk.DiskStore._commit_complete = commit
from napari_xt.engine import run
from napari_xt.model.choice import load_model
model, _, norm = load_model("demo")
OUTPUTS = ("labels", "probabilities", "detections")
for e in run(image, model, store, normalize=norm, outputs=OUTPUTS):
    pass
print(type(e).__name__, e)
"""


@pytest.fixture(scope="module")
def reference(scene, tmp_path_factory, demo):
    """An uninterrupted run (made with the module's settings)."""
    out = reference_run(scene, demo, tmp_path_factory.mktemp("ref") / "ref.zarr")
    assert len(read_detections(out, "prediction")["y"]) > 0
    return out


def _run(scene, demo, out, **kw):
    return run_demo(scene, demo, out, **kw)


def _kill(scene, out, fault):
    proc = subprocess.run([sys.executable, "-c", KILL, str(scene), str(out), fault],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, (proc.stdout, proc.stderr[-2000:])


_complete = complete


# ---------------------------------------------------------------------------- kills
def _damage(path, how: str, at: int, span: int, mask: int, part: int) -> None:
    """Damage a file: "garble" flips `span` bytes from `at` (XOR `mask`), "truncate" keeps
    the first 1 / `part` of it, anything else removes it."""
    data = path.read_bytes()
    if how == "garble":
        path.write_bytes(data[:at] + bytes(b ^ mask for b in data[at:at + span])
                         + data[at + span:])
    elif how == "truncate":
        path.write_bytes(data[: len(data) // part])
    else:
        path.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["commit:3", "finish:pyramid", "finish:preview",
                                   "finish:table", "finish:metadata", "finish:root",
                                   "finish:done"])
def test_a_kill_anywhere_leaves_a_store_the_rerun_finishes_exactly(scene, demo, reference,
                                                                   tmp_path, fault):
    out = tmp_path / "o.zarr"
    _kill(scene, out, fault)
    assert _complete(out) == (fault == "finish:done")  # never "complete" before it is
    events = _run(scene, demo, out)
    assert isinstance(events[-1], Finished) and events[-1].summary["complete"]
    planned = next(e for e in events if isinstance(e, Planned))
    if fault == "commit:3":
        assert 0 < planned.todo_regions < planned.total_regions  # kept what was committed
    else:
        assert planned.todo_regions == 0  # every region was committed before finishing
    assert_same_results(out, reference)


@pytest.mark.slow
def test_lost_journal_or_private_state_means_recompute_never_zeros(scene, demo, reference,
                                                                   tmp_path):
    import shutil

    out = tmp_path / "o.zarr"
    _kill(scene, out, "commit:5")
    (out / ".napari-xt" / "journal").unlink()  # progress state lost mid-run
    events = _run(scene, demo, out)
    assert next(e for e in events if isinstance(e, Planned)).todo_regions == 42
    assert_same_results(out, reference)
    shutil.rmtree(out / ".napari-xt")  # a user "cleaning up" a finished store
    events = _run(scene, demo, out)
    assert next(e for e in events if isinstance(e, Planned)).todo_regions == 42
    assert_same_results(out, reference)


# ---------------------------------------------------------------------------- damage
def _shards(out, array):
    return sorted(p for p in (out / array / "c").rglob("*") if p.is_file())


@pytest.mark.parametrize("damage", ["garble", "truncate", "delete"])
def test_damaged_label_shard_is_found_and_recomputed(scene, demo, reference, tmp_path,
                                                     damage):
    import shutil

    out = tmp_path / "o.zarr"
    shutil.copytree(reference, out)
    _damage(_shards(out, "labels/prediction/0")[4], damage, at=100, span=40, mask=0x5A,
            part=2)
    events = _run(scene, demo, out)
    assert isinstance(events[-1], Finished), events[-1]
    notes = [e.message for e in events if isinstance(e, Notice)]
    assert any("did not verify" in n for n in notes), notes
    planned = next(e for e in events if isinstance(e, Planned))
    assert 0 < planned.todo_regions <= 4  # only that shard's regions (2 x 2)
    assert_same_results(out, reference)


def test_damaged_pyramid_level_and_table_are_written_again(scene, demo, reference, tmp_path):
    import shutil

    out = tmp_path / "o.zarr"
    shutil.copytree(reference, out)
    level1 = _shards(out, "labels/prediction/1")[0]
    level1.write_bytes(level1.read_bytes()[:-3])
    (out / "tables/prediction/table.parquet").write_bytes(b"garbage")
    events = _run(scene, demo, out)
    assert isinstance(events[-1], Finished), events[-1]
    assert next(e for e in events if isinstance(e, Planned)).todo_regions == 0
    assert any("published results" in e.message for e in events if isinstance(e, Notice))
    assert_same_results(out, reference)
    import pyarrow.parquet as pq

    assert pq.read_table(out / "tables/prediction/table.parquet").num_rows == len(
        read_detections(reference, "prediction")["y"])


@pytest.mark.parametrize("damage", ["garble", "truncate", "delete"])
def test_damaged_embedding_cache_is_encoded_again(scene, demo, reference, tmp_path, damage):
    import shutil

    out = tmp_path / "o.zarr"
    shutil.copytree(reference, out)
    _damage(out / ".napari-xt/embeddings/pack-000000.bin", damage, at=5000, span=100,
            mask=0xFF, part=3)
    events = _run(scene, demo, out, resume=False)  # start again: features from the cache
    notes = [e.message for e in events if isinstance(e, Notice) and e.kind == "cache"]
    assert any("did not read back intact" in n for n in notes), notes
    fin = events[-1]
    assert isinstance(fin, Finished) and fin.counts["encoded"] > 0
    assert fin.counts["from_cache"] + fin.counts["encoded"] >= 42
    assert_same_results(out, reference)


# ---------------------------------------------------------------------------- concurrency
def test_a_second_run_into_a_busy_store_fails_at_once(scene, demo, reference, tmp_path):
    out = tmp_path / "o.zarr"
    first = run(str(scene), demo[0], out, normalize=demo[1], outputs=OUTPUTS)
    assert isinstance(next(first), Planned)  # running: holds the store
    for restart in (False, True):
        with pytest.raises(StoreError, match=f"in use by another run \\(pid {os.getpid()}"):
            run(str(scene), demo[0], out, normalize=demo[1], outputs=OUTPUTS,
                resume=not restart)
    rest = list(first)
    assert isinstance(rest[-1], Finished)
    assert_same_results(out, reference)  # the first run was not disturbed
    assert isinstance(_run(scene, demo, out)[-1], Finished)  # and the store is free again


def test_cli_refuses_a_store_another_process_holds(scene, tmp_path, capsys):
    from napari_xt.cli import main

    out = tmp_path / "o.zarr"
    (out / ".napari-xt").mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from napari_xt.io.lock import FolderLock; "
         "lock = FolderLock(sys.argv[1], 'x'); lock.acquire(); print('held', flush=True); "
         "time.sleep(60)", str(out / ".napari-xt")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(["predict", str(scene), "--model", "demo", "--out", str(out), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and f"pid {holder.pid}" in err and len(err.strip().splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()
    code = main(["predict", str(scene), "--model", "demo", "--out", str(out), "--quiet"])
    assert code == 0  # the holder died: its lock went with it


# ---------------------------------------------------------------------------- refusals
def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_cli_never_writes_into_the_input_or_foreign_folders(tmp_path, capsys):
    from napari_xt.cli import main
    from napari_xt.io import convert

    image = tmp_path / "in.ome.zarr"
    convert(np.random.default_rng(0).normal(-15, 3, (2, 300, 300)).astype(np.float32), image,
            axes="CYX", chunk=256, min_size=128)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("years of work")
    a_file = tmp_path / "a.txt"
    a_file.write_text("x")
    before = {p: _tree(p) for p in (image, foreign)}
    cases = [([str(image)], "is the input image"),
             ([str(image), "--overwrite"], "is the input image"),
             ([str(image / "sub.zarr")], "is inside the input image"),
             ([str(tmp_path)], "contains the input image"),
             ([str(foreign), "--overwrite"], "is not a napari-xt result store"),
             ([str(a_file)], "is a file")]
    for out, expected in cases:
        code = main(["predict", str(image), "--model", "demo", "--out", *out, "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and expected in err and "--out" in err, (out, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert {p: _tree(p) for p in (image, foreign)} == before
    assert a_file.read_text() == "x" and not (image / "sub.zarr").exists()


def test_replacing_a_store_removes_only_what_napari_xt_wrote(scene, demo, tmp_path):
    from napari_xt.io import list_results, write_labels

    out = tmp_path / "o.zarr"
    assert isinstance(_run(scene, demo, out)[-1], Finished)
    mine = np.zeros((384, 448), np.uint8)
    mine[10:20, 10:20] = 7
    write_labels(out, "mine", mine)  # a user's own result in the same store
    (out / "README.txt").write_text("my notes")
    with pytest.raises(StoreError, match="--overwrite|overwrite=True"):
        run(str(scene), demo[0], out, normalize=demo[1], outputs=OUTPUTS, threshold=0.9)
    events = _run(scene, demo, out, threshold=0.9, overwrite=True)
    assert isinstance(events[-1], Finished)
    assert set(list_results(out)["labels"]) == {"mine", "prediction"}
    np.testing.assert_array_equal(np.asarray(read_labels(out, "mine").levels[0]), mine)
    assert (out / "README.txt").read_text() == "my notes"


def test_leftovers_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    import socket

    from napari_xt.io import convert
    from napari_xt.io.store import _host

    dst = tmp_path / "c.ome.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".c.ome.zarr.tmp-{_host()}-{dead}-0123abcd"
    live = tmp_path / f".c.ome.zarr.tmp-{_host()}-{os.getpid()}-89abcdef"
    other = tmp_path / ".c.ome.zarr.tmp-otherhost-1-00000000"
    for p in (stale, live, other):
        p.mkdir()
        (p / "zarr.json").write_text("{}")
    assert socket.gethostname()
    convert(np.zeros((64, 64), np.uint8), dst, chunk=256, min_size=64)
    assert not stale.exists() and live.exists() and other.exists()


# ---------------------------------------------------------------------------- paths
@pytest.fixture(scope="module")
def wide_scene(tmp_path_factory):
    """640 x 640: 4 crops of 8 x 8 regions, so shards wait for later crops."""
    return write_scene(tmp_path_factory.mktemp("wide"), 6, 640, 640)


def test_memory_pressure_partial_shards_give_the_same_results(wide_scene, demo, tmp_path,
                                                              monkeypatch):
    from napari_xt.engine.store import disk

    # shards of 3 x 3 regions: the crops' 2-region steps leave shards half done for a while
    monkeypatch.setattr(layout, "SHARD", 192)
    reference = tmp_path / "ref.zarr"
    assert isinstance(_run(wide_scene, demo, reference, strip_width=3)[-1], Finished)
    monkeypatch.setattr(disk, "BUDGET", 1)  # every incomplete shard flushed at once
    flushed = []
    original = disk.DiskStore._flush_partial

    def spy(self, key):
        flushed.append(key)
        original(self, key)

    monkeypatch.setattr(disk.DiskStore, "_flush_partial", spy)
    out = tmp_path / "o.zarr"
    assert isinstance(_run(wide_scene, demo, out, strip_width=3)[-1], Finished)
    assert flushed  # shards were written before they were complete, and reloaded
    assert_same_results(out, reference)


def test_threaded_reader_and_writer_give_the_same_results(wide_scene, demo, tmp_path,
                                                          monkeypatch):
    """Beside a GPU the reader and the store's writer run in threads of their own."""
    from napari_xt.engine import Cancelled, Written, device

    reference = tmp_path / "ref.zarr"
    assert isinstance(_run(wide_scene, demo, reference)[-1], Finished)
    monkeypatch.setattr(device, "FORCE_THREADS", True)
    out = tmp_path / "o.zarr"
    stop = threading.Event()
    events = []
    for e in run(str(wide_scene), demo[0], out, normalize=demo[1], outputs=OUTPUTS,
                 cancel=stop):
        events.append(e)
        if isinstance(e, Written):
            stop.set()
    assert isinstance(events[-1], Cancelled), events[-1]
    names = {t.name for t in threading.enumerate()}
    assert "napari-xt-writer" not in names and "napari-xt-reader" not in names
    events = _run(wide_scene, demo, out)
    assert isinstance(events[-1], Finished) and events[0].resumed if isinstance(
        events[0], Planned) else True
    assert next(e for e in events if isinstance(e, Planned)).todo_regions < 100
    assert_same_results(out, reference)


def test_every_result_reaches_the_disk_before_the_store_says_complete(scene, demo, tmp_path,
                                                                     monkeypatch):
    # A power cut must not leave a store marked complete whose files were still only in
    # the page cache: every file of the results is fsynced before the root is rewritten
    # with "complete", the root after it; the embedding cache (checked when read) is not.
    from napari_xt.engine.store import publish

    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    marks: dict[str, int] = {}
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(publish, "FAULT_HOOK", lambda step: marks.setdefault(step, len(synced)))
    out = tmp_path / "o.zarr"
    fin = run_demo(scene, demo, out, cache=True)[-1]
    assert isinstance(fin, Finished) and fin.summary["complete"]
    before = set(synced[:marks["root"]])
    results = [str(p) for p in out.rglob("*") if p.is_file()
               and not str(p).startswith(str(layout.default_cache(out)))]
    late = [p for p in results if p not in before and p != str(out / "zarr.json")]
    assert not late, late
    assert any("labels" in p for p in before) and any("tables" in p for p in before)
    assert str(out / "zarr.json") in synced[marks["root"]:marks["done"]]
    packs = list(layout.default_cache(out).rglob("*.bin"))
    assert packs and not {str(p) for p in packs} & set(synced)
