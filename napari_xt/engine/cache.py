"""`EmbeddingCache`: region features saved on disk so later runs skip the region encoder.

The expensive stage of xT is the region encoder; the context encoder and the heads are cheap.
The cache keeps every region's multi-level features (fp16) as one blob per region in a few
large pack files (`napari_xt.io.packs`), indexed by a checksummed journal:

    <cache>/cache.json        {"napari-xt-cache": 2, "signature": {...}, "levels": [[C, h, w], ...]}
    <cache>/index             journal: which pack, offset, length and CRC-32 hold each region
    <cache>/pack-000000.bin   the blobs (a new file every GiB)
    <cache>/lock              one run at a time
    <cache>/index-<part>, seg-<part>-000000.bin, lock-<part>
                              a part's own index and blobs, written beside the others
                              by the workers of a distributed run (`segment=`)

So a 100k x 100k slide's cache is a handful of files, not a million chunks. Every read is
checked: a region whose bytes are missing, truncated or changed is reported (`get` returns it
in `bad`) and re-encoded by the engine, never read as zeros or garbage.

A cache is valid only for the exact inputs of the encoder, recorded as its signature: image
identity (path, shape, dtype, level, content fingerprint), normalisation, model hash, region
size and package version. Changing context settings, thresholds or outputs reuses it. A
cache with another signature is never used silently: `CacheMismatchError` names what
differs, or with `rebuild=True` it is emptied (only a folder this module recognises as a
cache, or the default place inside a result store, is ever emptied).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_xt.io.journal import Journal
from napari_xt.io.lock import FolderLock
from napari_xt.io.packs import BlobRef, CorruptBlob, PackFiles

from .spelling import Spelling, hint

FORMAT = 2
META = "cache.json"
SEGMENT_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
Index = tuple[int, int]


class CacheMismatchError(ValueError):
    """The embedding cache at a path was made for another image or model (or is not one)."""


def signature_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two signatures (sorted)."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("napari-xt-cache") == FORMAT else None


def _is_legacy_cache(path: Path) -> bool:
    """An embedding cache written by napari-xt 0.1 (zarr arrays `level_<l>` and `done`)."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return "napari-xt-cache" in meta.get("attributes", {})


