"""Data-parallel training over several processes (torch.distributed DDP), one per device.

A run of W processes takes the same steps as a 1-process run of the same config:

- Processes: started by ``torchrun`` or by ``napari-xt train --nproc N`` (`train.launch`),
  both with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
  `init_world` joins the group: gloo on the CPU, NCCL on CUDA, where rank r uses the device
  ``cuda:LOCAL_RANK``.
- Data: `optim.batch_size` stays the GLOBAL batch B and must divide by W. A step's B samples
  are drawn from (seed, step) exactly as in one process; rank r takes samples
  [r B/W, (r + 1) B/W) of them (`World.share`). With whole-image context the step's scenes are
  shared out the same way (`SceneCrops.forward_backward(world=...)`).
- Loss and gradients: each loss term is divided by its count over the whole global batch
  (the ranks' counts are summed first) and multiplied by W before backward; DDP averages the
  ranks' gradients, so the averaged gradient is the 1-process gradient of the global batch.
  The logged loss is the sum of the ranks' shares: the 1-process loss.
- Synchronization: the model and the training-only token head are wrapped together in one
  DDP module (`data_parallel`); every band of a streamed crop (`run.stream_rows`) goes through
  its forward, and all backward passes of a step but the last run under ``no_sync``, so
  gradients are reduced once per step. ``find_unused_parameters`` is on: a band where a
  rank's `run.grad_ratio` share is empty leaves the region encoder without gradients there.
- Random draws: `run.grad_ratio`'s choice of regions is drawn for the whole global batch,
  each rank keeps its own; the global torch RNG (stochastic depth) is reseeded every step from
  (seed, step, rank), so a resumed run (same number of ranks) draws as an uninterrupted one.
- Rank 0 alone evaluates, writes into the run folder and reports events; the others wait at
  a barrier.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# collectives wait this long for a slow rank (rank 0 evaluating, writing a checkpoint); a
# rank that dies is noticed by the launcher, which stops the others at once
TIMEOUT = timedelta(minutes=60)
ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_world_size() -> int | None:
    """The number of processes of a torchrun-style launch (WORLD_SIZE), or None outside one.
    A launch sets all of RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a WORLD_SIZE alone
    (left in a shell, say) is not one. A WORLD_SIZE that is not a whole number is a
    ValueError naming it."""
    if not all(key in os.environ for key in ENV_KEYS):
        return None
    try:
        return int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of "
                         "processes") from None


def check_global_batch(batch_size: int, world_size: int) -> None:
    """Refuse a global batch that the processes cannot share equally (a ValueError)."""
    if world_size < 1:
        raise ValueError(f"the number of processes must be >= 1, got {world_size}")
    if batch_size % world_size:
        raise ValueError(f"optim.batch_size {batch_size} is the global batch and must divide "
                         f"by the number of processes ({world_size})")


def check_devices(device: str, local_ranks: int) -> str:
    """The backend for `local_ranks` processes on this machine training on `device` (`run.device`):
    "gloo" for the CPU, "nccl" for CUDA with a device per local rank; else a ValueError."""
    kind = torch.device(device).type
    if kind == "cpu":
        return "gloo"
    if kind != "cuda":
        raise ValueError(f"run.device {device!r}: multi-process training runs on 'cpu' "
                         "(gloo) or 'cuda' (NCCL)")
    if not torch.cuda.is_available():
        raise ValueError(f"run.device {device!r}, but CUDA is not available")
    if local_ranks > torch.cuda.device_count():
        raise ValueError(f"{local_ranks} processes on this machine need {local_ranks} CUDA "
                         f"devices (one each), there are {torch.cuda.device_count()}")
    return "nccl"


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of rank `rank`'s global torch RNG at `step`."""
    return int(np.random.SeedSequence([int(seed), int(step), int(rank), 17]).generate_state(1)[0])


@dataclass(frozen=True)
class World:
    """This process's place in a process group: rank of size, its device."""

    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: it evaluates, writes the run folder and reports events."""
        return self.rank == 0

    def share(self, count: int) -> slice:
        """This rank's part of `count` items shared out in equal, consecutive parts."""
        check_global_batch(count, self.size)
        part = count // self.size
        return slice(self.rank * part, (self.rank + 1) * part)

    def sum(self, values: Sequence[float]) -> list[float]:
        """The element-wise sum of `values` over every rank (all ranks call it in turn)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def sum_counts(self, counts: dict[str, float]) -> dict[str, float]:
        """Loss normalizers summed over the ranks (the same keys in the same order on each)."""
        return dict(zip(counts, self.sum(list(counts.values()))))

    def sum_loss(self, loss: float, terms: dict[str, float]) -> tuple[float, dict[str, float]]:
        """A step's loss and terms, summed over the ranks' shares of the global batch."""
        total, *parts = self.sum([loss, *terms.values()])
        return total, dict(zip(terms, parts))

    def barrier(self) -> None:
        """Wait until every rank arrives."""
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group."""
        if dist.is_initialized():
            dist.destroy_process_group()


def init_world(device: str) -> World:
    """Join the process group described by torchrun's environment variables.

    `device` is `run.device`: ``cpu`` (gloo) or ``cuda`` / ``cuda:N`` (NCCL; every rank uses
    ``cuda:LOCAL_RANK`` whatever the index). Raises ValueError for another device, for CUDA
    that is missing or has fewer devices than the local ranks, or for a missing variable."""
    missing = [k for k in ENV_KEYS if k not in os.environ]
    if missing:
        raise ValueError(f"a multi-process run needs the environment variables {missing} "
                         "(start it with torchrun or napari-xt train --nproc N)")
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = check_devices(device, local_rank + 1)
    if backend == "nccl":
        where = torch.device("cuda", local_rank)
        torch.cuda.set_device(where)
        dist.init_process_group("nccl", rank=rank, world_size=size, timeout=TIMEOUT,
                                device_id=where)
    else:
        where = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=size, timeout=TIMEOUT)
    return World(rank, size, local_rank, where)


class TrainedModules(torch.nn.Module):
    """What a step trains, as one module for DDP: the model and, when the loss has one, the
    training-only token head. ``forward(fn, *args)`` returns ``fn(*args)``: the loop runs each
    band's computation through it, so DDP sees the graph whose gradients it reduces."""

    def __init__(self, model: torch.nn.Module, token_head: torch.nn.Module | None) -> None:
        super().__init__()
        self.model = model
        self.token_head = token_head

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)`: a step's computation, run through the DDP module."""
        return fn(*args)


def data_parallel(model: torch.nn.Module, token_head: torch.nn.Module | None,
                  world: World) -> torch.nn.parallel.DistributedDataParallel:
    """The DDP module over `model` and `token_head` (frozen parameters are left out; rank 0's
    weights are broadcast to the others)."""
    # a gradient whose strides differ from its parameter's only along dimensions of size 1
    # (e.g. depthwise convolution weights) is copied into DDP's bucket as it is; torch's note
    # about it says nothing about correctness
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    norms = [f"{child}.{name}" for child, module in model.named_children()
             if any(p.requires_grad for p in module.parameters())  # (trains: in train mode)
             for name, m in module.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if norms:
        raise ValueError(f"{norms[0]} is a BatchNorm layer ({len(norms)} in all): each process "
                         "would normalize its own share of the batch, so several processes "
                         "would not take the steps of one; train this model in one process, "
                         "or freeze the module that holds them (run.freeze)")
    ids = [world.device.index] if world.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(
        TrainedModules(model, token_head), device_ids=ids, find_unused_parameters=True)
