"""The one training loop: every objective (pretraining, SFT, ...) hands it a model and batches.

Batches come from a `BatchSource` that is a pure function of (step, micro-step), so resuming
from a checkpoint needs only the step number: no data-loader state to save, and the resumed run
sees exactly the batches the uninterrupted one would have. Under torchrun each rank's source
yields its own slice of the global batch (train/data.py) and the loop runs unchanged on every
rank, with gradients averaged by DDP or FSDP2 (train/parallel.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch.distributed.tensor import DTensor

from llmforge import distributed
from llmforge.runs import StageContext
from llmforge.train import checkpoint
from llmforge.train.device import DTYPES, autocast, use_bf16
from llmforge.train.flops import flops_per_token, measured_peak_flops
from llmforge.train.muon import Muon, split_for_muon
from llmforge.train.parallel import STRATEGIES, gradient_sync, parallelize
from llmforge.train.tracking import Trackers, TrackingConfig, memory_stats


@dataclass
class TrainConfig:
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 50
    # cosine: decay from warmup to the end. wsd (warmup-stable-decay): hold lr, then decay
    # linearly over the last decay_frac of the steps, so a run can be extended before its decay.
    schedule: str = "cosine"
    decay_frac: float = 0.2
    weight_decay: float = 0.1  # on matrices only; norms and biases are not decayed
    muon_momentum: float = 0.95
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    dtype: str = "auto"  # auto (bf16 autocast where the hardware has it) | bf16 | fp32
    eval_every: int = 100
    eval_batches: int = 20
    ckpt_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    peak_tflops: float = 0.0  # the hardware's peak for MFU; 0 = measure a matmul at start-up
    compile: bool = False  # torch.compile the forward + loss (first steps pay for compiling)
    # Skip (and log) an update whose loss or gradient norm is NaN/inf, or whose loss exceeds
    # spike_factor x the running mean of accepted losses (0 = no spike check).
    skip_nonfinite: bool = True
    spike_factor: float = 0.0
    # adamw: AdamW for everything. muon: Muon for hidden matrices, AdamW for embeddings, head,
    # norms and biases; Muon's step is scaled to AdamW's RMS, so lr and weight_decay carry over.
    optimizer: str = "adamw"
    parallel: str = "ddp"  # under torchrun: ddp (replicas) or fsdp (FSDP2 sharding)
    activation_checkpointing: bool = False  # recompute block activations in backward
    doc_masking: bool = False  # attention stays inside each document of a packed window
    # Benchmarks scored at every evaluation (built-in task names), aggregated CORE-like:
    # accuracy above chance, averaged. core_limit items of each keep it quick.
    core_tasks: list[str] = field(default_factory=list)
    core_limit: int = 200
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every",
                     "eval_batches", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError("need lr > 0, 0 <= min_lr_ratio <= 1 and warmup_steps >= 0")
        if self.schedule not in SCHEDULES or not 0 < self.decay_frac <= 1:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)} with 0 < decay_frac"
                             f" <= 1, got {self.schedule!r}, {self.decay_frac}")
        if self.peak_tflops < 0 or (self.spike_factor and self.spike_factor <= 1):
            raise ValueError("need peak_tflops >= 0 and spike_factor 0 (off) or > 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, "
                             f"got {self.optimizer!r}")
        if self.parallel not in STRATEGIES:
            raise ValueError(f"parallel must be one of {', '.join(STRATEGIES)}, "
                             f"got {self.parallel!r}")


SCHEDULES = ("cosine", "wsd")
OPTIMIZERS = ("adamw", "muon")


class BatchSource(Protocol):
    def __call__(self, step: int, micro: int) -> tuple[torch.Tensor, ...]:
        """Inputs, targets (-100 where no loss) and optionally document ids for one
        micro-batch of this rank, deterministic."""
        ...


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine or warmup-stable-decay down to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        decay_start = cfg.max_steps - cfg.decay_frac * cfg.max_steps
        remaining = 1.0 - max(0.0, step - decay_start) / (cfg.max_steps - decay_start)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * max(0.0, remaining))
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizers(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW (fused where the device supports it), or Muon for hidden matrices plus AdamW."""
    optimizers: list[torch.optim.Optimizer] = []
    if cfg.optimizer == "muon":
        hidden, params = split_for_muon(model.named_parameters())
        optimizers.append(Muon(hidden, lr=cfg.lr, momentum=cfg.muon_momentum,
                               weight_decay=cfg.weight_decay))
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = bool(params) and params[0].device.type in ("cuda", "cpu")
    optimizers.append(torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                        fused=fused))
    return optimizers


