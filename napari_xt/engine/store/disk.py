"""`DiskStore`: a run's results on disk, with a commit protocol that loses nothing and never
trusts what it cannot verify.

Final region tiles are collected in memory per shard (`ShardBuffer`). A shard whose regions
are all final is written once, in whole (zarr, sharded), and committed: one journal record
names the files written with the CRC-32 of their bytes, and for detections the shard's
interior peaks and halo frames (in a pack file, also checksummed). A region is done only
when such a record covers it. When buffers pass the memory budget, or the run stops, the
least recently touched incomplete shards are flushed as they are (their centre maps too,
privately), committed as partial, and reloaded from disk when more of their regions arrive.

On resume the journal is replayed and every committed file is verified against its CRC-32:
a shard whose files are missing, truncated or changed is not done (its regions are
recomputed, with a notice), never published as zeros. One writer thread does all of this;
its first error is re-raised in the engine's thread by `drain`, `put` or `close`.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_xt.io.journal import Journal
from napari_xt.io.lock import FolderLock, LockedError
from napari_xt.io.packs import BlobRef, CorruptBlob, PackFiles

from ..spelling import Spelling, hint
from . import guard
from .arrays import array_defs, create_array
from .digests import DigestStore, verify
from .layout import (
    FORMAT,
    HEAT_PATH,
    KIND,
    PRIVATE,
    Index,
    Tiling,
    classification_path,
    labels_path,
    level_shapes,
    probabilities_path,
    root_attrs,
    table_path,
)
from .peaks import ShardPeaks, pack, unpack
from .spec import DONE, FAILED, PENDING, RegionTiles, StoreError, StoreSpec

BUDGET = 512 * 2**20  # bytes of shard buffers kept in memory before partial flushes


def lazy_zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Zeros in anonymous memory that the system maps only where it is written: a buffer
    left mostly untouched costs neither the zeroing nor the pages (np.zeros may have to
    clear reused memory)."""
    import mmap

    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer(mmap.mmap(-1, max(n, 1)), dtype, count=n // dtype.itemsize).reshape(shape)


@dataclass
class ShardBuffer:
    """The tiles of one shard gathered in memory until the shard is written: `key` the shard's
    (row, col) in the shard grid, `box` its (y0, x0, y1, x1) level pixels, `arrays` one per store
    array cropped to the box, `regions` every region of the shard, `final` those placed here or
    committed earlier."""

    key: Index
    box: tuple[int, int, int, int]
    arrays: dict[str, np.ndarray]
    regions: frozenset[Index]
    final: set[Index] = field(default_factory=set)
    tainted: set[Index] = field(default_factory=set)  # decoded beside a failed region
    zeroed: bool = False  # began as zeros (nothing read back from disk)
    heat_kept: set[Index] = field(default_factory=set)  # regions whose heat was copied in

    @property
    def complete(self) -> bool:
        """Whether every region of the shard is final (the shard can be written and committed
        whole)."""
        return len(self.final) == len(self.regions)

    @property
    def nbytes(self) -> int:
        """Bytes of the buffer's arrays (counted against the store's memory budget)."""
        return sum(a.nbytes for a in self.arrays.values())


class DiskStore:
    """Results of one run in the OME-Zarr store at `path` (see `layout.py`)."""

    def __init__(self, path: str | Any, spec: StoreSpec, *, overwrite: bool = False,
                 restart: bool = False, inputs: tuple[str, ...] = (),
                 spelling: Spelling | None = None, budget: int | None = None,
                 threaded: bool = True, cache_signature: dict[str, Any] | None = None
                 ) -> None:
        """`threaded`: write in a thread of its own (overlapping a GPU's work); on the CPU
        the engine writes in its own thread, since a writer thread would only take cores
        from torch's threads."""
        self.path = Path(path)
        self.threaded = bool(threaded)
        self.spec = spec
        self.spelling = spelling or Spelling()
        self.budget = int(BUDGET if budget is None else budget)
        self.cache_signature = cache_signature
        self.notices: list[str] = []
        self.resumed = False
        self.complete = False
        self.grid = spec.grid
        self.tiling = Tiling.for_grid(spec.height, spec.width, spec.region_size, spec.strip_px)
        self.defs = array_defs(spec, self.tiling)
        guard.check_not_input(self.path, inputs, self.spelling)
        guard.check_writable_kind(self.path, self.spelling)  # before anything is created
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock = FolderLock(self.path / PRIVATE, f"result store {self.path}")
        try:
            notice = self.lock.acquire()
        except LockedError as err:
            raise StoreError(str(err)) from None
        if notice:
            self.notices.append(notice)
        from napari_xt.io.result_store import hold

        hold(self.path, True)
        try:
            # again, under the lock: another run may have made or finished the store meanwhile
            kind = guard.check_writable_kind(self.path, self.spelling)
            self._open(kind, overwrite, restart)
        except BaseException:
            hold(self.path, False)
            self.lock.release()
            raise

    # ------------------------------------------------------------------ opening
    def _open(self, kind: str, overwrite: bool, restart: bool) -> None:
        attrs = root_attrs(self.path) or {}
        same = kind == "store" and attrs.get("run_signature") == self.spec.signature
        if kind == "legacy" and not overwrite:
            raise StoreError(f"{self.path} holds results of an older napari-xt version, which "
                             f"cannot be resumed; {hint(self.spelling, 'overwrite')}")
        if kind == "store" and not same and not overwrite:
            old = attrs.get("run_signature") or {}
            from ..cache import signature_diff

            diff = signature_diff(old, self.spec.signature)
            raise StoreError(f"{self.path} holds results of a different run (differs in: "
                             f"{', '.join(diff)}); {hint(self.spelling, 'overwrite')}")
        from zarr.storage import LocalStore

        self.zstore = DigestStore(LocalStore(str(self.path)))
        self.journal = Journal(self.path / PRIVATE / "journal")
        self.packs = PackFiles(self.path / PRIVATE, "points")
        if same and not restart:
            recorded = attrs.get("tiling") or {}
            if recorded:  # the store's own shards, whatever this run would choose
                self.tiling = Tiling(self.spec.height, self.spec.width, self.spec.region_size,
                                     tuple(recorded["chunk"]), tuple(recorded["shard"]))
                self.defs = array_defs(self.spec, self.tiling)
            self.resumed = True
            self._replay(attrs)
            return
        if kind in ("store", "legacy"):
            guard.refuse_to_drop_corrections(self.path, self.spelling)
            guard.clear_store(self.path, kind, cache_signature=self.cache_signature)
        guard.refuse_foreign_results(self.path, self._created()[:4], self.spelling)
        self._fresh()

    def _created(self) -> list[str]:
        s = self.spec
        out = [labels_path(s.name), probabilities_path(s.name), table_path(s.name),
               classification_path(s.name)]
        n = len(level_shapes(s.height, s.width))
        return out + [str(i) for i in range(n)]

    def _fresh(self) -> None:
        from napari_xt.io.result_store import write_group

        write_group(self.path, 3, {"napari-xt": {
            "format": FORMAT, "kind": KIND, "run_signature": self.spec.signature,
            "complete": False, "entries": self._created(),
            "tiling": {"height": self.spec.height, "width": self.spec.width,
                       "region_size": self.spec.region_size,
                       "chunk": list(self.tiling.chunk), "shard": list(self.tiling.shard)},
            "outputs": {k: d.path for k, d in self.defs.items() if not d.private}}})
        write_group(self.path / PRIVATE, 3, {"napari-xt-private": {
            "note": "private state of napari-xt runs (journal, detections, caches)"}})
        self._init_state()
        self._new_arrays([])

    def _init_state(self) -> None:
        self.done = np.zeros(self.grid, bool)  # committed regions (verified)
        self.failed = np.zeros(self.grid, bool)
        self.records: dict[Index, dict[str, Any]] = {}  # latest valid shard record
        self.frames: dict[Index, dict[str, np.ndarray]] = {}  # loaded halo frames
        self.border_done: set[Index] = set()
        self.interior: dict[Index, np.ndarray] = {}  # detections per committed shard
        self.borders: dict[Index, np.ndarray] = {}
        self.point_parts: list[np.ndarray] = []  # append-only, for live previews
        self.crop_logits: dict[int, list[float]] = {}
        self.published: dict[str, dict[str, Any]] = {}
        self.buffers: OrderedDict[Index, ShardBuffer] = OrderedDict()
        self._pool: dict[tuple, list[np.ndarray]] = {}  # arrays of written shards, reused
        self.readable_mem: set[Index] = set()
        self.peaks = (ShardPeaks(self.tiling, self.spec.heat_channels, self.spec.has_size,
                                 self.spec.threshold, self.spec.min_distance)
                      if self.spec.writes_detections else None)
        self._lock = threading.Lock()
        self._zarrays: dict[str, Any] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._written: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.changed = False  # this run committed something: published results are stale

    def _replay(self, attrs: dict[str, Any]) -> None:
        self._init_state()
        shards: dict[Index, dict[str, Any]] = {}
        borders: dict[Index, dict[str, Any]] = {}
        failed: dict[Index, bool] = {}
        arrays: dict[str, Any] = {}
        for rec in self.journal.records():
            t = rec.get("t")
            if t == "arrays":
                arrays = rec
            elif t == "shard":
                key = (int(rec["k"][0]), int(rec["k"][1]))
                shards[key] = rec
                for n in [key, *self.tiling.neighbours(*key)]:  # their borders read its frames
                    borders.pop(n, None)
                for r, c in self._record_regions(rec):
                    failed.pop((r, c), None)
            elif t == "border":
                borders[(int(rec["k"][0]), int(rec["k"][1]))] = rec
            elif t == "failed":
                for r, c in rec.get("regions", []):
                    failed[(int(r), int(c))] = True
            elif t == "crop":
                self.crop_logits[int(rec["i"])] = [float(v) for v in rec["logits"]]
            elif t == "published":
                self.published[str(rec["what"])] = rec
        if not arrays or not verify(self.path, arrays.get("files", {})):
            # the arrays' own metadata is gone or changed: none of their shards can be trusted
            if shards or arrays:
                self.notices.append(f"the arrays of {self.path} lost their metadata; every "
                                    "region is computed again")
            self._restart_arrays()
            shards, borders = {}, {}
        bad: list[Index] = []
        for key, rec in shards.items():
            if not verify(self.path, rec.get("files", {})):
                bad.append(key)
                continue
            if rec.get("complete") and self.peaks is not None:
                try:
                    pts, frames = unpack(self.packs.read(BlobRef.from_list(rec["points"])))
                except (CorruptBlob, KeyError, TypeError, ValueError):
                    bad.append(key)
                    continue
                self.interior[key] = pts
                self.point_parts.append(pts)
                self.frames[key] = frames
            self.records[key] = rec
            for idx in self._record_regions(rec):
                self.done[idx] = True
        for key, rec in borders.items():
            if self.peaks is None or not all(self._complete(n) for n in self.peaks.needs(key)):
                continue  # a shard it depends on is recomputed: so is its border
            try:
                pts, _ = unpack(self.packs.read(BlobRef.from_list(rec["points"])))
            except (CorruptBlob, KeyError, TypeError, ValueError):
                continue  # found again below
            self.borders[key] = pts
            self.point_parts.append(pts)
            self.border_done.add(key)
        for idx in failed:
            if not self.done[idx]:
                self.failed[idx] = True
        if self.peaks is not None:  # borders a kill or damage left undone, now decidable
            for key in list(self.frames):
                self._try_border(key)
        self._drop_unneeded_frames()
        if bad:
            n = sum(len(self._record_regions(shards[k])) for k in bad)
            self.notices.append(
                f"{len(bad)} committed shard(s) of {self.path} did not verify (missing, "
                f"truncated or changed files); their {n} regions are computed again")
        published_ok = all(verify(self.path, rec.get("files", {}))
                           for rec in self.published.values())
        if not published_ok:
            self.notices.append(f"published results in {self.path} did not verify; they "
                                "are written again")
        self.published = {k: v for k, v in self.published.items()
                          if verify(self.path, v.get("files", {}))}
        if "metadata" in self.published and "labels" in self.defs and not self._listed():
            del self.published["metadata"]  # the labels group no longer lists this result
            published_ok = False
        self.complete = bool(attrs.get("complete")) and not bad and published_ok and (
            self._all_done())
        if attrs.get("complete") and not self.complete:
            self.set_attrs({"complete": False})  # never a "complete" store with wrong data
        for d in self.defs.values():
            for partial in (self.path / d.path).rglob("*.partial"):  # writes a kill cut off
                partial.unlink(missing_ok=True)
        self.zstore.take()

    def _restart_arrays(self) -> None:
        """Make every array of the run afresh (all their data is void) and start a new
        journal (crop records of a classifier are kept: they need no array)."""
        self._new_arrays([{"t": "crop", "i": i, "logits": v}
                          for i, v in self.crop_logits.items()])
        self.published = {}

    def _new_arrays(self, keep: list[dict[str, Any]]) -> None:
        """Create every array empty and start the journal with their metadata's digests
        (verified on replay) followed by the records `keep`."""
        self.journal.reset()
        self.packs.remove_all()
        for d in self.defs.values():
            create_array(self.zstore, d)
        files = {k: (list(v) if v else None) for k, v in self.zstore.take().items()
                 if k.endswith("zarr.json")}
        self.journal.append([{"t": "arrays", "files": files}] + keep)
        self.changed = True

    def _listed(self) -> bool:
        """The labels group lists this run's label image (others may add their own)."""
        from napari_xt.io.ngff import ome_attrs
        from napari_xt.io.result_store import group_attrs

        try:
            block, _ = ome_attrs(group_attrs(self.path / "labels", 3))
        except (OSError, ValueError):
            return False
        return self.spec.name in (block.get("labels") or [])

    def _all_done(self) -> bool:
        if self.spec.dense:
            return bool(self.done.all())
        return len(self.crop_logits) == self.spec.crops

    def _record_regions(self, rec: dict[str, Any]) -> list[Index]:
        """The regions a shard record makes done: all of a complete shard or those listed,
        less those decoded beside a region that failed (`tainted`: their context lacked it,
        so a rerun computes them again)."""
        if rec.get("complete"):
            regions = self.tiling.regions_of(int(rec["k"][0]), int(rec["k"][1]))
        else:
            regions = [(int(r), int(c)) for r, c in rec.get("regions", [])]
        tainted = {(int(r), int(c)) for r, c in rec.get("tainted", [])}
        return [i for i in regions if i not in tainted]

    # ------------------------------------------------------------------ attributes
    def attrs(self) -> dict[str, Any]:
        """A copy of the "napari-xt" attributes of the store's root zarr.json as they are on disk
        now ({} when unreadable)."""
        return dict(root_attrs(self.path) or {})

    def set_attrs(self, values: dict[str, Any]) -> None:
        """Merges `values` (converted to JSON) into the "napari-xt" attributes of the root
        zarr.json, rewriting it."""
        from napari_xt.io.result_store import group_attrs, json_default, write_group

        attrs = group_attrs(self.path, 3)
        cur = dict(attrs.get("napari-xt", {}))
        cur.update(json.loads(json.dumps(values, default=json_default)))
        attrs["napari-xt"] = cur
        write_group(self.path, 3, attrs)

    # ------------------------------------------------------------------ status
    def region_status(self) -> np.ndarray:
        """(rows, cols) uint8 status of every region: DONE when committed (verified) or already
        readable from memory, FAILED, else PENDING. Safe to call from any thread."""
        with self._lock:
            out = np.full(self.grid, PENDING, np.uint8)
            out[self.failed] = FAILED
            out[self.done] = DONE
            for idx in self.readable_mem:
                out[idx] = DONE
        return out

    # ------------------------------------------------------------------ writer thread
    def start(self) -> None:
        """Starts the writer thread (threaded stores only; nothing when it is running already)."""
        if self._thread is None and self.threaded:
            self._thread = threading.Thread(target=self._loop, name="napari-xt-writer",
                                            daemon=True)
            self._thread.start()

    def _send(self, item: Any) -> None:
        if not self.threaded:  # in the caller's thread (on the CPU: no core contention)
            self.check()
            try:
                self._handle(item)
            except BaseException as err:
                self.error = err
                raise
            return
        self.start()
        while True:
            self.check()
            if not self._thread.is_alive():
                raise StoreError(f"the writer of {self.path} stopped")
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def put(self, tiles: RegionTiles) -> None:
        """Hands the final tiles of a batch of regions to the writer (its thread, or at once in
        the caller's thread when not threaded): they are readable at once, and committed when
        their shard is complete, or as partial when buffers pass the memory budget and at
        `flush`. Re-raises the writer's first error; raises StoreError when the writer thread
        stopped."""
        self._send(("tiles", tiles))

    def put_failed(self, indices: list[Index], reason: str) -> None:
        """Records regions `indices` as failed in the journal (`reason`: what went wrong); a
        later run computes them again."""
        self._send(("failed", list(indices), reason))

    def put_crop(self, index: int, logits: np.ndarray) -> None:
        """Records the logits (K,) of a classifier's crop `index` in the journal: the crop is
        done."""
        self._send(("crop", int(index), [float(v) for v in np.asarray(logits).ravel()]))

    def check(self) -> None:
        """Re-raises the first error of the writer, if any."""
        if self.error is not None:
            raise self.error

    def drain(self) -> list[tuple[tuple[Index, ...], float]]:
        """(indices, seconds) of the batches made readable since the last call."""
        self.check()
        out = []
        while True:
            try:
                out.append(self._written.get_nowait())
            except queue.Empty:
                return out

    def flush(self) -> None:
        """Commit everything handed over so far (incomplete shards as partial) and wait."""
        if not self.threaded:
            if self.error is None:
                self._send(("flush", None))
            return
        if self._thread is None:
            return
        done = threading.Event()
        self._send(("flush", done))
        while not done.wait(0.1):
            self.check()
            if not self._thread.is_alive():
                break
        self.check()

    def stop_writer(self) -> None:
        """Flushes and ends the writer thread (nothing without one), then re-raises its first
        error, if any."""
        if self._thread is None:
            return
        try:
            self.flush()
        finally:
            try:
                self._queue.put(None, timeout=5)
            except queue.Full:
                pass
            self._thread.join(timeout=30)
            self._thread = None
        self.check()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self.error is not None:
                if item[0] == "flush":
                    item[1].set()
                continue  # after a failure: drain, nothing more is written
            try:
                self._handle(item)
            except BaseException as err:  # reported by check() in the engine's thread
                self.error = err
                if item[0] == "flush":
                    item[1].set()

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "tiles":
            self._place(item[1])
        elif kind == "failed":
            self.journal.append([{"t": "failed", "regions": [list(i) for i in item[1]],
                                  "reason": item[2][:500]}])
            with self._lock:
                for idx in item[1]:
                    self.failed[idx] = True
        elif kind == "crop":
            self.journal.append([{"t": "crop", "i": item[1], "logits": item[2]}])
            self.crop_logits[item[1]] = item[2]
            self.changed = True
        elif kind == "flush":
            try:
                for key in list(self.buffers):
                    self._flush_partial(key)
                self.journal.sync()
            finally:
                if item[1] is not None:
                    item[1].set()

    # ------------------------------------------------------------------ placing tiles
    def _zarray(self, name: str):
        arr = self._zarrays.get(name)
        if arr is None:
            import zarr

            arr = zarr.open_array(store=self.zstore, path=self.defs[name].path, mode="r+")
            self._zarrays[name] = arr
        return arr

    def _buffer(self, key: Index) -> ShardBuffer:
        buf = self.buffers.get(key)
        if buf is not None:
            self.buffers.move_to_end(key)
            return buf
        y0, x0, y1, x1 = self.tiling.shard_box(*key)
        arrays = {}
        rec = self.records.get(key)
        for name, d in self.defs.items():
            shape = (*d.shape[:-2], y1 - y0, x1 - x0)
            if rec is not None:  # regions committed earlier: start from what is on disk
                arr = self._zarray(name)
                arrays[name] = np.asarray(arr[..., y0:y1, x0:x1], dtype=d.dtype)
            elif name == "heat":  # mostly never written: pages only where it is (`_cold`)
                arrays[name] = lazy_zeros(shape, d.dtype)
            else:  # a written shard's memory when there is one (no fresh page faults)
                spare = self._pool.get((shape, d.dtype))
                if spare:
                    arrays[name] = spare.pop()
                    arrays[name].fill(0)
                else:
                    arrays[name] = np.zeros(shape, d.dtype)
        regions = frozenset(self.tiling.regions_of(*key))
        buf = ShardBuffer(key, (y0, x0, y1, x1), arrays, regions,
                          {i for i in regions if self.done[i]}, zeroed=rec is None)
        self.buffers[key] = buf
        return buf

    def _place(self, tiles: RegionTiles) -> None:
        t0 = time.perf_counter()
        touched: list[Index] = []
        tainted = set(tiles.tainted)
        for n0, n1, key in self._runs(tiles.indices):
            buf = self._buffer(key)
            self._copy_run(buf, tiles, n0, n1)
            for idx in tiles.indices[n0:n1]:
                buf.final.add(idx)
                if idx in tainted:
                    buf.tainted.add(idx)
                else:
                    buf.tainted.discard(idx)
            if key not in touched:
                touched.append(key)
        with self._lock:
            self.readable_mem.update(tiles.indices)
            for idx in tiles.indices:
                self.failed[idx] = False
        self._written.put((tuple(tiles.indices), time.perf_counter() - t0 + tiles.seconds))
        for key in touched:
            if self.buffers[key].complete:
                self._commit_complete(key)
        total = sum(b.nbytes for b in self.buffers.values())
        for key in list(self.buffers):
            if total <= self.budget:
                break
            if key in touched:
                continue
            total -= self.buffers[key].nbytes
            self._flush_partial(key)

    def _runs(self, indices: list[Index]) -> Iterator[tuple[int, int, Index]]:
        """(n0, n1, shard) for the runs of `indices` that are consecutive regions of one
        row of one shard (a batch usually is a few such runs)."""
        n0 = 0
        key = self.tiling.shard_of(*indices[0]) if indices else None
        for n in range(1, len(indices) + 1):
            if n < len(indices):
                (r0, c0), (r, c) = indices[n - 1], indices[n]
                k = self.tiling.shard_of(r, c)
                if k == key and r == r0 and c == c0 + 1:
                    continue
            yield n0, n, key
            if n < len(indices):
                n0, key = n, k

    def _copy_run(self, buf: ShardBuffer, tiles: RegionTiles, n0: int, n1: int) -> None:
        """Tiles n0..n1 (consecutive regions of one row) into the shard buffer: one copy per
        array, through a view of the buffer's rows split into region-wide columns."""
        r, c0 = tiles.indices[n0]
        y0, x0, y1, _ = self.spec.box(r, c0)
        x1 = self.spec.box(*tiles.indices[n1 - 1])[3]
        sy, sx = buf.box[0], buf.box[1]
        s, m = self.spec.region_size, n1 - n0
        for name, batch in tiles.arrays.items():
            dst = buf.arrays.get(name)
            if dst is None:
                continue
            part = batch[n0:n1, ..., : y1 - y0, :]  # (m, ..., h, S)
            if name == "heat" and self._cold(buf, part, tiles.indices[n0:n1]):
                continue
            if x1 - x0 == m * s:  # whole regions: (..., h, m, S) <- (m, ..., h, S)
                view = dst[..., y0 - sy:y1 - sy, x0 - sx:x1 - sx]
                st = view.strides
                split = np.lib.stride_tricks.as_strided(
                    view, (*view.shape[:-1], m, s), (*st[:-1], s * st[-1], st[-1]))
                split[...] = np.moveaxis(part, 0, -2)
            else:  # the last column of the image is narrower than a region
                for j in range(m):
                    _, a0, _, a1 = self.spec.box(r, c0 + j)
                    dst[..., y0 - sy:y1 - sy, a0 - sx:a1 - sx] = part[j][..., : a1 - a0]

    def _cold(self, buf: ShardBuffer, heat: np.ndarray, regions: list[Index]) -> bool:
        """True when copying these regions' heat (m, K [+ 1], h, S) can be skipped: every
        centre value is below the detection threshold (> 0) and the buffer holds zeros
        there. Peaks see only values >= the threshold (a lower one never beats them in the
        max-pool), so the zeros find the same points; most regions of a centre map are
        far below it, and their 8 bytes a pixel are then neither copied nor paged in."""
        peaks = self.peaks
        cold = (peaks is not None and peaks.threshold > 0 and buf.zeroed
                and buf.heat_kept.isdisjoint(regions)
                and bool(heat[:, :peaks.k].max() < peaks.threshold))
        if not cold:  # copied: the shard's peaks are searched
            buf.heat_kept.update(regions)
        return cold

    def _recycle(self, buf: ShardBuffer) -> None:
        for name, arr in buf.arrays.items():
            if name == "heat":
                continue
            spare = self._pool.setdefault((arr.shape, self.defs[name].dtype), [])
            if len(spare) < 4:
                spare.append(arr)
        buf.arrays = {}

    def _shard_key(self, name: str, key: Index) -> str:
        d = self.defs[name]
        lead = ["0"] * (len(d.shape) - 2)  # (K, Y, X) arrays: one shard along K
        return "/".join([d.path, "c", *lead, str(key[0]), str(key[1])])

    def _write(self, buf: ShardBuffer, names: list[str]) -> dict[str, list[int] | None]:
        """Write the buffer's shard of each array `names` whole (the buffer holds all the
        shard will hold: zarr is kept from reading an earlier file of it back), replacing
        any earlier file atomically: a reader sees the old shard or the new one."""
        self.changed = True
        y0, x0, y1, x1 = buf.box
        for name in names:
            with self.zstore.fresh([self._shard_key(name, buf.key)]):
                self._zarray(name)[..., y0:y1, x0:x1] = buf.arrays[name]
        return {k: (list(v) if v is not None else None) for k, v in self.zstore.take().items()}

    def _commit_complete(self, key: Index) -> None:
        buf = self.buffers[key]  # stays readable from memory until it is on disk
        public = [n for n, d in self.defs.items() if not d.private]
        files = self._write(buf, public)
        record: dict[str, Any] = {"t": "shard", "k": list(key), "files": files,
                                  "complete": True}
        if buf.tainted:
            record["tainted"] = sorted(list(i) for i in buf.tainted)
        pts = frames = None
        if self.peaks is not None:
            pts, frames = self.peaks.interior(key, buf.arrays["heat"],
                                              cold=buf.zeroed and not buf.heat_kept)
            record["points"] = self.packs.append(pack(pts, frames)).to_list()
        self.journal.append([record])
        old = self.records.get(key)
        if old is not None and any(k.startswith(HEAT_PATH) for k in old.get("files", {})):
            for k in old["files"]:
                if k.startswith(HEAT_PATH):
                    (self.path / k).unlink(missing_ok=True)
        with self._lock:
            del self.buffers[key]
            self.records[key] = record
            for idx in buf.regions - buf.tainted:
                self.done[idx] = True
            self.readable_mem.difference_update(buf.regions)
            if pts is not None:
                self.interior[key] = pts
                self.point_parts.append(pts)
                self.frames[key] = frames
                for n in self.peaks.needs(key):  # a shard written again: borders redone
                    self.borders.pop(n, None)
                    self.border_done.discard(n)
        self._recycle(buf)
        if self.peaks is not None:
            for k in self.peaks.needs(key):
                self._try_border(k)
            self._drop_unneeded_frames()

    def _flush_partial(self, key: Index) -> None:
        buf = self.buffers[key]
        if buf.final - {i for i in buf.regions if self.done[i]} or key not in self.records:
            files = self._write(buf, list(self.defs))
            record = {"t": "shard", "k": list(key), "files": files, "complete": False,
                      "regions": sorted([list(i) for i in buf.final])}
            if buf.tainted:
                record["tainted"] = sorted(list(i) for i in buf.tainted)
            self.journal.append([record])
        else:  # nothing new since the last commit of this shard
            record = self.records[key]
        with self._lock:
            del self.buffers[key]
            was_complete = self._complete(key)
            self.records[key] = record
            for idx in buf.final - buf.tainted:
                self.done[idx] = True
            self.readable_mem.difference_update(buf.final)
            if was_complete and not record.get("complete") and self.peaks is not None:
                self.interior.pop(key, None)  # no longer a complete shard: its peaks and
                self.frames.pop(key, None)  # its neighbours' borders wait for it again
                for n in self.peaks.needs(key):
                    self.borders.pop(n, None)
                    self.border_done.discard(n)
        self._recycle(buf)

    def _complete(self, key: Index) -> bool:
        rec = self.records.get(key)
        return rec is not None and bool(rec.get("complete"))

    def _frames_of(self, key: Index) -> dict[str, np.ndarray] | None:
        """The halo frames of a committed complete shard (read back from its pack blob when
        they were dropped from memory), or None."""
        if key in self.frames:
            return self.frames[key]
        rec = self.records.get(key)
        if rec is None or not rec.get("complete") or "points" not in rec:
            return None
        try:
            _, frames = unpack(self.packs.read(BlobRef.from_list(rec["points"])))
        except (CorruptBlob, TypeError, ValueError):
            return None
        self.frames[key] = frames
        return frames

    def _try_border(self, key: Index) -> None:
        needs = self.peaks.needs(key)
        if key in self.border_done or not all(self._complete(n) for n in needs):
            return
        frames = {n: self._frames_of(n) for n in needs}
        if any(f is None for f in frames.values()):
            return
        pts = self.peaks.border(key, frames)
        ref = self.packs.append(pack(pts, None))
        self.journal.append([{"t": "border", "k": list(key), "points": ref.to_list()}])
        with self._lock:
            self.border_done.add(key)
            self.borders[key] = pts
            self.point_parts.append(pts)

    def _drop_unneeded_frames(self) -> None:
        if self.peaks is None:
            return
        for key in list(self.frames):
            if all(n in self.border_done for n in self.peaks.needs(key)):
                del self.frames[key]

    # ------------------------------------------------------------------ reading
    def read_region(self, name: str, idx: Index) -> np.ndarray | None:
        """The final `name` output ("labels" | "probabilities") of region idx, or None when
        it is not final yet. Thread-safe."""
        if name not in self.defs or self.defs[name].private:
            return None
        y0, x0, y1, x1 = self.spec.box(*idx)
        with self._lock:
            buf = self.buffers.get(self.tiling.shard_of(*idx))
            if buf is not None and idx in buf.final:  # in memory (written or not yet)
                sy, sx = buf.box[0], buf.box[1]
                return buf.arrays[name][..., y0 - sy:y1 - sy, x0 - sx:x1 - sx].copy()
            if not self.done[idx]:
                return None
        return np.asarray(self._read_array(name)[..., y0:y1, x0:x1])

    def _read_array(self, name: str):
        import zarr

        return zarr.open_array(str(self.path / self.defs[name].path), mode="r")

    def points(self) -> np.ndarray:
        """Every detection (level pixels, sorted by y, x, class): those of committed shards,
        and, where shards are incomplete (regions that failed), the peaks their centre maps
        give now with the missing regions as zeros, exactly as an in-memory run reports
        them (not committed: the run that completes those shards finds them again)."""
        from napari_xt.model.heads import POINT_DTYPE

        from .peaks import sort_points

        with self._lock:
            parts = [*self.interior.values(), *self.borders.values()]
        if self.peaks is not None:
            parts += self._provisional_points()
        return sort_points(np.concatenate(parts)) if parts else np.empty(0, POINT_DTYPE)

    def _provisional_points(self) -> list[np.ndarray]:
        rows, cols = self.tiling.shard_grid
        keys = [(i, j) for i in range(rows) for j in range(cols)]
        open_keys = [k for k in keys if not self._complete(k)]
        if not open_keys:
            return []
        heat = self._zarray("heat")
        frames, parts = {}, []
        for key in open_keys:
            y0, x0, y1, x1 = self.tiling.shard_box(*key)
            pts, frames[key] = self.peaks.interior(key, np.asarray(heat[..., y0:y1, x0:x1]))
            parts.append(pts)
        for key in keys:
            if key in self.border_done:
                continue
            needed = {n: frames.get(n) or self._frames_of(n) for n in self.peaks.needs(key)}
            if all(f is not None for f in needed.values()):
                parts.append(self.peaks.border(key, needed))
        return parts

    def points_since(self, cursor: int) -> tuple[np.ndarray | None, int]:
        """Detections committed after `cursor` (a count of parts) and the new cursor."""
        with self._lock:
            parts = self.point_parts[cursor:]
            n = len(self.point_parts)
        return (np.concatenate(parts) if parts else None), n

    # ------------------------------------------------------------------ end
    def record_published(self, what: str, files: dict[str, list[int] | None]) -> None:
        """Journals that the finishing step `what` wrote `files` (store-relative path -> [crc32,
        size], None: absent); a rerun keeps the step when they verify."""
        rec = {"t": "published", "what": what, "files": files}
        self.journal.append([rec])
        self.published[what] = rec

    def close(self) -> None:
        """Stop the writer (committing what it holds) and release the lock. Idempotent."""
        try:
            if self._thread is not None:
                self.stop_writer()
            elif not self.threaded and self.buffers and self.error is None:
                self.flush()
        finally:
            try:
                self.journal.close()
                self.packs.close()
            finally:
                from napari_xt.io.result_store import hold

                hold(self.path, False)
                self.lock.release()
