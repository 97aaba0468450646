"""Training checkpoints through torch.distributed.checkpoint: atomic, last k kept, reshardable.

Every rank writes its own shards into a temporary directory; once all have finished, rank 0
writes state.json and renames the directory into place. A kill during a write therefore leaves
the previous checkpoint as the newest valid one. DCP stores each tensor with its global shape,
so a checkpoint written by N ranks (DDP, FSDP2 or one process) loads into any other number.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llmforge import distributed

PREFIX = "step_"


def save(root: Path, step: int, model: nn.Module, optimizers: list[torch.optim.Optimizer],
         extra: dict | None = None, keep_last: int = 2) -> Path:
    """Write checkpoint `step` (collective: every rank calls it); `extra` goes to state.json."""
    dist = distributed.info()
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp_{final.name}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    _dcp(dcp.save, _state(model, optimizers), tmp)
    torch.save(_rng_state(), tmp / f"rng_rank{dist.rank}.pt")
    distributed.barrier()  # every rank's files are complete before the rename publishes them
    if dist.is_main:
        state = {"step": step, "world_size": dist.world_size, **(extra or {})}
        (tmp / "state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    distributed.barrier()
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def resume(root: Path, model: nn.Module,
           optimizers: list[torch.optim.Optimizer]) -> tuple[int, dict]:
    """Load the newest checkpoint into model and optimizers, and this rank's RNG state when the
    world size is unchanged; return (step, state.json). Step 0 and {} when there is none."""
    found = list_checkpoints(root)
    if not found:
        return 0, {}
    latest = found[-1]
    state = _state(model, optimizers)
    _dcp(dcp.load, state, latest)
    set_model_state_dict(model, state["model"])
    for i, optimizer in enumerate(optimizers):
        set_optimizer_state_dict(model, optimizer, state[f"optimizer_{i}"])
    meta = json.loads((latest / "state.json").read_text())
    dist = distributed.info()
    rng_file = latest / f"rng_rank{dist.rank}.pt"
    if meta.get("world_size") == dist.world_size and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return meta["step"], meta


def load_weights(path: Path, model: nn.Module) -> None:
    """Only the model weights of a checkpoint directory, into a model of any sharding."""
    state = {"model": get_model_state_dict(model)}
    _dcp(dcp.load, state, path)
    set_model_state_dict(model, state["model"])


def _dcp(op: Callable[..., object], state: dict, path: Path) -> None:
    """dcp.save or dcp.load of `state` at `path`; one process runs without a process group,
    for which DCP warns on every call, so that warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        op(state, checkpoint_id=path, no_dist=distributed.info().world_size == 1)


def _state(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict:
    """Model and optimizer state keyed by parameter name, so it survives resharding."""
    state = {"model": get_model_state_dict(model)}
    for i, optimizer in enumerate(optimizers):
        state[f"optimizer_{i}"] = get_optimizer_state_dict(model, optimizer)
    return state


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
