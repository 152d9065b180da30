"""CRC-32 of every file a result store writes, taken from the bytes as they are written.

`DigestStore` wraps zarr's `LocalStore`: each `set(key, bytes)` records (crc32, size) of the
bytes, so a commit can name exactly what it wrote without reading anything back. `verify`
checks a recorded digest against the file on disk now (missing, truncated or changed ->
False): what a rerun does before it trusts a committed shard.
"""

from __future__ import annotations

import errno
import os
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path

from zarr.storage import LocalStore, WrapperStore

Digest = tuple[int, int]  # (crc32, size in bytes)


class DigestStore(WrapperStore[LocalStore]):
    """A zarr `LocalStore` that records the (crc32, size) of every key it writes (`take` hands
    them over) and hides keys being rewritten whole (`fresh`); safe to use from several threads.
    The copies zarr makes of it share its records."""

    def __init__(self, store: LocalStore | str | os.PathLike) -> None:
        if not isinstance(store, LocalStore):
            store = LocalStore(str(store))
        super().__init__(store)
        self._digests: dict[str, Digest | None] = {}
        self._fresh: set[str] = set()
        self._lock = threading.Lock()

    def _with_store(self, store: LocalStore) -> DigestStore:
        out = type(self)(store)
        out._digests, out._fresh, out._lock = self._digests, self._fresh, self._lock
        return out

    @contextmanager
    def fresh(self, keys):
        """While writing `keys` whole: zarr sees them as absent (it would read an existing
        shard back to merge into it, and fail on a damaged one); the file on disk is
        replaced atomically by the write, so readers see the old bytes or the new ones."""
        keys = set(keys)
        with self._lock:
            self._fresh |= keys
        try:
            yield
        finally:
            with self._lock:
                self._fresh -= keys

    def _is_fresh(self, key: str) -> bool:
        with self._lock:
            return key in self._fresh

    async def get(self, key, prototype, byte_range=None):
        """The bytes of `key` (or its `byte_range`), None when it is absent or being written
        `fresh`."""
        if self._is_fresh(key):
            return None
        return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        """The byte ranges `key_ranges` as the wrapped store reads them, None for keys being
        written `fresh`."""
        key_ranges = list(key_ranges)
        out = await self._store.get_partial_values(prototype, key_ranges)
        return [None if self._is_fresh(k) else v for (k, _), v in zip(key_ranges, out)]

    async def exists(self, key: str) -> bool:
        """Whether `key` exists (False while it is being written `fresh`)."""
        return False if self._is_fresh(key) else await self._store.exists(key)

    async def set(self, key, value) -> None:
        """Writes `value` at `key` (the file replaced atomically) and records the (crc32, size)
        of its bytes."""
        view = value.as_buffer_like()
        digest = (zlib.crc32(view), len(view))
        await self._store.set(key, value)
        with self._lock:
            self._digests[key] = digest

    async def delete(self, key: str) -> None:
        """Deletes `key` and records that it must be absent (digest None)."""
        await self._store.delete(key)
        with self._lock:
            self._digests[key] = None

    def take(self, prefix: str = "") -> dict[str, Digest | None]:
        """The digests recorded since the last `take` for keys under `prefix` (removed)."""
        with self._lock:
            keys = [k for k in self._digests if k.startswith(prefix)]
            return {k: self._digests.pop(k) for k in keys}


def file_digest(path: str | os.PathLike) -> Digest | None:
    """(crc32, size) of a file now, None when it does not exist."""
    crc, size = 0, 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                crc = zlib.crc32(chunk, crc)
                size += len(chunk)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    return crc, size


def verify(root: Path, files: dict[str, list[int] | None]) -> bool:
    """True when every file `root/key` holds exactly the recorded bytes (None: must be
    absent)."""
    for key, want in files.items():
        have = file_digest(root / key)
        if (want is None) != (have is None):
            return False
        if want is not None and tuple(want) != have:
            return False
    return True


def sync_tree(root: str | os.PathLike, skip: tuple[str, ...] = ()) -> int:
    """Ask the disk to keep every file and folder under `root` (fsync each; files already
    on disk cost nothing), so that a power cut after the store says "complete" cannot leave
    it without its data; folders `skip` (paths relative to root) are left out. Returns how
    many files were synced."""
    n = 0
    skipped = {os.path.normpath(os.path.join(root, s)) for s in skip}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.normpath(os.path.join(dirpath, d)) not in skipped]
        for name in files:
            sync_file(os.path.join(dirpath, name))
            n += 1
        sync_dir(dirpath)
    return n


def sync_file(path: str | os.PathLike, folder: bool = False) -> None:
    """fsync a file (missing: nothing to do), or a folder (its entries: files created or
    renamed in it). Where the system cannot sync (a folder on Windows, file systems that
    refuse fsync) the data is left to it, as without this call."""
    if folder and os.name == "nt":
        return
    fd = None
    for flags in ((os.O_RDONLY,) if folder else (os.O_RDWR, os.O_RDONLY)):
        try:
            fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
            break
        except OSError:
            continue
    if fd is None:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EBADF, errno.EINVAL, errno.ENOTSUP, errno.EACCES,
                             errno.EPERM):
            raise
    finally:
        os.close(fd)


def sync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so that files created or renamed in it persist (nothing on Windows)."""
    sync_file(path, folder=True)
