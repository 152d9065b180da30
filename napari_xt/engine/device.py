"""Device choice, autocast policy and out-of-memory back-off.

- `pick_device("auto")`: cuda -> mps -> cpu; any torch device string is accepted as is.
- `autocast(device)`: bf16 autocast on CUDA (fp16 on MPS), plain fp32 on the CPU.
- `BatchRunner`: runs a function on slices of a batch; on `torch.OutOfMemoryError` it halves
  the batch size, empties the CUDA cache, reports a notice and retries, down to one item
  (then the error propagates). The smaller batch size is kept for the rest of the run.
  Context/decode calls back off the same way in `crops.py` (crop groups split in halves,
  a crop's regions decoded in halved chunks).
- `bound_heap()`: on glibc (Linux), buffers of 4 MiB and more are given back to the system
  when freed (a fixed `M_MMAP_THRESHOLD`). By default glibc raises that threshold as large
  buffers come and go (up to 32 MiB), and a long run's region batches, feature maps and
  chunk buffers then stay in the heap, fragmented: peak memory grew with the image (1.15x
  from 1024 to 4096 px on the CPU) though the engine holds no more at once. Smaller buffers
  stay in the heap (a lower threshold, e.g. 128 KiB, gives the same peak but makes every
  mid-sized temporary a system call: slower runs, and slower for the rest of the process,
  napari included). Applied once per process when a run starts, unless the environment sets
  the threshold (`MALLOC_MMAP_THRESHOLD_`, or `glibc.malloc.mmap_threshold` in
  `GLIBC_TUNABLES`: the user's choice is kept).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for `device`: "auto" picks CUDA, then MPS, then the CPU; a `torch.device`
    is returned as it is and any other string is parsed by torch. Raises ValueError when a CUDA
    device is asked for and CUDA is not available."""
    if isinstance(device, torch.device):
        return device
    if device != "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def background_threads(device: torch.device) -> bool:
    """Whether reading and writing run in threads of their own: yes beside a GPU (they
    overlap its work); not on the CPU, where such threads only take cores from torch's
    own threads (measured on 2 cores, 4096^2: a writer thread made the run 40 % slower,
    a reader thread 6 %). The results are the same either way."""
    return device.type != "cpu" or FORCE_THREADS


FORCE_THREADS = False  # tests: run the threaded paths on the CPU too


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision for inference: bf16 on CUDA, fp16 on MPS, none (fp32) on the CPU."""
    if not enabled or device.type == "cpu":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def is_oom(err: BaseException) -> bool:
    """Whether `err` is a device out-of-memory error: a `torch.OutOfMemoryError`, or any error
    whose message says "out of memory" (as MPS reports it)."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(err, oom) or "out of memory" in str(err).lower()


def release(device: torch.device) -> None:
    """Returns the CUDA allocator's cached memory to the device (after an out-of-memory error);
    nothing on other devices."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


class BatchRunner:
    """`run(items, fn)`: fn(sub-batch) -> list of per-item results, with OOM halving."""

    def __init__(self, batch_size: int, device: torch.device,
                 notify: Callable[[str], None] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.device = device
        self.notify = notify or (lambda message: None)

    def run(self, items: Sequence[Any], fn: Callable[[Sequence[Any]], list[Any]]) -> list[Any]:
        """`fn` over `items` in slices of at most `batch_size`, the lists it returns concatenated
        in order. On device out-of-memory the slice is halved (the smaller `batch_size` is kept),
        the CUDA cache emptied, `notify` told, and the slice tried again, down to one item, after
        which the error propagates; any other error propagates at once."""
        out: list[Any] = []
        start = 0
        while start < len(items):
            stop = min(len(items), start + self.batch_size)
            try:
                out.extend(fn(items[start:stop]))
            except Exception as err:
                if not is_oom(err) or stop - start == 1:
                    raise
                old = self.batch_size
                self.batch_size = max(1, (stop - start) // 2)
                release(self.device)
                self.notify(f"{device_name(self.device)} out of memory: batch {old} -> "
                            f"{self.batch_size}")
                continue
            start = stop
        return out

    def run_batches(self, n: int, fn: Callable[[Sequence[int]], list[Any]]) -> list[Any]:
        """`fn(items)` over items 0..n-1 in sub-batches (OOM halving as in `run`); returns
        what each call returned, concatenated (fn returns a one-element list per call)."""
        return self.run(list(range(n)), fn)


def device_name(device: torch.device) -> str:
    """The device's kind as messages name it: "CUDA", "MPS" or "CPU" (others as torch names
    them)."""
    return {"cuda": "CUDA", "mps": "MPS", "cpu": "CPU"}.get(device.type, device.type)


HEAP_MMAP_THRESHOLD = 4 << 20  # bytes: larger buffers go back to the system when freed
_heap_bounded: bool | None = None


def bound_heap() -> bool:
    """Fix glibc's mmap threshold at `HEAP_MMAP_THRESHOLD` (see the module docstring), once
    per process; True when a fixed threshold is in force (set here or by the environment),
    False where the C library is not glibc."""
    global _heap_bounded
    if _heap_bounded is None:
        if "MALLOC_MMAP_THRESHOLD_" in os.environ or "glibc.malloc.mmap_threshold" in \
                os.environ.get("GLIBC_TUNABLES", ""):
            _heap_bounded = True  # the environment's own threshold (read by glibc at start)
        elif not sys.platform.startswith("linux"):
            _heap_bounded = False
        else:
            import ctypes

            try:
                mallopt = ctypes.CDLL("libc.so.6").mallopt
            except (OSError, AttributeError):  # not glibc (e.g. musl)
                _heap_bounded = False
            else:
                m_mmap_threshold = -3  # from glibc's malloc.h
                _heap_bounded = bool(mallopt(m_mmap_threshold, HEAP_MMAP_THRESHOLD))
    return _heap_bounded
