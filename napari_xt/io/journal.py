"""`Journal`: an append-only log of JSON records, each line carrying its own CRC-32.

    <crc32 of the JSON text, 8 hex digits> <JSON text>\\n

A record is either read back exactly or not at all: reading stops at the first line that is
torn (a kill in the middle of a write), garbled or not JSON, so everything after a damaged
spot is treated as never written (whoever relies on the journal recomputes it). The next
`append` cuts such a damaged tail off before writing. One writer at a time (the caller holds
the folder's lock); appends are flushed to the OS at once, so they survive the death of the
process, and `sync()` also asks the disk to keep them.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class Journal:
    """Append-only journal of JSON records in the file `path` (created on the first
    write)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._good: int | None = None  # bytes of the valid prefix, once read
        self._file = None

    def records(self) -> list[dict[str, Any]]:
        """Every intact record, in order (the valid prefix of the file)."""
        out: list[dict[str, Any]] = []
        good = 0
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            self._good = 0
            return out
        for line in data.splitlines(keepends=True):
            record = _parse(line)
            if record is None:
                break
            out.append(record)
            good += len(line)
        self._good = good
        return out

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append `records` (JSON-compatible dicts, no NaN or infinity) and flush them
        to the OS; a damaged tail of the file is cut off first."""
        lines = b"".join(_line(r) for r in records)
        if not lines:
            return
        f = self._open()
        f.write(lines)
        f.flush()
        self._good = f.tell()  # (a later reopen must keep what this wrote)

    def sync(self) -> None:
        """Ask the disk to keep what was appended (`fsync`); a no-op when the file is not open."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def reset(self) -> None:
        """Start an empty journal (the caller has decided the old records are void)."""
        self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "wb"):
            pass
        self._good = 0

    def close(self) -> None:
        """Close the file."""
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def _open(self):
        if self._file is None:
            if self._good is None:
                self.records()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "ab")
            if f.tell() != self._good:  # a torn or garbled tail: never append after it
                f.truncate(self._good)
                f.seek(self._good)
            self._file = f
        return self._file


def _line(record: dict[str, Any]) -> bytes:
    text = json.dumps(record, separators=(",", ":"), allow_nan=False).encode()
    if b"\n" in text:  # pragma: no cover - json.dumps never emits raw newlines
        raise ValueError("journal records must be single-line JSON")
    return b"%08x %s\n" % (zlib.crc32(text), text)


def _parse(line: bytes) -> dict[str, Any] | None:
    if not line.endswith(b"\n") or len(line) < 11 or line[8:9] != b" ":
        return None
    text = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(text):
            return None
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
