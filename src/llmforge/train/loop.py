"""The one training loop: every objective (pretraining, SFT, ...) hands it a model and batches.

Batches come from a `BatchSource` that is a pure function of (step, micro-step), so resuming
from a checkpoint needs only the step number: no data-loader state to save, and the resumed run
sees exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from llmforge.runs import StageContext
from llmforge.train import checkpoint
from llmforge.train.device import DTYPES, autocast


@dataclass
class TrainConfig:
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1  # on matrices only; norms and biases are not decayed
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    dtype: str = "auto"  # auto (bf16 autocast where the hardware has it) | bf16 | fp32
    eval_every: int = 100
    eval_batches: int = 20
    ckpt_every: int = 200
    keep_last: int = 2
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every",
                     "eval_batches", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError("need lr > 0, 0 <= min_lr_ratio <= 1 and warmup_steps >= 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


class BatchSource(Protocol):
    def __call__(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (-100 where no loss) for one micro-batch, deterministic."""
        ...


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def train(
    model: torch.nn.Module,
    cfg: TrainConfig,
    batches: BatchSource,
    ctx: StageContext,
    *,
    evaluate: Callable[[], float] | None = None,
) -> dict:
    """Train `model` in place for cfg.max_steps, resuming from ctx.dir/checkpoints if present."""
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, cfg)
    ckpt_root = ctx.dir / "checkpoints"
    start = checkpoint.resume(ckpt_root, model, optimizer)
    history = ctx.rewind_metrics(start)  # drop what the interrupted run logged past its checkpoint
    if start:
        ctx.log.info(f"resumed from step {start}")
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    first_loss = history[0]["loss"] if history else None
    last_loss = val_loss = None
    model.train()
    last_logged, t_last = start, time.perf_counter()
    with ctx.progress("training", cfg.max_steps) as update:
        update(start)
        for step in range(start, cfg.max_steps):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                x, y = batches(step, micro)
                with autocast(device, cfg.dtype):
                    loss = model(x.to(device), y.to(device)) / cfg.grad_accum
                loss.backward()
                loss_sum += loss.item()
            grad_norm = _clip(model, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            record = {"step": done, "loss": round(loss_sum, 5), "lr": lr}
            first_loss = record["loss"] if first_loss is None else first_loss
            last_loss = record["loss"]
            logging_step = done % cfg.log_every == 0 or done == cfg.max_steps
            if logging_step:
                elapsed = time.perf_counter() - t_last
                record |= {"grad_norm": round(grad_norm, 4), "tokens_per_s":
                           round((done - last_logged) * tokens_per_step / elapsed, 1)}
            if evaluate and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                val_loss = evaluate()
                record["val_loss"] = round(val_loss, 5)
                ctx.log.info(f"step {done}: train loss {loss_sum:.4f}, val loss {val_loss:.4f}")
                model.train()
            ctx.metrics(**record)
            update(done, info=f"loss {loss_sum:.3f}")
            if done % cfg.ckpt_every == 0 or done == cfg.max_steps:
                checkpoint.save(ckpt_root, done, model, optimizer, keep_last=cfg.keep_last)
            if logging_step:  # evaluation and checkpoint time do not count against throughput
                last_logged, t_last = done, time.perf_counter()
    return {"steps": cfg.max_steps, "first_loss": first_loss, "final_loss": last_loss,
            "val_loss": val_loss, "tokens_seen": cfg.max_steps * tokens_per_step}


def _clip(model: torch.nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
