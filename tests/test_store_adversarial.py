"""Adversarial tests of the result store: each test below failed on the code it was written
against and names the guarantee it breaks (see the comment "expected" in each). Small
shards (64 px chunks, 128 px shards) as in test_store_faults.py; a "kill" is emulated by an
exception raised in the writer at an exact point (the journal is flushed on every append,
so what is on disk equals what a kill at that point leaves)."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
from _store_cases import (  # the fixtures _small_shards, demo and scene among them
    OUTPUTS,
    _small_shards,
    demo,
    demo_model,
    reference_run,
    run_demo,
    same_table,
    scene,
    small_shards,
    write_scene,
)

from napari_xt.engine import Failed, Finished, Planned, run
from napari_xt.engine.store import layout
from napari_xt.io import list_results, read_detections, read_labels, read_probabilities


@pytest.fixture(scope="module")
def wide_scene(tmp_path_factory):
    """640 x 640: 4 crops, so shards are finished by several puts."""
    return write_scene(tmp_path_factory.mktemp("wide"), 6, 640, 640)


_run = run_demo
_reference = reference_run


@pytest.fixture(scope="module")
def reference(scene, demo, tmp_path_factory):
    return _reference(scene, demo, tmp_path_factory.mktemp("ref") / "ref.zarr")


@pytest.fixture(scope="module")
def reference_wide_nms(scene, demo, tmp_path_factory):
    """min_distance=24: 48 px border bands, so many detections are "border" peaks."""
    return _reference(scene, demo, tmp_path_factory.mktemp("ref24") / "ref.zarr",
                      min_distance=24)


_same_table = same_table


def _same_results(a, b):
    for x, y in zip(read_labels(a, "prediction").levels, read_labels(b, "prediction").levels):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(read_probabilities(a, "prediction").levels[0]),
                                  np.asarray(read_probabilities(b, "prediction").levels[0]))
    same_table(a, b)


# ------------------------------------------------------------------ array metadata
def test_a_missing_level0_array_metadata_is_not_a_verified_complete_store(scene, demo,
                                                                          reference,
                                                                          tmp_path):
    # DiskStore._replay verifies the shard files, then re-creates an array whose zarr.json
    # is missing with create_array(overwrite=True), which deletes the whole array folder
    # (zarr's delete_dir) - every verified shard - and then reports "complete (verified)".
    # Expected: the labels are those of the uninterrupted run (recomputed or kept).
    out = tmp_path / "o.zarr"
    shutil.copytree(reference, out)
    (out / "labels/prediction/0/zarr.json").unlink()
    events = _run(scene, demo, out)
    assert isinstance(events[-1], Finished)
    np.testing.assert_array_equal(np.asarray(read_labels(out, "prediction").levels[0]),
                                  np.asarray(read_labels(reference, "prediction").levels[0]))


# ------------------------------------------------------------------ detections (borders)
def _border_with_points(store):
    """(journal records, key of a border record whose blob holds points, shards committed
    before that border record)."""
    from napari_xt.engine.store.peaks import unpack
    from napari_xt.io.journal import Journal
    from napari_xt.io.packs import BlobRef, PackFiles

    records = Journal(store / ".napari-xt/journal").records()
    packs = PackFiles(store / ".napari-xt", "points")
    commits = 0
    try:
        for rec in records:
            if rec["t"] == "shard":
                commits += 1
            elif rec["t"] == "border":
                pts, _ = unpack(packs.read(BlobRef.from_list(rec["points"])))
                if len(pts):
                    return records, tuple(rec["k"]), commits
    finally:
        packs.close()
    raise AssertionError("the scene gives no border peaks: these tests need one")


@pytest.mark.slow
def test_a_kill_between_a_shard_commit_and_its_borders_loses_no_detections(
        scene, demo, reference_wide_nms, tmp_path, monkeypatch):
    # _commit_complete appends the shard's record, then computes the border peaks of its
    # neighbours (_try_border). A kill in between leaves the borders uncomputed, and
    # nothing ever computes them again: _try_border only runs when a shard is committed,
    # and _replay never looks for borders that are ready but missing. The rerun says
    # "complete" with those detections missing. Expected: the uninterrupted run's table.
    from napari_xt.engine.store import disk

    _, _, commits = _border_with_points(reference_wide_nms)
    original = disk.DiskStore._commit_complete
    count = [0]

    def commit(self, key):
        count[0] += 1
        if count[0] == commits:  # this commit makes a border with peaks ready: die there
            def die(k):
                raise OSError("killed")
            self._try_border = die
        original(self, key)

    monkeypatch.setattr(disk.DiskStore, "_commit_complete", commit)
    out = tmp_path / "o.zarr"
    assert isinstance(_run(scene, demo, out, min_distance=24)[-1], Failed)
    monkeypatch.setattr(disk.DiskStore, "_commit_complete", original)
    events = _run(scene, demo, out, min_distance=24)
    assert isinstance(events[-1], Finished) and events[-1].summary["complete"]
    _same_table(out, reference_wide_nms)


@pytest.mark.slow
def test_a_garbled_border_blob_is_recomputed_not_dropped(scene, demo, reference_wide_nms,
                                                         tmp_path):
    # _replay skips a border record whose blob does not verify (no notice) and never
    # recomputes it; when anything makes the table be written again (here: a damaged shard
    # elsewhere) the table silently lacks that border's detections.
    # Expected: the damaged border is recomputed from the committed shards' frames.
    from napari_xt.io.packs import BlobRef

    out = tmp_path / "o.zarr"
    shutil.copytree(reference_wide_nms, out)
    records, key, _ = _border_with_points(out)
    rec = next(r for r in records if r["t"] == "border" and tuple(r["k"]) == key)
    ref = BlobRef.from_list(rec["points"])
    pack = out / ".napari-xt/points-000000.bin"
    data = bytearray(pack.read_bytes())
    data[ref.offset + ref.nbytes // 2] ^= 0xFF
    pack.write_bytes(bytes(data))
    far = next(tuple(r["k"]) for r in records if r["t"] == "shard"
               and max(abs(r["k"][0] - key[0]), abs(r["k"][1] - key[1])) > 1)
    shard = out / "labels/prediction/0/c" / str(far[0]) / str(far[1])
    shard.write_bytes(shard.read_bytes()[:-5])  # forces the table to be written again
    events = _run(scene, demo, out, min_distance=24)
    assert isinstance(events[-1], Finished)
    _same_table(out, reference_wide_nms)


# ------------------------------------------------------------------ replacing a store
def test_overwrite_removes_the_replaced_runs_results(scene, demo, reference, tmp_path):
    # publish() merges provenance() into the root attributes, and provenance has its own
    # "created" key (a timestamp), so the list of what the run created is replaced by a
    # string: guard.created_entries then iterates its characters ("2", "0", "-", ...),
    # and labels/, probabilities/, tables/<name> of the replaced run are never removed.
    # Expected: after --overwrite with labels only, the old run's table is gone.
    out = tmp_path / "o.zarr"
    shutil.copytree(reference, out)
    assert isinstance(layout.root_attrs(out)["entries"], list)  # what runs created here
    events = _run(scene, demo, out, outputs=("labels",), overwrite=True)
    assert isinstance(events[-1], Finished)
    found = list_results(out)
    assert "prediction" not in found["tables"] and "prediction" not in found["probabilities"]


def test_overwrite_never_writes_over_a_users_result_of_the_new_name(scene, demo, reference,
                                                                     tmp_path):
    # guard.clear_store removes only what runs created, but DiskStore._fresh then creates
    # labels/<name>/0 with create_array(overwrite=True) whatever is there, and publish
    # rewrites labels/<name>: a label image the user added under that name is destroyed.
    # Expected: refused (StoreError), the user's label image intact.
    from napari_xt.engine.store import StoreError
    from napari_xt.io import write_labels

    out = tmp_path / "o.zarr"
    shutil.copytree(reference, out)
    mine = np.zeros((384, 448), np.uint8)
    mine[10:20, 10:20] = 7
    write_labels(out, "manual", mine)
    try:
        _run(scene, demo, out, name="manual", overwrite=True)
    except StoreError:
        pass
    np.testing.assert_array_equal(np.asarray(read_labels(out, "manual").levels[0]), mine)


def test_overwrite_with_another_image_is_refused_before_anything_is_deleted(scene, demo,
                                                                            tmp_path):
    # run() creates the store first (clear_store with overwrite: the old results are
    # deleted, the store's own embedding cache kept whatever it matches) and only then
    # opens the cache, which refuses (CacheMismatchError, CLI exit 2 "bad input"). The
    # user is left with neither the old results nor new ones.
    # Expected: the run succeeds (the store's private cache is replaced, as guard.py's
    # docstring says: "keeping a *matching* embedding cache"), or nothing was deleted.
    from napari_xt.engine.cache import CacheMismatchError

    img = np.load(scene)[:, :128, :128]
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, img)
    np.save(b, img[:, ::-1].copy())
    out = tmp_path / "o.zarr"
    assert isinstance(_run(a, demo, out)[-1], Finished)
    before = np.asarray(read_labels(out, "prediction").levels[0])
    try:
        events = _run(b, demo, out, overwrite=True)
    except CacheMismatchError:
        assert (out / "0").is_dir(), "the refused run deleted the old results"
        np.testing.assert_array_equal(np.asarray(read_labels(out, "prediction").levels[0]),
                                      before)
    else:
        assert isinstance(events[-1], Finished)


# ------------------------------------------------------------------ paths
def test_output_inside_the_input_through_a_symlink_and_dotdot_is_refused(scene, tmp_path,
                                                                         monkeypatch, capsys):
    # guard._resolved does os.path.abspath before resolve(): abspath folds "link/.."
    # lexically, while the OS follows the link first, so "link/../in.ome.zarr/r.zarr"
    # passes check_not_input and the store is written inside the input image.
    # Expected: exit 2, nothing written into the input.
    from napari_xt.cli import main
    from napari_xt.io import convert

    image = tmp_path / "elsewhere" / "in.ome.zarr"
    convert(np.load(scene)[:, :128, :128], image, axes="CYX", chunk=256, min_size=64)
    (tmp_path / "elsewhere" / "sub").mkdir()
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(tmp_path / "elsewhere" / "sub", work / "link")
    monkeypatch.chdir(work)
    before = sorted(p.name for p in image.iterdir())
    code = main(["predict", str(image), "--model", "demo", "--out",
                 "link/../in.ome.zarr/result.zarr", "--quiet"])
    capsys.readouterr()
    assert sorted(p.name for p in image.iterdir()) == before
    assert code == 2


# ------------------------------------------------------------------ resume
def test_resuming_with_another_strip_width_keeps_the_results_right(scene, demo, reference,
                                                                   tmp_path, monkeypatch):
    # strip_width is not in the run signature, but it chooses the shard size
    # (Tiling.for_grid(..., strip_px)): 192 px shards at strip_width=3, 128 px at the
    # default. A resume with the other value maps the journal's shard keys to the wrong
    # regions and unlinks the wrong shard files (DiskStore uses the new Tiling, not the
    # one recorded in the store's "tiling" attribute): zeros in the labels, duplicated
    # detections, in a store marked complete.
    # Expected: the same results as an uninterrupted run (or a refusal).
    from napari_xt.engine.store import StoreError, disk

    monkeypatch.setattr(layout, "SHARD", 192)
    original = disk.DiskStore._commit_complete
    count = [0]

    def commit(self, key):
        original(self, key)
        count[0] += 1
        if count[0] == 2:
            raise OSError("killed")

    monkeypatch.setattr(disk.DiskStore, "_commit_complete", commit)
    out = tmp_path / "o.zarr"
    assert isinstance(_run(scene, demo, out, strip_width=3)[-1], Failed)
    monkeypatch.setattr(disk.DiskStore, "_commit_complete", original)
    try:
        events = _run(scene, demo, out)  # the default strip_width
    except StoreError:
        return
    assert isinstance(events[-1], Finished)
    _same_results(out, reference)


def test_nonfinite_pixels_are_masked_when_features_come_from_the_cache(scene, demo, tmp_path):
    # The mask of NaN pixels is made only when pixels are read (FeatureSupply._encode);
    # a region whose features come from the embedding cache (_from_cache) gets no mask, so
    # its NaN pixels get the model's labels/probabilities/heat instead of 0. A rerun, or a
    # resume after a kill between encoding and finalising, then differs from the run
    # that encoded. Expected: the same labels (0 where the input is NaN).
    img = np.load(scene)
    img[:, 100:140, 150:220] = np.nan
    path = tmp_path / "nan.npy"
    np.save(path, img)
    out = tmp_path / "o.zarr"
    assert isinstance(_run(path, demo, out)[-1], Finished)
    first = np.asarray(read_labels(out, "prediction").levels[0])
    assert (first[100:140, 150:220] == 0).all()
    events = _run(path, demo, out, resume=False)  # the same run again, from the cache
    assert isinstance(events[-1], Finished) and events[-1].counts["from_cache"] > 0
    again = np.asarray(read_labels(out, "prediction").levels[0])
    np.testing.assert_array_equal(again, first)


# ------------------------------------------------------------------ on_error="continue"
def _unreadable(monkeypatch, box):
    source_cls = sys.modules[run.__module__].ImageSource
    original = source_cls.fill  # every region read of the engine goes through it

    def fill(self, b, out):
        if tuple(b[:2]) == box:
            raise OSError("simulated unreadable tile")
        return original(self, b, out)

    monkeypatch.setattr(source_cls, "fill", fill)
    return lambda: monkeypatch.setattr(source_cls, "fill", original)


@pytest.mark.slow
def test_one_unreadable_region_drops_only_its_own_detections(scene, demo, tmp_path,
                                                             monkeypatch):
    # With on_error="continue" the shard holding the failed region is never complete, so
    # only partial records exist for it: no interior peaks, and no border peaks of it or
    # of its 8 neighbours (they need its frames). The table loses the detections of whole
    # shards (2048 px a side by default) around one 64 px region. Expected: the table
    # of the same failing run kept in memory (store=None: NMS over the whole map), except
    # within 2 * min_distance of the failed region.
    md = 24
    bad = (2 * 64, 3 * 64)  # region (2, 3)
    restore = _unreadable(monkeypatch, bad)
    model, norm = demo
    mem = list(run(str(scene), model, None, normalize=norm, outputs=OUTPUTS,
                   on_error="continue", min_distance=md))[-1]
    out = tmp_path / "o.zarr"
    events = _run(scene, demo, out, on_error="continue", min_distance=md)
    restore()
    assert isinstance(mem, Finished) and isinstance(events[-1], Finished)
    want = mem.summary["arrays"]["detections"]
    y, x = want["y"], want["x"]
    far = ((y < bad[0] - 2 * md) | (y >= bad[0] + 64 + 2 * md)
           | (x < bad[1] - 2 * md) | (x >= bad[1] + 64 + 2 * md))
    table = read_detections(out, "prediction")
    have = set(zip(table["y"].tolist(), table["x"].tolist()))
    missing = [p for p in zip(y[far].tolist(), x[far].tolist()) if p not in have]
    assert not missing, f"{len(missing)} of {int(far.sum())} detections lost: {missing}"


def test_a_repaired_store_equals_an_uninterrupted_run(scene, demo, reference, tmp_path,
                                                      monkeypatch):
    # The failed region's crops ran without it, so its neighbours were decoded with other
    # context; the repair rerun recomputes only the failed region and marks the store
    # complete, with ~45% of the probabilities unlike an uninterrupted run's.
    # Expected: a store marked complete holds the uninterrupted run's results (recompute
    # the regions decoded beside a failed one, or keep the store incomplete).
    restore = _unreadable(monkeypatch, (2 * 64, 3 * 64))
    out = tmp_path / "o.zarr"
    events = _run(scene, demo, out, on_error="continue")
    restore()
    assert isinstance(events[-1], Finished) and not events[-1].summary["complete"]
    events = _run(scene, demo, out)
    assert isinstance(events[-1], Finished)
    if events[-1].summary["complete"]:
        _same_results(out, reference)


# ------------------------------------------------------------------ reading while writing
def test_a_done_region_never_reads_as_zeros_while_its_shard_is_rewritten(wide_scene, demo,
                                                                         tmp_path,
                                                                         monkeypatch):
    # DiskStore._write unlinks a shard file before writing it again (a partial shard that
    # gets more regions). Regions committed earlier stay "done" meanwhile and
    # read_region (DiskStore and open_result) reads them from disk: all zeros.
    # Expected: a done region reads back its committed values at every moment.
    from napari_xt.engine.store import disk, open_result

    monkeypatch.setattr(layout, "SHARD", 192)
    monkeypatch.setattr(disk, "BUDGET", 1)  # incomplete shards flushed, then rewritten
    original = disk.DiskStore._write
    seen = []

    def write(self, buf, names):
        old = [i for i in sorted(buf.regions) if self.done[i]]
        if old and not seen:
            idx = max(old, key=lambda i: int(np.count_nonzero(self.read_region("labels", i))))
            want = self.read_region("labels", idx)
            arrays = self._zarray

            class Probe:  # runs when the old file is gone and the new one not yet written
                def __init__(self, arr):
                    self.arr = arr

                def __setitem__(probe, key, value):
                    seen.append((want, self.read_region("labels", idx),
                                 open_result(self.path).read_region("labels", idx)))
                    probe.arr[key] = value

            self._zarray = lambda n: Probe(arrays(n)) if n == "labels" else arrays(n)
            try:
                return original(self, buf, names)
            finally:
                del self._zarray
        return original(self, buf, names)

    monkeypatch.setattr(disk.DiskStore, "_write", write)
    assert isinstance(_run(wide_scene, demo, tmp_path / "o.zarr", strip_width=3)[-1],
                      Finished)
    assert seen, "no shard was rewritten"
    want, engine, reader = seen[0]
    assert np.count_nonzero(want) > 0
    np.testing.assert_array_equal(engine, want)
    np.testing.assert_array_equal(reader, want)


# ------------------------------------------------------------------ holds (passes)
def test_a_garbled_journal_line_means_recompute_from_there(scene, demo, reference, tmp_path):
    out = tmp_path / "o.zarr"
    shutil.copytree(reference, out)
    journal = out / ".napari-xt/journal"
    data = bytearray(journal.read_bytes())
    data[len(data) // 2] ^= 0x20
    journal.write_bytes(bytes(data))
    events = _run(scene, demo, out)
    planned = next(e for e in events if isinstance(e, Planned))
    assert isinstance(events[-1], Finished) and planned.todo_regions > 0
    _same_results(out, reference)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9])
def test_regions_whose_centre_map_stays_below_the_threshold_lose_no_detection(
        scene, demo, tmp_path, monkeypatch, threshold):
    # The store skips copying the centre/size maps of regions with no value >= the
    # threshold (zeros stand in for them). Expected: the same table, bit for bit, as a run
    # that copies every region, at every threshold (0.0: no region may be skipped, its
    # zeros would be peaks), and the skip taken for most regions at 0.9.
    from napari_xt.engine.store import disk

    cold = []
    original = disk.DiskStore._cold
    monkeypatch.setattr(disk.DiskStore, "_cold", lambda self, buf, heat, regions: cold.append(
        r := original(self, buf, heat, regions)) or r)
    fin = _run(scene, demo, tmp_path / "skip.zarr", threshold=threshold, min_distance=3)[-1]
    assert isinstance(fin, Finished) and fin.summary["complete"]
    if threshold == 0.0:
        assert cold and not any(cold)
    if threshold == 0.9:
        assert sum(cold) > len(cold) / 2

    def copy_all(self, buf, heat, regions):
        buf.heat_kept.update(regions)
        return False

    monkeypatch.setattr(disk.DiskStore, "_cold", copy_all)
    _run(scene, demo, tmp_path / "all.zarr", threshold=threshold, min_distance=3)
    _same_table(tmp_path / "skip.zarr", tmp_path / "all.zarr")
    assert len(read_detections(tmp_path / "skip.zarr", "prediction")["y"]) > 0


def test_the_preview_takes_only_its_own_digests(scene, demo, tmp_path, monkeypatch):
    # a digest of another array, recorded but not yet journaled when the preview is written,
    # must stay recorded (taking it would leave that file unverifiable)
    from napari_xt.engine.store import preview, publish

    seen = {}
    real = preview.write_preview

    def spy(store, source, sums=None):
        store.zstore._digests["labels/other/c/0/0"] = (123, 4)
        real(store, source, sums)
        seen["kept"] = store.zstore.take("labels/other/")
        seen["preview"] = list(store.published["preview"]["files"])

    monkeypatch.setattr(publish, "write_preview", spy)
    out = tmp_path / "o.zarr"
    assert isinstance(_run(scene, demo, out)[-1], Finished)
    assert seen["kept"] == {"labels/other/c/0/0": (123, 4)}
    assert seen["preview"] and all(k.split("/", 1)[0].isdigit() for k in seen["preview"])
