"""N local processes of one data-parallel run, started as torchrun starts them.

`run_ranks(argv, n)` starts `argv` n times with torchrun's environment (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so a rank runs exactly the code it
runs under ``torchrun --nproc_per_node N``. As torchrun's agent does, the launcher itself
hosts the group's rendezvous store on a port the system picks while binding it, and tells
the ranks so (TORCHELASTIC_USE_AGENT_STORE): no port is chosen first and bound later, so
no other process can take it in between. It waits for all of them;
the first rank that fails, a Ctrl-C or a SIGTERM to the launcher stops the others (SIGTERM,
then SIGKILL after a grace period): a failing rank never leaves the others waiting in a
collective. The ranks run in a session of their own, so a Ctrl-C reaches the launcher alone
and ends the group once; a rank whose launcher disappears ends itself (`watch_launcher`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

LAUNCHER_ENV = "NAPARI_XT_LAUNCHER_PID"  # set for the ranks this module starts


@dataclass(frozen=True)
class LaunchResult:
    """How a launch ended. `code`: 0 when every rank succeeded, else the exit code of the
    first rank that failed (1 for a rank killed by a signal), 130 when cancelled by Ctrl-C,
    143 (128 + SIGTERM, as a shell reports it) when the launcher got SIGTERM. `failed`:
    (rank, exit code) of the ranks found failed first (several when they ended together)."""

    code: int
    failed: list[tuple[int, int]] = field(default_factory=list)
    cancelled: bool = False


def rendezvous_store() -> Any:
    """A rendezvous store (torch's TCPStore server) on 127.0.0.1, bound to a port the
    system picks (its `.port`); the ranks connect to it as clients."""
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, None, True, timedelta(minutes=30), wait_for_workers=False)


def rank_env(rank: int, nproc: int, port: int, base: dict[str, str] | None = None
             ) -> dict[str, str]:
    """The environment of local rank `rank` of `nproc` (torchrun's variables)."""
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
               LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # the launcher hosts the store at MASTER_ADDR:MASTER_PORT (`rendezvous_store`); every
    # rank, rank 0 too, connects to it as a client
    env.update(TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0")
    env[LAUNCHER_ENV] = str(os.getpid())
    return env


class _Terminated(Exception):
    """The launcher got SIGTERM."""


def run_ranks(argv: Sequence[str], nproc: int, grace_s: float = 10.0, poll_s: float = 0.05
              ) -> LaunchResult:
    """Run the command `argv` as ranks 0 .. nproc-1 of one process group; see the module doc.
    Their standard streams are this process's."""
    if nproc < 1:
        raise ValueError(f"the number of processes must be >= 1, got {nproc}")
    store = rendezvous_store()  # held (served) until the ranks have ended
    port = int(store.port)
    procs: list[subprocess.Popen] = []
    previous = None
    if threading.current_thread() is threading.main_thread():
        def terminated(signum, frame):
            raise _Terminated()

        previous = signal.signal(signal.SIGTERM, terminated)
    try:
        for rank in range(nproc):
            procs.append(subprocess.Popen(list(argv), env=rank_env(rank, nproc, port),
                                          start_new_session=True))
        return _wait(procs, poll_s)
    except KeyboardInterrupt:
        return LaunchResult(130, cancelled=True)
    except _Terminated:
        return LaunchResult(128 + signal.SIGTERM, cancelled=True)
    finally:
        stop(procs, grace_s)
        del store
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _wait(procs: list[subprocess.Popen], poll_s: float) -> LaunchResult:
    while True:
        codes = [p.poll() for p in procs]
        failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            first = failed[0][1]
            return LaunchResult(first if first > 0 else 1, failed)
        if all(c == 0 for c in codes):
            return LaunchResult(0)
        time.sleep(poll_s)


def stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """End the processes still running: SIGTERM, then SIGKILL after `grace_s` seconds."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in alive:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def watch_launcher(interval_s: float = 1.0) -> None:
    """In a rank started by `run_ranks`: end this process (exit code 1) once its launcher is
    gone (killed without stopping its ranks). Does nothing in other processes."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher is None or int(launcher) != os.getppid():
        return

    def watch() -> None:
        while os.getppid() == int(launcher):
            time.sleep(interval_s)
        os._exit(1)

    threading.Thread(target=watch, name="napari-xt-launcher-watch", daemon=True).start()
