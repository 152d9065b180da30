"""`PackFiles`: append-only binary blobs in a few large files, each blob with its CRC-32.

Blobs are appended to `<prefix>-000000.bin`, `<prefix>-000001.bin`, ... (a new file when
the current one passes `roll_bytes`), so a million small blobs are a handful of files, not a
million. `append` returns a `BlobRef` (file number, offset, length, CRC-32) that the caller
records elsewhere (a journal); `read(ref)` gives the bytes back only when the file still
holds exactly them: a missing file, a truncated one or changed bytes raise `CorruptBlob`,
never return zeros or garbage. Bytes appended but never referenced (a kill between the
write and the journal record) are dead weight, nothing worse.

One writer at a time (the caller holds the folder's lock); reads are thread-safe.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class CorruptBlob(OSError):
    """A blob is missing, truncated or does not match its checksum."""


@dataclass(frozen=True)
class BlobRef:
    """Where a blob lies: pack file number, byte offset and length in it, and the
    CRC-32 of its bytes."""

    file: int
    offset: int
    nbytes: int
    crc: int

    def to_list(self) -> list[int]:
        """The ref as `[file, offset, nbytes, crc]`, for a JSON record."""
        return [self.file, self.offset, self.nbytes, self.crc]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> BlobRef:
        """The ref of a `[file, offset, nbytes, crc]` list (the inverse of `to_list`)."""
        file, offset, nbytes, crc = (int(v) for v in values)
        return cls(file, offset, nbytes, crc)


class PackFiles:
    """Pack files `<prefix>-NNNNNN.bin` in `folder`; a new file is started when the
    current one would grow past `roll_bytes`."""

    def __init__(self, folder: str | os.PathLike, prefix: str = "pack",
                 roll_bytes: int = 1 << 30) -> None:
        self.folder = Path(folder)
        self.prefix = prefix
        self.roll_bytes = int(roll_bytes)
        self._write = None  # (number, file object)
        self._read_fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def _name(self, number: int) -> Path:
        return self.folder / f"{self.prefix}-{number:06d}.bin"

    def files(self) -> list[Path]:
        """The pack files of this prefix that exist, in file-number order."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob(f"{self.prefix}-*.bin") if p.is_file())

    def _writer(self, incoming: int):
        if self._write is None:
            existing = self.files()
            number = int(existing[-1].stem.rsplit("-", 1)[1]) if existing else 0
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write = (number, open(self._name(number), "ab"))
        number, f = self._write
        if f.tell() > 0 and f.tell() + incoming > self.roll_bytes:
            f.close()
            number += 1
            self._write = (number, open(self._name(number), "ab"))
        return self._write

    def append(self, data: bytes | memoryview) -> BlobRef:
        """Append one blob; returns its ref."""
        return self.append_many([data])[0]

    def append_many(self, blobs: Sequence[bytes | memoryview]) -> list[BlobRef]:
        """Append `blobs` with one write; returns their refs (same order)."""
        total = sum(len(b) for b in blobs)
        number, f = self._writer(total)
        offset = f.tell()
        refs = []
        for b in blobs:
            refs.append(BlobRef(number, offset, len(b), zlib.crc32(b)))
            offset += len(b)
        f.write(b"".join(bytes(b) if isinstance(b, memoryview) else b for b in blobs))
        f.flush()
        return refs

    def read(self, ref: BlobRef) -> bytes:
        """The bytes of the blob `ref`; raises `CorruptBlob` when its file is missing,
        truncated or the bytes do not match the checksum."""
        fd = self._fd(ref.file)
        try:
            data = os.pread(fd, ref.nbytes, ref.offset)
        except OSError as err:
            raise CorruptBlob(f"{self._name(ref.file)}: cannot read: {err}") from err
        if len(data) != ref.nbytes:
            raise CorruptBlob(f"{self._name(ref.file)} is truncated ({len(data)} of "
                              f"{ref.nbytes} bytes at offset {ref.offset})")
        if zlib.crc32(data) != ref.crc:
            raise CorruptBlob(f"{self._name(ref.file)}: bytes at offset {ref.offset} do not "
                              "match their checksum")
        return data

    def _fd(self, number: int) -> int:
        with self._lock:
            fd = self._read_fds.get(number)
            if fd is None:
                try:
                    fd = os.open(self._name(number), os.O_RDONLY)
                except OSError as err:
                    raise CorruptBlob(f"{self._name(number)} is missing: {err}") from err
                self._read_fds[number] = fd
            return fd

    def close(self) -> None:
        """Close the file being written and every file opened for reading."""
        if self._write is not None:
            self._write[1].close()
            self._write = None
        with self._lock:
            for fd in self._read_fds.values():
                os.close(fd)
            self._read_fds.clear()

    def remove_all(self) -> None:
        """Delete every pack file of this prefix (the caller owns them)."""
        self.close()
        for p in self.files():
            p.unlink()