# What one micro-batch costs: (the model's forward, the batch) -> (loss, metrics to log).
Objective = Callable[[torch.nn.Module, tuple[torch.Tensor, ...]],
                     tuple[torch.Tensor, dict[str, float]]]


def lm_objective(forward: torch.nn.Module,
                 batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy on (inputs, targets[, doc_ids]): pretraining and SFT."""
    x, y, *doc_ids = batch
    return forward(x, y, doc_ids=doc_ids[0] if doc_ids else None), {}


def train(
    model: torch.nn.Module,
    cfg: TrainConfig,
    batches: BatchSource,
    ctx: StageContext,
    *,
    evaluate: Callable[[], float] | None = None,
    benchmark: Callable[[], dict[str, float]] | None = None,
    objective: Objective = lm_objective,
) -> dict:
    """Train `model` in place for cfg.max_steps, resuming from ctx.dir/checkpoints if present.

    `objective` turns a micro-batch into a loss (the language-model loss unless an alignment
    method brings its own); its metrics are averaged over the step's micro-batches and ranks,
    and logged.
    Under torchrun, every rank calls this with its own batch source; `model` is sharded in
    place (fsdp) or wrapped (ddp), and only rank 0 writes metrics.
    """
    device = next(model.parameters()).device
    model.activation_checkpointing = cfg.activation_checkpointing
    step_module = parallelize(model, cfg.parallel)
    optimizers = make_optimizers(model, cfg)
    ckpt_root = ctx.dir / "checkpoints"
    start, saved = checkpoint.resume(ckpt_root, model, optimizers)
    history = ctx.rewind_metrics(start)  # drop what the interrupted run logged past its checkpoint
    if start:
        ctx.log.info(f"resumed from step {start}")
    world = distributed.info().world_size
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    step_flops = tokens_per_step * flops_per_token(model.cfg, cfg.seq_len)
    peak = world * (cfg.peak_tflops * 1e12
                    or measured_peak_flops(device.type, use_bf16(device, cfg.dtype)))
    first_loss = history[0]["loss"] if history else None
    last_loss = val_loss = None
    guard = UpdateGuard(cfg.skip_nonfinite, cfg.spike_factor, **saved.get("guard", {}))
    # Checkpoints keep using `model`: the compiled wrapper shares its parameters.
    forward = torch.compile(step_module) if cfg.compile else step_module
    tracking = cfg.tracking if ctx.is_main else TrackingConfig()
    trackers = Trackers(tracking, ctx.dir, run_name=f"{ctx.root.name}/{ctx.name}",
                        config=dataclasses.asdict(cfg), log=ctx.log)
    model.train()
    last_logged, t_last = start, time.perf_counter()
    with trackers, ctx.progress("training", cfg.max_steps) as update:
        update(start)
        for step in range(start, cfg.max_steps):
            lr = lr_at(step, cfg)
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            extras: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                batch = tuple(t.to(device) for t in batches(step, micro))
                last_micro = micro == cfg.grad_accum - 1
                with gradient_sync(step_module, last_micro):
                    with autocast(device, cfg.dtype):
                        loss, metrics = objective(forward, batch)
                        loss = loss / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
                for key, value in metrics.items():
                    extras[key] = extras.get(key, 0.0) + value / cfg.grad_accum
            loss_sum = distributed.mean_across_ranks(loss_sum).item()
            extras = _mean_across_ranks(extras, device)
            grad_norm = _clip(model, cfg.grad_clip)
            skipped = guard.check(loss_sum, grad_norm)
            if skipped:
                ctx.log.warning(f"step {step + 1}: update skipped ({skipped})")
            else:
                for optimizer in optimizers:
                    optimizer.step()
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            done = step + 1
            record = {"step": done, "loss": round(loss_sum, 5), "lr": lr,
                      **{k: round(v, 5) for k, v in extras.items()}}
            if skipped:
                record["skipped"] = skipped
            first_loss = record["loss"] if first_loss is None else first_loss
            last_loss = record["loss"]
            logging_step = done % cfg.log_every == 0 or done == cfg.max_steps
            if logging_step:
                elapsed = time.perf_counter() - t_last
                steps_per_s = (done - last_logged) / elapsed
                record |= {"grad_norm": round(grad_norm, 4),
                           "tokens_per_s": round(steps_per_s * tokens_per_step, 1),
                           "mfu": round(steps_per_s * step_flops / peak, 4),
                           **memory_stats(device)}
            if evaluate and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                val_loss = evaluate()
                record["val_loss"] = round(val_loss, 5)
                ctx.log.info(f"step {done}: train loss {loss_sum:.4f}, val loss {val_loss:.4f}")
                model.train()
            if benchmark and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                scores = benchmark()
                record |= {k: round(v, 5) for k, v in scores.items()}
                ctx.log.info(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                          scores.items()))
                model.train()
            ctx.metrics(**record)
            trackers.log(record)
            update(done, info=f"loss {loss_sum:.3f}")
            if done % cfg.ckpt_every == 0 or done == cfg.max_steps:
                checkpoint.save(ckpt_root, done, model, optimizers, keep_last=cfg.keep_last,
                                extra={"guard": guard.state()})
            if logging_step:  # evaluation and checkpoint time do not count against throughput
                last_logged, t_last = done, time.perf_counter()
    return {"steps": cfg.max_steps, "first_loss": first_loss, "final_loss": last_loss,
            "val_loss": val_loss, "tokens_seen": cfg.max_steps * tokens_per_step,
            "skipped_updates": guard.skipped, "peak_tflops": round(peak / 1e12, 3),
            "world_size": world}


class UpdateGuard:
    """Decides whether an update is safe to apply: a NaN/inf or a loss spike is skipped (and
    counted) instead of poisoning the weights and the optimizer state."""

    def __init__(self, skip_nonfinite: bool, spike_factor: float, momentum: float = 0.9,
                 mean: float | None = None, skipped: int = 0):
        self.skip_nonfinite = skip_nonfinite
        self.spike_factor = spike_factor
        self.momentum = momentum
        self.mean = mean
        self.skipped = skipped

    def state(self) -> dict:
        """What a checkpoint keeps so a resumed run makes the same decisions."""
        return {"mean": self.mean, "skipped": self.skipped}

    def check(self, loss: float, grad_norm: float) -> str | None:
        """The reason to skip this update, or None to apply it."""
        reason = None
        if self.skip_nonfinite and not (math.isfinite(loss) and math.isfinite(grad_norm)):
            reason = "non-finite loss or gradient"
        elif self.spike_factor and self.mean is not None and loss > self.spike_factor * self.mean:
            reason = f"loss spike: {loss:.3f} > {self.spike_factor} x mean {self.mean:.3f}"
        if reason:
            self.skipped += 1
            return reason
        m = self.momentum
        self.mean = loss if self.mean is None else m * self.mean + (1 - m) * loss
        return None


def _mean_across_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """An objective's metrics over the whole global batch, not just this rank's share."""
    if not metrics or distributed.info().world_size == 1:
        return metrics
    values = distributed.mean_across_ranks(torch.tensor(list(metrics.values()), device=device,
                                                        dtype=torch.float64))
    return dict(zip(metrics, values.tolist(), strict=True))


def _clip(model: torch.nn.Module, max_norm: float) -> float:
    """Global gradient norm (over all ranks' shards), clipped to max_norm when it is > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.item()
