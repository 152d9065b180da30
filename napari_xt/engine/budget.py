"""`plan_budget`: what a run will take (regions, memory, disk), estimated from the image's
size and the model before anything that grows with the image is built; a run that cannot fit
is refused with one line saying what it needs against what there is and what would change
it, and the batch size is capped to the memory there is.

The figures:

- planning: the region grid, the crops, their visiting order and the encode sequence hold
  about `PLAN_BYTES_PER_REGION` bytes per region and `PLAN_BYTES_PER_CROP` per crop for the
  whole run (measured: 250-280 B per region up to 10^6 regions, 64 px regions, crops every
  4 or every 1 region), and take about `PLAN_SECONDS_PER_REGION` to build;
- results: per pixel, the labels' bytes and K float16 probabilities (each with a pyramid of
  1/3 more), and the detection maps' float32 channels while the run lasts; counted before
  compression (zstd shrinks labels much, maps little), so the disk figure is an upper
  bound; with no store they are numpy arrays in memory instead;
- embedding cache: every region's multi-level features in float16 (exact, uncompressed);
- a batch: one region's forward through the whole model, with every module's output
  counted as if kept at once (`region_memory`, an upper bound: measured 1.3x what the
  engine takes per unit of batch size on the CPU with the built-in model), times the batch
  size. It is probed only for batch sizes above `PROBE_ABOVE`; such a batch is also cut to
  the image's number of regions (batches are always full, the last one padded).

Available memory comes from /proc/meminfo (MemAvailable) and the cgroup limit, else from
`os.sysconf`; on CUDA from `torch.cuda.mem_get_info`. Where it cannot be known, nothing is
refused or capped for memory.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .events import Notice
from .plan import crop_starts, default_stride
from .spelling import Spelling, hint

PLAN_BYTES_PER_REGION = 320
PLAN_BYTES_PER_CROP = 160
PLAN_SECONDS_PER_REGION = 6e-6
PLAN_SHARE = 0.8  # of the available memory the plan (and in-memory results) may take
BATCH_SHARE = 0.5  # of what is left, for the batches
PROBE_ABOVE = 8  # batch sizes up to this are not probed (the default is 8)
LARGE_REGIONS = 100_000  # runs from this many regions (or a GiB of disk) say their estimate
LARGE_BYTES = 2**30


def size_text(n: float) -> str:
    """Bytes as B / KB / MB / GB / TB (1024-based)."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> int | None:
    """Bytes of memory this process can still take: MemAvailable, within the cgroup's limit
    when there is one; None when it cannot be told."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        avail = None
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    for limit_file, used_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                   "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, used = _read_int(limit_file), _read_int(used_file)
        if limit is not None and used is not None and limit < 2**60:
            left = max(0, limit - used)
            avail = left if avail is None else min(avail, left)
            break
    return avail


def device_memory(device: Any) -> int | None:
    """Free bytes on a CUDA device; None for other devices."""
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    try:
        free, _ = torch.cuda.mem_get_info(device)
    except (RuntimeError, AssertionError):
        return None
    return int(free)


def _existing(path: Path) -> Path:
    """`path`, or its nearest folder that exists (where it will be made)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_disk(path: Path) -> tuple[int | None, Path | None]:
    """(free bytes, folder asked) on the file system that `path` will be on."""
    p = _existing(path)
    try:
        return int(shutil.disk_usage(p).free), p
    except OSError:
        return None, None


