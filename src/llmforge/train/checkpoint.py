"""Training checkpoints: written atomically, the last k kept, resumed from the newest.

A checkpoint directory is written under a temporary name and renamed into place, so a kill
during a write leaves the previous checkpoint as the newest valid one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import safetensors.torch
import torch

PREFIX = "step_"


def save(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         keep_last: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp_{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def resume(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load the newest checkpoint into model and optimizer; return its step (0 when none)."""
    found = list_checkpoints(root)
    if not found:
        return 0
    latest = found[-1]
    safetensors.torch.load_model(model, str(latest / "model.safetensors"))
    optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True))
    return json.loads((latest / "state.json").read_text())["step"]
