"""`FolderLock`: one writer at a time for a folder (a result store, an embedding cache).

The lock is an advisory OS lock (`flock` on POSIX, `msvcrt.locking` on Windows) on a small
file inside the folder, which also holds who took it (pid, host, start time, command) so a
refusal can name the other run. The OS drops the lock when its process dies, however it
dies (kill -9 included), so a lock left behind by a crashed run is never an obstacle: the
next run takes it over and reports the dead holder it replaced. Two locks on the same file
conflict even inside one process (each `FolderLock` opens the file anew).

The lock file itself is never deleted (deleting it would let two processes lock two
different files of the same name); releasing empties it.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt


class LockedError(OSError):
    """The folder is locked by another live run."""


@dataclass(frozen=True)
class Holder:
    """The run holding a lock: process id, host name, start time (ISO 8601, UTC)
    and command line, as written in the lock file."""

    pid: int
    host: str
    started: str
    command: str

    def describe(self) -> str:
        """The holder in words, for messages (pid, host, start time and command)."""
        return (f"pid {self.pid} on {self.host}, started {self.started}"
                + (f" ({self.command})" if self.command else ""))


def _me() -> Holder:
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
    return Holder(os.getpid(), socket.gethostname(), now.isoformat(), command[:200])


def _read_holder(fd: int) -> Holder | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        data = json.loads(raw.decode()) if raw.strip() else None
        return Holder(int(data["pid"]), str(data["host"]), str(data["started"]),
                      str(data.get("command", ""))) if data else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class FolderLock:
    """Exclusive lock of `folder` (file `folder/name`); `what` names the folder in messages."""

    def __init__(self, folder: str | os.PathLike, what: str, name: str = "lock") -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = what
        self._fd: int | None = None
        self.replaced: Holder | None = None  # a dead run whose lock this one took over

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> str | None:
        """Take the lock or raise `LockedError` naming the holder. Returns a notice when the
        lock of a run that died without releasing it was taken over, else None."""
        if self._fd is not None:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _try_lock(fd):
                holder = _read_holder(fd)
                who = holder.describe() if holder else "another process"
                raise LockedError(f"{self.what} is in use by another run ({who}); wait for "
                                  "it to finish or stop it, then run again")
            self.replaced = _read_holder(fd)
            me = _me()
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(me.__dict__).encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if self.replaced is not None:
            return (f"{self.what} was left locked by a run that ended without releasing it "
                    f"({self.replaced.describe()}); this run took it over")
        return None

    def release(self) -> None:
        """Release the lock and empty the lock file; a no-op when it is not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            _unlock(fd)
            os.close(fd)

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a forgotten lock must not outlive its owner object
        try:
            self.release()
        except Exception:
            pass


def _try_lock(fd: int) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
    try:  # pragma: no cover - Windows
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError:  # pragma: no cover
        return False


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return
    try:  # pragma: no cover - Windows
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    except OSError:  # pragma: no cover
        pass