def _bytes_under(path: Path, limit: int = 100_000) -> int:
    """Bytes of the files under `path` (an existing store or cache: what a resume has)."""
    total, seen = 0, 0
    for root, _, files in os.walk(path):
        for name in files:
            seen += 1
            if seen > limit:
                return total
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def region_memory(model: Any) -> int:
    """Bytes one region takes through the whole model: the outputs of every module of a
    forward of one zero region, counted as if all were kept at once (an upper bound)."""
    import torch

    cfg = model.cfg
    s, c = cfg.region.region_size, cfg.in_chans
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        for t in output if isinstance(output, (list, tuple)) else (
                output.values() if isinstance(output, dict) else (output,)):
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(1, c, s, s, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    return total + c * s * s * 4


class PlanError(ValueError):
    """The run cannot fit in memory or on disk (`run` raises it as an EngineInputError)."""


@dataclass(frozen=True)
class Need:
    """What a run on an image of `height x width` takes."""

    regions: int
    grid: tuple[int, int]
    crops: int
    plan_memory: int
    results: int  # bytes of the results before compression (on disk, or in memory)
    cache: int  # bytes of the embedding cache (0: no cache)


def _need(height: int, width: int, cfg: Any, model: Any, outputs, layout, crop_stride,
          cached: bool, pyramid: bool) -> Need:
    size = int(cfg.region.region_size)
    rows, cols = -(-height // size), -(-width // size)
    k = max(1, int(cfg.crop_regions or 1))
    stride = default_stride(k) if crop_stride is None else max(1, int(crop_stride))
    crops = len(crop_starts(rows, k, stride)) * len(crop_starts(cols, k, stride))
    regions = rows * cols
    pixels = height * width
    grow = 4 / 3 if pyramid else 1.0
    results = 0.0
    if layout is not None:
        if "labels" in outputs:
            results += pixels * np.dtype(layout.label_dtype).itemsize * grow
        if "probabilities" in outputs and layout.probs is not None:
            results += pixels * 2 * (layout.probs[1] - layout.probs[0]) * grow
        if "detections" in outputs and layout.heat is not None:
            channels = layout.heat[1] - layout.heat[0] + int(layout.size is not None)
            results += pixels * 4 * channels
    cache = 0
    if cached:
        encoder = getattr(model, "region_encoder", None)
        channels = getattr(encoder, "feature_channels", None) or ()
        strides = getattr(encoder, "feature_strides", None) or ()
        cache = regions * sum(2 * int(ch) * (size // int(st)) ** 2
                              for ch, st in zip(channels, strides))
    return Need(regions, (rows, cols), crops,
                regions * PLAN_BYTES_PER_REGION + crops * PLAN_BYTES_PER_CROP,
                int(results), int(cache))


@dataclass(frozen=True)
class Budget:
    """The estimate of a run that fits, the batch size to use and what to say about it."""

    need: Need
    batch_size: int
    region_memory: int | None  # bytes per region of a batch (None: not probed)
    memory: int | None  # available bytes (None: unknown)
    disk: int | None  # free bytes where the store / cache go (None: nothing on disk)
    notices: tuple[Notice, ...]


def plan_budget(source: Any, model: Any, outputs, layout: Any, store: Any, cache: Any,
                batch_size: int, device: Any, crop_stride: int | None = None,
                spelling: Spelling | None = None) -> Budget:
    """Estimate the run of `model` over `source` (an `ImageSource`) into `store` (a path, or
    None: results in memory) with `cache` (as `run` takes it); raise `PlanError` when
    it cannot fit in memory or on disk (naming a coarser level, no cache, another output);
    cap `batch_size` to the memory there is (with a Notice)."""
    from .device import device_name, pick_device
    from .store.layout import default_cache

    spelling = spelling or Spelling()
    cfg = model.cfg
    where = None if store is None else Path(store)
    cache_path = None
    if cache is True or cache == "rebuild":
        cache_path = None if where is None else default_cache(where)
    elif cache is not False and cache is not None:
        cache_path = Path(cache)
    on_disk = where is not None

    def need_at(height: int, width: int) -> Need:
        return _need(height, width, cfg, model, outputs, layout, crop_stride,
                     cache_path is not None, on_disk)

    need = need_at(source.height, source.width)
    memory = available_memory()
    disk, disk_at = (None, None)
    if where is not None or cache_path is not None:
        disk, disk_at = free_disk(where if where is not None else cache_path)
    # a cache on another file system than the store is checked against its own free space
    split = (where is not None and cache_path is not None
             and _device(where) is not None and _device(cache_path) != _device(where))
    had = 0  # what a resumed store (and a cache of its own place) already holds
    if where is not None and (where / "zarr.json").is_file():
        had += _bytes_under(where)
    had_cache = 0
    if cache_path is not None and where is not None and not _inside(cache_path, where) \
            and (cache_path / "cache.json").is_file():
        had_cache = _bytes_under(cache_path)
    if split:
        cache_disk, cache_at = free_disk(cache_path)
        if cache_disk is not None and need.cache - had_cache > cache_disk:
            raise PlanError(
                f"the embedding cache of {need.regions:,} regions needs about "
                f"{size_text(need.cache - had_cache)} more of disk at {cache_at} "
                f"({size_text(cache_disk)} free); run with {hint(spelling, 'no_cache')}, "
                "or put the cache on a larger disk")
    else:
        had += had_cache

    def memory_need(n: Need) -> int:
        return n.plan_memory + (0 if on_disk else n.results)

    def disk_need(n: Need) -> int:
        return (n.results if on_disk else 0) + (0 if split else n.cache)

    def fits(n: Need) -> bool:
        mem_ok = memory is None or memory_need(n) <= PLAN_SHARE * memory
        disk_ok = disk is None or disk_need(n) - had <= disk
        return mem_ok and disk_ok

    if not fits(need):
        raise PlanError(_refusal(source, need, cfg.region.region_size, need_at, fits,
                                        memory, memory_need, disk, disk_at, disk_need, had,
                                        on_disk, spelling))
    notices: list[Notice] = []
    dev = pick_device(device)
    per_region = None
    capped = int(batch_size)
    if batch_size > PROBE_ABOVE:
        # a batch is always full (the last one padded): more than the image's regions
        # would only be padding
        capped = min(capped, max(PROBE_ABOVE, need.regions))
        per_region = region_memory(model)
        room = None if memory is None else BATCH_SHARE * max(0, memory - memory_need(need))
        host_room = room
        gpu = device_memory(dev)
        if gpu is not None:  # the batches' activations on the device, their pixels on the host
            room = BATCH_SHARE * gpu
        cap = None if room is None else max(1, int(room // per_region))
        if host_room is not None and gpu is not None:
            pixels = 4 * cfg.in_chans * cfg.region.region_size ** 2 * 4  # queued batches
            cap = min(cap, max(1, int(host_room // pixels)))
        wanted = capped
        if cap is not None and wanted > cap:
            capped = cap
            have = gpu if gpu is not None else memory
            notices.append(Notice(
                f"batch size {batch_size} needs about {size_text(wanted * per_region)} of "
                f"{device_name(dev)} memory ({size_text(per_region)} a region at most), "
                f"{size_text(have)} available: using {capped} "
                f"({hint(spelling, 'batch_size')} sets it)", "warning"))
    large = (need.regions >= LARGE_REGIONS or disk_need(need) >= LARGE_BYTES
             or need.plan_memory >= LARGE_BYTES // 4)
    if large:
        notices.insert(0, Notice(_estimate(need, cfg.region.region_size, memory,
                                           memory_need(need), disk, disk_at, disk_need(need),
                                           on_disk, capped, per_region), "info"))
    return Budget(need, capped, per_region, memory, disk, tuple(notices))


def _device(path: Path) -> int | None:
    """The file system (st_dev) that `path` is on or will be on; None when unknown."""
    try:
        return os.stat(_existing(path)).st_dev
    except OSError:
        return None


def _inside(path: Path, root: Path) -> bool:
    try:
        path.absolute().relative_to(root.absolute())
    except ValueError:
        return False
    return True


def _regions_text(n: Need, size: int) -> str:
    return f"{n.regions:,} regions ({n.grid[0]:,} x {n.grid[1]:,} of {size} px)"


def _disk_text(n: Need, total: int, on_disk: bool, where, free) -> str:
    parts = []
    if on_disk:
        parts.append(f"results up to {size_text(n.results)} before compression")
    if n.cache:
        parts.append(f"embedding cache {size_text(n.cache)}")
    there = "" if where is None else f" at {where}"
    left = "" if free is None else f"; {size_text(free)} free"
    return f"{size_text(total)} of disk{there} ({', '.join(parts)}{left})"


def _estimate(n: Need, size: int, memory, mem_need: int, disk, disk_at, disk_need: int,
              on_disk: bool, batch: int, per_region: int | None) -> str:
    seconds = max(1, round(n.regions * PLAN_SECONDS_PER_REGION))
    text = (f"estimate: {_regions_text(n, size)} in {n.crops:,} crops, about {seconds} s to "
            f"plan; memory about {size_text(mem_need)} for the plan"
            + ("" if on_disk else " and the results")
            + (f" + {size_text(batch * per_region)} for batches of {batch}" if per_region
               else "")
            + (f" ({size_text(memory)} available)" if memory is not None else ""))
    if disk_need:
        text += f"; disk about {_disk_text(n, disk_need, on_disk, disk_at, disk)}"
    return text


def _refusal(source, need: Need, size: int, need_at, fits, memory, mem_need, disk, disk_at,
             disk_need, had: int, on_disk: bool, spelling: Spelling) -> str:
    """One line: what the run needs against what there is, and what would change it."""
    short = []
    if memory is not None and mem_need(need) > PLAN_SHARE * memory:
        short.append(f"about {size_text(mem_need(need))} of memory for the plan"
                     + ("" if on_disk else " and the results")
                     + f" ({size_text(memory)} available)")
    disk_short = disk is not None and disk_need(need) - had > disk
    if disk_short:
        short.append(f"about {_disk_text(need, disk_need(need) - had, on_disk, disk_at, disk)}")
    remedies = []
    if disk_short and need.cache and disk_need(need) - need.cache - had <= disk:
        remedies.append(f"run with {hint(spelling, 'no_cache')} (saves "
                        f"{size_text(need.cache)})")
    iy, ix = source.axes.index("Y"), source.axes.index("X")
    for offset, level in enumerate(getattr(source, "pyramid", [])[1:], 1):
        coarse = need_at(int(level.shape[iy]), int(level.shape[ix]))
        if fits(coarse):  # the first coarser level of the image's own pyramid that fits
            remedies.append(f"predict a coarser level with "
                            f"{hint(spelling, 'level', level=source.level + offset)} "
                            f"({coarse.regions:,} regions)")
            break
    else:
        remedies.append(hint(spelling, "pyramid"))
    if disk_short:
        remedies.append(f"{hint(spelling, 'out')} on a larger disk")
    return (f"the run of {_regions_text(need, size)} needs {' and '.join(short)}; "
            + "; or ".join(remedies))