class EmbeddingCache:
    """The embedding cache of one encoder input (its `signature`) over a `grid` of regions:
    `has`, `get` and `put` region features, every read verified (module docstring)."""

    def __init__(self, path: str | os.PathLike, signature: dict[str, Any],
                 grid: tuple[int, int], rebuild: bool = False, owned: bool = False,
                 spelling: Spelling | None = None, segment: str | None = None,
                 known: Mapping[Index, Any] | None = None) -> None:
        """`owned`: the folder is private to a result store (its default place), so it may
        be emptied whatever it holds; a folder given by the user is emptied on `rebuild`
        only when it is recognisably an embedding cache.

        `segment`: write into a part of the cache of its own (index, blobs and lock named
        after it) beside other writers, as the workers of one distributed run do; the cache
        must exist with this signature (its run made it), and is never emptied. Every cache
        reads what all its parts hold: from their index files, or, with `known` (a part's
        `locations` handed on by the run), from that mapping alone, so a part does not read
        the whole image's index to find the few hundred regions it needs."""
        self.path = Path(path)
        self.signature = json.loads(json.dumps(signature))
        self.grid = (int(grid[0]), int(grid[1]))
        self.rebuilt = False
        self.notices: list[str] = []
        self.segment = segment
        self.spelling = spell = spelling or Spelling()
        if self.path.exists() and not self.path.is_dir():
            raise CacheMismatchError(f"embedding cache {self.path} is a file, not a folder; "
                                     f"{hint(spell, 'cache_path')}")
        if known is not None and segment is None:
            raise ValueError("known locations are for a part of a cache (segment=...)")
        if segment is not None:
            self._open_segment(segment)
        else:
            self._open_main(rebuild, owned)
        self._read_index(known)

    def _open_main(self, rebuild: bool, owned: bool) -> None:
        spell = self.spelling
        self.lock = FolderLock(self.path, f"embedding cache {self.path}")
        meta = _read_meta(self.path)
        occupied = self.path.is_dir() and any(not p.name.startswith("lock")
                                              for p in self.path.iterdir())
        empty = False  # decided first; emptied only under the lock (a live run keeps it)
        if meta is not None and meta.get("signature") != self.signature:
            if not rebuild:
                diff = signature_diff(meta.get("signature") or {}, self.signature)
                raise CacheMismatchError(
                    f"embedding cache {self.path} was made for another input (differs in: "
                    f"{', '.join(diff)}); {hint(spell, 'rebuild_cache')}")
            empty = True
        elif meta is None and occupied:
            legacy = _is_legacy_cache(self.path)
            if owned:  # the store's own: whatever it holds now, it is rebuilt
                empty = True
                self.notices.append(f"embedding cache {self.path} was unreadable or of an "
                                    "older napari-xt; it is rebuilt")
            elif not rebuild:
                what = ("was written by an older napari-xt" if legacy else
                        "exists and is not a napari-xt embedding cache")
                raise CacheMismatchError(f"{self.path} {what}; "
                                         + hint(spell, "rebuild_cache" if legacy
                                                else "cache_path"))
            elif not legacy:
                raise CacheMismatchError(f"{self.path} exists and is not a napari-xt "
                                         "embedding cache, so it is never emptied; "
                                         f"{hint(spell, 'cache_path')}")
            else:
                empty = True
        notice = self.lock.acquire()  # (LockedError: another run has it, nothing emptied)
        if notice:
            self.notices.append(notice)
        if empty:
            try:
                self._empty()
            except BaseException:
                self.lock.release()
                raise
        self.index = Journal(self.path / "index")
        self.packs = PackFiles(self.path, "pack")
        if _read_meta(self.path) is None:
            self._write_meta({"napari-xt-cache": FORMAT, "signature": self.signature,
                              "levels": None})
            self.index.reset()

    def _open_segment(self, segment: str) -> None:
        if not SEGMENT_NAME.fullmatch(segment):
            raise ValueError(f"a cache part is named by letters, digits and _, not {segment!r}")
        meta = _read_meta(self.path)
        if meta is None or meta.get("signature") != self.signature:
            raise CacheMismatchError(
                f"embedding cache {self.path} is missing or was made for another input; a "
                "part of a distributed run writes only into the cache its run made")
        self.lock = FolderLock(self.path, f"embedding cache {self.path} (part {segment})",
                               name=f"lock-{segment}")
        notice = self.lock.acquire()
        if notice:
            self.notices.append(notice)
        self.index = Journal(self.path / f"index-{segment}")
        self.packs = PackFiles(self.path, f"seg-{segment}")

    def _read_index(self, known: Mapping[Index, Any] | None = None) -> None:
        """Every part's index: which blob (of which part's files) holds each region."""
        meta = _read_meta(self.path) or {}
        self.shapes: list[tuple[int, ...]] | None = (
            [tuple(s) for s in meta["levels"]] if meta.get("levels") else None)
        self.refs: dict[Index, BlobRef] = {}
        self.where: dict[Index, PackFiles] = {}  # the pack files each region's blob is in
        self.mask_side: dict[Index, int] = {}  # regions whose blob ends with a NaN mask
        if known is not None:
            self._use_known(known)
            return
        parts = [(self.index if self.segment is None else Journal(self.path / "index"),
                  self.packs if self.segment is None else PackFiles(self.path, "pack"))]
        self._readers = [parts[0][1]]
        for journal in sorted(self.path.glob("index-*")):
            name = journal.name[len("index-"):]
            if not SEGMENT_NAME.fullmatch(name):
                continue
            if name == self.segment:
                parts.append((self.index, self.packs))
            else:
                packs = PackFiles(self.path, f"seg-{name}")
                self._readers.append(packs)
                parts.append((Journal(journal), packs))
        for journal, packs in parts:
            for rec in journal.records():
                sides = rec.get("m") or [0] * len(rec.get("r", []))
                for rc, ref, side in zip(rec.get("r", []), rec.get("b", []), sides):
                    idx = (int(rc[0]), int(rc[1]))
                    if 0 <= idx[0] < self.grid[0] and 0 <= idx[1] < self.grid[1]:
                        self.refs[idx] = BlobRef.from_list(ref)
                        self.where[idx] = packs
                        self.mask_side[idx] = int(side)
        self._mark_done()

    def _mark_done(self) -> None:
        self.done = np.zeros(self.grid, bool)  # (rows, cols) regions the index holds
        for r, c in self.refs:
            self.done[r, c] = True

    def _use_known(self, known: Mapping[Index, Any]) -> None:
        readers = {self.segment: self.packs}
        for idx, (part, ref, side) in known.items():
            idx = (int(idx[0]), int(idx[1]))
            if not (0 <= idx[0] < self.grid[0] and 0 <= idx[1] < self.grid[1]):
                continue
            if part not in readers:
                if part and not SEGMENT_NAME.fullmatch(part):
                    continue
                readers[part] = PackFiles(self.path, f"seg-{part}" if part else "pack")
            self.refs[idx] = BlobRef.from_list(ref)
            self.where[idx] = readers[part]
            self.mask_side[idx] = int(side)
        self._readers = [r for name, r in readers.items() if name != self.segment]
        self._mark_done()

    def locations(self, indices: Sequence[Index]) -> dict[Index, tuple[str, list[int], int]]:
        """Where the blobs of `indices` are, for those the cache holds: region -> (its part's
        name, "" for the cache's own files; the blob's reference; its mask side), what
        `EmbeddingCache(segment=..., known=...)` takes."""
        out = {}
        for idx in indices:
            idx = (int(idx[0]), int(idx[1]))
            ref = self.refs.get(idx)
            if ref is None:
                continue
            prefix = self.where[idx].prefix
            part = "" if prefix == "pack" else prefix[len("seg-"):]
            out[idx] = (part, ref.to_list(), self.mask_side.get(idx, 0))
        return out

    def _empty(self) -> None:
        """Remove the cache folder's contents (only called for a recognised or owned cache)."""
        for child in self.path.iterdir():
            if child.name.startswith("lock"):  # (a lock file is never deleted)
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.rebuilt = True

    def _write_meta(self, meta: dict[str, Any]) -> None:
        tmp = self.path / f".{META}.{os.getpid()}.tmp"  # (parts may write it at once)
        tmp.write_text(json.dumps(meta))
        tmp.replace(self.path / META)

    # ------------------------------------------------------------------ access
    def has(self, row: int, col: int) -> bool:
        """True when some part of the cache holds region (row, col) (not yet verified: `get`
        checks the bytes)."""
        return bool(self.done[row, col])

    def get(self, indices: Sequence[Index]
            ) -> tuple[list[Index], list[np.ndarray], dict[Index, str], dict[Index, np.ndarray]]:
        """(found, levels, bad, masks): features of the regions of `indices` that read back
        intact, per level (n, C_l, h_l, w_l) float16; `bad` maps every region whose bytes are
        missing, truncated or changed to the reason (they are forgotten: encode them again);
        `masks` the (S, S) non-finite-pixel masks of regions that had such pixels."""
        assert self.shapes is not None
        sizes = [int(np.prod(s)) for s in self.shapes]
        nbytes = 2 * sum(sizes)
        found: list[Index] = []
        parts: list[np.ndarray] = []
        bad: dict[Index, str] = {}
        masks: dict[Index, np.ndarray] = {}
        for idx in indices:
            try:
                data = self.where[idx].read(self.refs[idx])
                side = self.mask_side.get(idx, 0)
                extra = -(-side * side // 8)
                if len(data) != nbytes + extra:
                    raise CorruptBlob(f"{len(data)} bytes instead of {nbytes + extra}")
                flat = np.frombuffer(data[:nbytes], np.float16)
                if side:
                    bits = np.unpackbits(np.frombuffer(data[nbytes:], np.uint8),
                                         count=side * side)
                    masks[idx] = bits.astype(bool).reshape(side, side)
            except (CorruptBlob, KeyError) as err:
                bad[idx] = str(err)
                self.forget(idx)
                masks.pop(idx, None)
                continue
            found.append(idx)
            parts.append(flat)
        levels = []
        start = 0
        for n, shape in zip(sizes, self.shapes):
            levels.append(np.stack([p[start:start + n].reshape(shape) for p in parts])
                          if parts else np.empty((0, *shape), np.float16))
            start += n
        return found, levels, bad, masks

    def forget(self, idx: Index) -> None:
        """Treat region `idx` as not cached (its blob did not verify: it is encoded again)."""
        self.refs.pop(idx, None)
        self.where.pop(idx, None)
        self.done[idx] = False

    def put(self, indices: Sequence[Index], features: Sequence[np.ndarray],
            masks: dict[Index, np.ndarray] | None = None) -> None:
        """features: per level (n, C_l, h_l, w_l) (any float dtype; stored fp16); `masks`:
        (S, S) bool masks of the regions' non-finite pixels (kept with their features, so
        a region read from the cache is masked as when it was read from the image)."""
        masks = masks or {}
        shapes = [tuple(int(d) for d in f.shape[1:]) for f in features]
        if self.shapes is None:
            self.shapes = shapes
            self._write_meta({"napari-xt-cache": FORMAT, "signature": self.signature,
                              "levels": [list(s) for s in shapes]})
        elif shapes != self.shapes:
            raise CacheMismatchError(f"embedding cache {self.path} holds features of shapes "
                                     f"{self.shapes}, not {shapes}")
        halves = [np.ascontiguousarray(f, dtype=np.float16) for f in features]
        blobs, sides = [], []
        for n, idx in enumerate(indices):
            blob = b"".join(h[n].tobytes() for h in halves)
            mask = masks.get(tuple(idx))
            if mask is not None:
                blob += np.packbits(np.asarray(mask, bool).ravel()).tobytes()
            blobs.append(blob)
            sides.append(0 if mask is None else int(mask.shape[0]))
        refs = self.packs.append_many(blobs)
        self.index.append([{"r": [[int(r), int(c)] for r, c in indices],
                            "b": [ref.to_list() for ref in refs], "m": sides}])
        for idx, ref, side in zip(indices, refs, sides):
            key = (int(idx[0]), int(idx[1]))
            self.refs[key] = ref
            self.where[key] = self.packs
            self.mask_side[key] = side
            self.done[key] = True

    def close(self) -> None:
        """Close the index and the pack files and release this cache's (or part's) lock."""
        self.index.close()
        for packs in {id(p): p for p in [self.packs, *self._readers]}.values():
            packs.close()
        self.lock.release()

    # ------------------------------------------------------------------ size
    def bytes_per_region(self) -> int:
        """Disk bytes one region's features take (fp16); 0 before the first `put`."""
        return 0 if not self.shapes else sum(2 * int(np.prod(s)) for s in self.shapes)

    def size_notice(self) -> tuple[str, bool]:
        """(message, fits): the disk the rest of the cache will take against the free space
        where it lives."""
        missing = int(self.done.size - self.done.sum())
        each = self.bytes_per_region()
        need = missing * each
        free = shutil.disk_usage(self.path).free
        fits = need < free
        msg = (f"embedding cache {self.path}: about {_size(need)} more for {missing} regions "
               f"({_size(each)} each), {_size(free)} free")
        if not fits:
            msg += ("; it will NOT fit: the run stops with an error when the disk is full "
                    f"(finished regions are kept); run with {hint(self.spelling, 'no_cache')} "
                    "or free some space")
        return msg, fits


def _size(n: float) -> str:
    """Bytes as B / KB / MB / GB (1024-based)."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            break
    return f"{n:.1f} {unit}"
