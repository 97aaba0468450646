"""Data parallelism across torchrun ranks: DDP (full replicas) or FSDP2 (sharded parameters).

DDP keeps a whole model and optimizer on every rank and averages gradients; FSDP2
(`fully_shard`) keeps 1/world of each parameter, gradient and optimizer state per rank and
gathers a block's weights just for its forward and backward, so models too big for one device
train. Both average gradients over ranks, so a global batch gives the same update either way.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from llmforge import distributed

STRATEGIES = ("ddp", "fsdp")


def parallelize(model: nn.Module, strategy: str) -> nn.Module:
    """The module to call for forward and backward. FSDP2 shards `model` in place; DDP wraps
    it. A single process gets `model` back unchanged."""
    if strategy not in STRATEGIES:
        raise ValueError(f"parallel must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    dist = distributed.info()
    if dist.world_size == 1:
        return model
    if strategy == "ddp":
        device_ids = [dist.local_rank] if next(model.parameters()).is_cuda else None
        return DistributedDataParallel(model, device_ids=device_ids)
    for block in model.layers:  # one all-gather per block keeps only one block whole at a time
        fully_shard(block)
    fully_shard(model)
    return model


def gradient_sync(module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if isinstance(module, DistributedDataParallel) and not enabled:
        return module.no_sync()
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole, unsharded CPU tensors on rank 0 (empty elsewhere): what a model directory holds.

    Every rank must call it, since gathering FSDP2 shards is collective.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
