"""Which process am I, and how processes wait for each other, under torchrun.

torchrun (single- or multi-node: its rendezvous sets MASTER_ADDR/PORT) gives each process RANK,
WORLD_SIZE and LOCAL_RANK. Stages that train run on every rank; all other stages run on rank 0
while the rest wait, so files are written once. A plain `python` run has no process group and
every function here is a no-op for it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Rank 0 may spend hours on a data stage while the others wait; ordinary collectives keep
# the default timeout so a hung training step still fails.
_WAIT_TIMEOUT = datetime.timedelta(days=2)
_wait_group = None


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def info() -> DistInfo:
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> DistInfo:
    """Join the process group torchrun describes (gloo for CPU tensors, NCCL for CUDA ones)."""
    global _wait_group
    if not launched_by_torchrun() or dist.is_initialized():
        return info()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    _wait_group = dist.new_group(backend="gloo", timeout=_WAIT_TIMEOUT)
    return info()


def shutdown() -> None:
    global _wait_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _wait_group = None


def barrier() -> None:
    """Every rank reaches this point before any goes on (long timeout: rank 0 may be busy)."""
    if info().world_size > 1:
        dist.barrier(group=_wait_group)


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (gloo has no AVG, so SUM then divide)."""
    world = info().world_size
    if world == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / world
