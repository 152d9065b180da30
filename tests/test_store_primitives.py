"""The result store's building blocks: checksummed journal and pack files, the folder lock,
zarr digests, shard tiling, streaming detection peaks (= whole-image NMS) and the preview."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from napari_xt.engine.store.layout import Tiling
from napari_xt.engine.store.peaks import ShardPeaks, pack, sort_points, sparse_points, unpack
from napari_xt.io.journal import Journal
from napari_xt.io.lock import FolderLock, LockedError
from napari_xt.io.packs import CorruptBlob, PackFiles
from napari_xt.model.heads import points_from_heatmap


# ---------------------------------------------------------------------------- journal
def test_journal_keeps_intact_records_and_cuts_a_torn_tail(tmp_path):
    j = Journal(tmp_path / "journal")
    j.append([{"t": "a", "n": 1}, {"t": "b", "n": 2}])
    j.close()
    path = tmp_path / "journal"
    whole = path.read_bytes()
    path.write_bytes(whole + b"0000abcd {\"t\": \"torn")  # a kill in the middle of a write
    j = Journal(path)
    assert [r["n"] for r in j.records()] == [1, 2]
    j.append([{"t": "c", "n": 3}])  # the torn tail is cut before appending
    j.close()
    assert [r["n"] for r in Journal(path).records()] == [1, 2, 3]
    assert path.read_bytes().startswith(whole)


def test_journal_appended_closed_and_appended_again_keeps_every_record(tmp_path):
    j = Journal(tmp_path / "journal")
    j.append([{"n": 1}])
    j.close()  # (a store or cache closes its journal between phases)
    j.append([{"n": 2}])
    j.close()
    j.append([{"n": 3}])
    j.close()
    assert [r["n"] for r in Journal(tmp_path / "journal").records()] == [1, 2, 3]


def test_journal_stops_at_a_changed_record(tmp_path):
    j = Journal(tmp_path / "journal")
    j.append([{"n": i} for i in range(5)])
    j.close()
    lines = (tmp_path / "journal").read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"n":2', b'"n":7')  # same length, wrong checksum
    (tmp_path / "journal").write_bytes(b"".join(lines))
    assert [r["n"] for r in Journal(tmp_path / "journal").records()] == [0, 1]


# ---------------------------------------------------------------------------- packs
def test_pack_blobs_read_back_or_fail_loudly(tmp_path):
    packs = PackFiles(tmp_path, "p", roll_bytes=64)
    refs = packs.append_many([b"a" * 40]) + packs.append_many([b"b" * 40, b"c" * 10])
    assert [r.file for r in refs] == [0, 1, 1]  # a new file once 64 bytes would be passed
    assert [packs.read(r) for r in refs] == [b"a" * 40, b"b" * 40, b"c" * 10]
    packs.close()
    first = tmp_path / "p-000000.bin"
    data = bytearray(first.read_bytes())
    data[5] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(CorruptBlob, match="checksum"):
        PackFiles(tmp_path, "p").read(refs[0])
    (tmp_path / "p-000001.bin").write_bytes(b"b" * 20)
    with pytest.raises(CorruptBlob, match="truncated"):
        PackFiles(tmp_path, "p").read(refs[1])
    (tmp_path / "p-000001.bin").unlink()
    with pytest.raises(CorruptBlob, match="missing"):
        PackFiles(tmp_path, "p").read(refs[2])


# ---------------------------------------------------------------------------- lock
def test_folder_lock_is_exclusive_and_names_the_holder(tmp_path):
    a = FolderLock(tmp_path, "store X")
    assert a.acquire() is None
    b = FolderLock(tmp_path, "store X")
    with pytest.raises(LockedError, match=f"store X is in use by another run \\(pid {os.getpid()}"):
        b.acquire()
    a.release()
    assert b.acquire() is None  # released cleanly: nothing stale to report
    b.release()


def test_lock_of_a_killed_process_is_taken_over_with_a_notice(tmp_path):
    code = ("import os, sys; from napari_xt.io.lock import FolderLock; "
            f"lock = FolderLock({str(tmp_path)!r}, 'x'); lock.acquire(); os._exit(9)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    holder = json.loads((tmp_path / "lock").read_text())
    assert holder["pid"] != os.getpid()
    lock = FolderLock(tmp_path, "store X")
    notice = lock.acquire()
    assert notice and "ended without releasing it" in notice and str(holder["pid"]) in notice
    lock.release()


# ---------------------------------------------------------------------------- tiling
def test_tiling_aligns_shards_with_strips_and_covers_every_region():
    t = Tiling.for_grid(29440, 24320, 256, strip_px=16 * 256)
    assert t.chunk == (512, 512) and t.shard == (2048, 2048)
    assert (16 * 256) % t.shard[1] == 0  # a shard never waits for the next strip
    small = Tiling.for_grid(250, 320, 64, strip_px=1024)
    assert small.shard_grid == (1, 1) and len(small.regions_of(0, 0)) == 4 * 5
    t = Tiling(300, 300, 64, (64, 64), (128, 128))
    covered = sorted(i for a in range(t.shard_grid[0]) for b in range(t.shard_grid[1])
                     for i in t.regions_of(a, b))
    assert covered == [(r, c) for r in range(5) for c in range(5)]


# ---------------------------------------------------------------------------- peaks
def _reference(heat, md, thr=0.5):
    t = torch.from_numpy(heat)
    return sort_points(points_from_heatmap(t[:1], t[1:], threshold=thr, min_distance=md))


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(a[n], b[n]) for n in
                                    ("y", "x", "class", "score", "size"))


def test_shard_peaks_equal_whole_image_nms_with_plateaus():
    rng = np.random.default_rng(0)
    for _ in range(25):
        h, w = (int(v) for v in rng.integers(20, 140, 2))
        md = int(rng.integers(1, 4))
        zy, zx = (int(v) for v in rng.integers(8, 50, 2))
        tiling = Tiling(h, w, 1, (zy, zx), (zy, zx))
        heat = (rng.integers(0, 6, (2, h, w)) / 5.0).astype(np.float32)  # many ties
        peaks = ShardPeaks(tiling, 1, True, 0.5, md)
        frames, parts = {}, []
        rows, cols = tiling.shard_grid
        for i in range(rows):
            for j in range(cols):
                y0, x0, y1, x1 = tiling.shard_box(i, j)
                pts, fr = peaks.interior((i, j), heat[:, y0:y1, x0:x1])
                pts, frames[(i, j)] = unpack(pack(pts, fr))  # as stored and read back
                parts.append(pts)
        parts += [peaks.border((i, j), frames) for i in range(rows) for j in range(cols)]
        assert _same(sort_points(np.concatenate(parts)), _reference(heat, md))


def test_sparse_search_finds_the_same_peaks():
    rng = np.random.default_rng(1)
    for tile in (3, 17, 64):
        heat = (rng.integers(0, 6, (2, 90, 77)) / 5.0).astype(np.float32)
        heat[0, :40] = 0.0  # a cold part the search skips
        got = sort_points(sparse_points(heat, 1, True, 0.5, 2, tile=tile))
        assert _same(got, _reference(heat, 2))
    assert len(sparse_points(np.zeros((2, 50, 50), np.float32), 1, True, 0.5, 2)) == 0


# ---------------------------------------------------------------------------- preview
@pytest.mark.parametrize("shape", [(2500, 1300), (2501, 1299), (300, 4100)])
def test_preview_from_the_reads_equals_block_means_of_the_input(shape):
    from napari_xt.engine.store.preview import PreviewSums, block_mean, preview_factor

    img = np.random.default_rng(2).integers(0, 255, (3, *shape)).astype(np.uint8)
    f = preview_factor(*shape)
    sums = PreviewSums(*shape, 3, f)
    for y in range(0, shape[0], 64):  # region by region, as a run reads them
        for x in range(0, shape[1], 64):
            sums.add(y, x, img[:, y:y + 64, x:x + 64])
            sums.add(y, x, img[:, y:y + 64, x:x + 64])  # read twice: counted once
    assert sums.complete()
    assert np.abs(sums.mean(np.uint8).astype(int) - block_mean(img, f).astype(int)).max() <= 1


def test_digest_store_records_what_zarr_writes(tmp_path):
    import zarr

    from napari_xt.engine.store.digests import DigestStore, file_digest, verify

    store = DigestStore(str(tmp_path))
    arr = zarr.create_array(store=store, name="a", shape=(64, 64), chunks=(32, 32),
                            shards=(64, 64), dtype="uint8")
    store.take()
    arr[...] = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)
    files = store.take()
    assert list(files) == ["a/c/0/0"]  # one shard file for the whole array
    data = (tmp_path / "a/c/0/0").read_bytes()
    assert files["a/c/0/0"] == (zlib.crc32(data), len(data)) == file_digest(tmp_path / "a/c/0/0")
    assert verify(tmp_path, {k: list(v) for k, v in files.items()})
    (tmp_path / "a/c/0/0").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert not verify(tmp_path, {k: list(v) for k, v in files.items()})


def test_sync_leaves_refused_fsyncs_to_the_system_but_reports_io_errors(tmp_path, monkeypatch):
    # Windows refuses fsync on read-only handles and some file systems refuse it outright:
    # the data is then left to the system (the run goes on); a real I/O error is raised.
    import errno as errno_mod

    from napari_xt.engine.store import digests

    (tmp_path / "d").mkdir()
    f = tmp_path / "d" / "f.bin"
    f.write_bytes(b"x")
    seen = []

    def refuse(code):
        def fsync(fd):
            seen.append(fd)
            raise OSError(code, os.strerror(code))
        return fsync

    for code in (errno_mod.EBADF, errno_mod.EINVAL, errno_mod.ENOTSUP):
        monkeypatch.setattr(os, "fsync", refuse(code))
        assert digests.sync_tree(tmp_path) == 1
    monkeypatch.setattr(os, "fsync", refuse(errno_mod.EIO))
    with pytest.raises(OSError):
        digests.sync_file(f)
    assert len(seen) >= 4


def test_preview_sums_do_not_depend_on_the_memory_layout_of_a_block():
    # Channel-last reads arrive as strided views; their sums equal a contiguous block's
    # bit for bit (the preview of a rerun must equal the first run's).
    from napari_xt.engine.store.preview import PreviewSums

    rng = np.random.default_rng(0)
    yxc = rng.random((64, 64, 3)).astype(np.float32) * 1000
    a, b = PreviewSums(64, 64, 3, 16), PreviewSums(64, 64, 3, 16)
    a.add(0, 0, np.moveaxis(yxc, -1, 0))  # a view, channel stride 4 bytes
    b.add(0, 0, np.ascontiguousarray(np.moveaxis(yxc, -1, 0)))
    np.testing.assert_array_equal(a.sums, b.sums)
