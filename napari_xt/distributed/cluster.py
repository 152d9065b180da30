"""What every distributed run shares: the model loaded once per worker process, the
cluster-wide cancel flag, and the local cluster that `--workers N` starts."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CPU_QUOTA = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "<quota> <period>" or "max <period>"
_MODELS: dict[tuple[str, int | None], tuple[Any, Any]] = {}  # per process
_MODELS_LOCK = threading.Lock()


def model_for(choice: str, in_chans: int | None = None):
    """(model, normalization) of a model choice ("demo", a zoo name, a checkpoint path; a
    zoo model built with `in_chans` channels), loaded once per process."""
    with _MODELS_LOCK:
        key = (choice, in_chans)
        if key not in _MODELS:
            from napari_xt.model.choice import load_model

            model, _, normalize = load_model(choice, in_chans)
            _MODELS[key] = (model, normalize)
        return _MODELS[key]


class ClusterCancel:
    """The engine's cancel check on a worker: a cluster-wide event, asked at most every
    0.5 s."""

    def __init__(self, name: str) -> None:
        self.name, self._event, self._last, self._set = name, None, 0.0, False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self._set and now - self._last > 0.5:
            from distributed import Event

            self._event = self._event or Event(self.name)
            self._set, self._last = self._event.is_set(), now
        return self._set


def local_cluster(local_cluster, workers: int):
    """A local cluster of `workers` processes that ignore Ctrl-C: the terminal sends it to
    the whole process group, and only this process should answer it (by cancelling the runs
    through the cluster-wide event, so finished work is kept)."""
    import signal

    import dask

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)  # (see `tune_malloc`)
    try:  # the worker processes start now and inherit the ignored SIGINT
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            return local_cluster(n_workers=workers, threads_per_worker=1, processes=True,
                                 dashboard_address=None)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


_TUNED = False


def tune_malloc() -> None:
    """Undo, in a worker process, what dask's nanny sets for every worker it starts:
    MALLOC_TRIM_THRESHOLD_=65536, which also fixes glibc's mmap threshold at 128 KiB, so
    every tensor above that is mapped and unmapped page by page: measured here, it made the
    demo model's decoder 2x slower in a worker than in a plain process. The thresholds are
    set back to about what glibc's own adaptive scheme reaches (32 MiB mapped, 256 MiB
    kept). Nothing happens outside glibc or when the variable is not set."""
    global _TUNED
    if _TUNED or "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return
    _TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 2**20)
    libc.mallopt(m_trim_threshold, 256 * 2**20)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, a batch scheduler's
    cpuset), capped by a cgroup v2 CPU quota (a container's `--cpus`), not the machine's
    core count."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity call on this platform
        cpus = os.cpu_count() or 1
    try:
        with open(CPU_QUOTA) as f:
            quota, period = f.read().split()[:2]
        if quota != "max" and int(period) > 0:
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):  # no cgroup v2 limit here
        pass
    return max(1, cpus)


def default_threads(workers: int) -> int:
    """Torch threads per local worker: the usable CPUs (`usable_cpus`) shared out (dask
    starts its workers with OMP_NUM_THREADS=1, which would leave the rest idle)."""
    return max(1, usable_cpus() // max(1, workers))


@contextmanager
def connect(workers: int, scheduler: str | None) -> Iterator[Any]:
    """A dask.distributed `Client`: of a local cluster of `workers` processes started here
    (and closed after), or of the running cluster at `scheduler`."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as err:
        raise ImportError("more than one worker needs dask.distributed: pip install "
                          "'napari-xt[distributed]'") from err
    own = client = None
    try:
        if scheduler is None:
            own = local_cluster(LocalCluster, workers)
            client = Client(own)
        else:
            try:
                client = Client(scheduler, timeout=10)
            except (OSError, TimeoutError) as err:
                raise ConnectionError(f"cannot reach the dask scheduler at {scheduler}: "
                                      f"{err}") from err
        yield client
    finally:
        if client is not None:
            client.close()
        if own is not None:
            own.close()


def as_they_end(futures: list[Any], client: Any, between: Any) -> Iterator[tuple[Any, Any]]:
    """(future, `as_completed` of the run) for each future as it ends, in completion order;
    `between()` is called before every look (about 10 times a second while nothing ends),
    so the caller can pass a cancel on. A future put back with `pending.add` is waited for
    again (one whose worker died before its result came here)."""
    from distributed import as_completed

    pending = as_completed(futures, loop=client.loop)  # (the client's loop, not the default's)
    while True:
        between()
        try:
            batch = pending.next_batch(block=False)
        except StopIteration:
            return
        if not batch:
            if pending.is_empty():
                return
            time.sleep(0.05)
            continue
        for future in batch:
            yield future, pending
