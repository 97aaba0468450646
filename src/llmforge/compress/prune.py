"""Pruning: a sparser or smaller model from any base, then a short recovery fine-tune.

Four methods:
- `magnitude` (unstructured): in each weight matrix of the blocks, the `sparsity` fraction of
  entries with the smallest |w| become zero. Per matrix, not one global threshold: the blocks'
  matrices differ in scale (the residual outputs wo and w_down start 1/sqrt(2 n_layers) smaller,
  keys and values differ from queries), so a global threshold empties some matrices while barely
  touching others; a uniform per-matrix sparsity is the usual baseline for LLMs (SparseGPT,
  Wanda). The layout stays dense: the model is as large on disk, with zeros in it.
- `heads` (structured): whole key/value groups (a KV head with the query heads that share it)
  leave every layer, so the shapes stay a valid GQA config with the same head width.
- `mlp` (structured): SwiGLU hidden channels (a row of w_gate and w_up, a column of w_down)
  leave every layer.
- `layers` (structured): whole blocks leave, the least influential by ShortGPT's Block
  Influence, 1 - cos(block input, block output) over calibration tokens (Men et al. 2024).

Heads and channels are ranked within each layer by first-order Taylor importance on calibration
text: the sum over a unit's weights of |w * dL/dw|, accumulated over calibration batches
(LLM-Pruner's element-wise score, Ma et al. 2023). It estimates how much the loss moves when
the weights go to zero, so it sees what the rest of the network does with a unit's output, where
an activation norm sees only its size; a unit that writes nothing (zero output weights) scores
exactly zero. Every layer keeps the same number, since ModelConfig is uniform.

Structured methods build a new, smaller Transformer from the sliced weights; masks (magnitude)
hold pruned weights at zero while the model trains.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn

from llmforge.model.transformer import Transformer
from llmforge.train.device import autocast
from llmforge.train.loop import Objective, TrainConfig, lm_objective

METHODS = ("magnitude", "heads", "mlp", "layers")


@dataclass
class RecoveryConfig(TrainConfig):
    """The recovery fine-tune's TrainConfig, except that max_steps may be 0: no recovery."""

    def __post_init__(self) -> None:
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0 (0 = no recovery), got {self.max_steps}")
        checked = copy.copy(self)  # every other check exactly as TrainConfig makes it
        checked.max_steps = max(1, self.max_steps)
        TrainConfig.__post_init__(checked)


def _recovery_defaults() -> RecoveryConfig:
    return RecoveryConfig(seq_len=256, batch_size=8, max_steps=100, lr=1e-4, warmup_steps=10,
                          weight_decay=0.0, eval_every=50, eval_batches=8, ckpt_every=100)


@dataclass
class PruneConfig:
    base: str = ""  # "" = the sft stage's model; else any model `llmforge chat` opens
    # mlp (default): a genuinely smaller model, cut in the finest structured units where a
    # small Llama keeps most of its block weights (SwiGLU); see the module docstring.
    method: str = "mlp"
    sparsity: float = 0.5  # magnitude: fraction of each block matrix's weights set to zero
    # heads: fraction of KV groups kept per layer; mlp: fraction of hidden channels kept
    # (both rounded to the nearest whole unit, the same count in every layer)
    keep_fraction: float = 0.75
    n_layers_removed: int = 1  # layers: blocks removed
    data: str = ""  # a text file: recovery trains on its head, held-out loss on its tail
    val_fraction: float = 0.1  # the tail of data's tokens held out (never trained on)
    calibration: str = ""  # text file scored for importance; "" = data's training part
    calibration_rows: int = 32  # windows of recovery.seq_len tokens
    recovery: RecoveryConfig = field(default_factory=_recovery_defaults)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if self.n_layers_removed < 0:
            raise ValueError(f"n_layers_removed must be >= 0, got {self.n_layers_removed}")
        if not 0 < self.val_fraction < 1 or self.calibration_rows < 1:
            raise ValueError(f"need 0 < val_fraction < 1 and calibration_rows >= 1, got "
                             f"{self.val_fraction} and {self.calibration_rows}")


# ---------------------------------------------------------------------------------------------
# Text


def read_tokens(path: str | Path, tokenizer: Tokenizer) -> np.ndarray:
    """A text file as one token stream (encoded a line at a time, in parallel)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prune: no text file {path}")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    encoded = tokenizer.encode_batch(lines, add_special_tokens=False)
    return np.fromiter((i for e in encoded for i in e.ids), dtype=np.int64)


def split_tokens(tokens: np.ndarray, val_fraction: float,
                 seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(train head, held-out tail): a contiguous tail, so no window straddles the two."""
    n_val = int(len(tokens) * val_fraction)
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
    if min(len(train), len(val)) < seq_len + 1:
        raise ValueError(f"prune: {len(train):,} train and {len(val):,} held-out tokens; each "
                         f"needs a window of seq_len + 1 = {seq_len + 1} (more data, or a "
                         f"shorter recovery.seq_len)")
    return train, val


def calibration_batches(tokens: np.ndarray, seq_len: int, rows: int, batch_size: int,
                        seed: int) -> list[tuple[Tensor, Tensor]]:
    """`rows` windows at seeded random offsets, as (inputs, targets) batches."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"prune: {len(tokens):,} calibration tokens; a window needs seq_len + 1"
                         f" = {seq_len + 1}")
    starts = np.random.default_rng([seed, 0x5EED]).integers(0, len(tokens) - seq_len, rows)
    windows = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]))
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]


# ---------------------------------------------------------------------------------------------
# Magnitude


class Masks:
    """Which weights pruning zeroed, held at zero while the model trains: their gradients are
    zeroed as they are computed (so the optimizer's moments stay zero and AdamW never moves
    them), and the weights are masked again before every forward and when training ends, which
    holds for any optimizer (Muon's orthogonalised update touches every entry)."""

    def __init__(self, masks: dict[str, tuple[nn.Parameter, Tensor]]):
        self.masks = masks

    @torch.no_grad()
    def apply(self) -> None:
        for p, mask in self.masks.values():
            p.mul_(mask)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        handles = [p.register_hook(lambda g, m=mask: g * m) for p, mask in self.masks.values()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.apply()

    def objective(self, inner: Objective = lm_objective) -> Objective:
        def masked(forward: nn.Module, batch: tuple[Tensor, ...]):
            self.apply()
            return inner(forward, batch)

        return masked

    def zeros(self) -> tuple[int, int]:
        """(zero weights, weights) over the masked matrices, counted in the weights themselves."""
        return (sum(int((p == 0).sum()) for p, _ in self.masks.values()),
                sum(p.numel() for p, _ in self.masks.values()))


def block_matrices(model: Transformer) -> list[tuple[str, nn.Parameter]]:
    """The blocks' weight matrices (attention and MLP; a mixture's experts one matrix each,
    its router left alone): what magnitude pruning thins."""
    return [(n, p) for n, p in model.named_parameters()
            if n.startswith("layers.") and p.dim() >= 2 and ".router." not in n]


@torch.no_grad()
def magnitude_prune(model: Transformer, sparsity: float) -> Masks:
    """Zero the round(sparsity * n) smallest-|w| entries of every block matrix of n entries
    (ties broken by position); the masks that keep them zero."""
    masks = {}
    for name, p in block_matrices(model):
        rows = p.reshape(p.shape[0] if p.dim() == 3 else 1, -1)  # an expert at a time
        k = round(sparsity * rows.shape[1])
        mask = torch.ones_like(rows)
        if k:
            mask.scatter_(1, rows.abs().topk(k, dim=1, largest=False, sorted=False).indices, 0.0)
        mask = mask.view_as(p)
        p.mul_(mask)
        masks[name] = (p, mask)
    return Masks(masks)


# ---------------------------------------------------------------------------------------------
# Importance


def taylor_scores(model: Transformer, batches: list[tuple[Tensor, Tensor]], names: list[str],
                  dtype: str = "fp32") -> dict[str, Tensor]:
    """|w * dL/dw| per weight of each named parameter, summed over the calibration batches."""
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    grads_were = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in names)
    scores = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    model.eval()
    try:
        for x, y in batches:
            with autocast(device, dtype):
                loss = model(x.to(device), y.to(device))
            loss.backward()
            for n in names:
                p = params[n]
                if p.grad is not None:  # None: the loss does not reach it (a unit left dead)
                    scores[n] += (p.detach().float() * p.grad.float()).abs()
                p.grad = None
    finally:
        for n, p in params.items():
            p.requires_grad_(grads_were[n])
    return scores


def head_importance(model: Transformer, batches, dtype: str = "fp32") -> Tensor:
    """[n_layers, n_kv_heads]: each KV group's Taylor importance (its q, k, v rows and biases
    and its columns of wo)."""
    cfg = model.cfg
    hd, n_kv = cfg.head_dim, cfg.n_kv_heads
    parts = ("wq.weight", "wk.weight", "wv.weight", "wo.weight")
    parts += ("wq.bias", "wk.bias", "wv.bias") if cfg.attn_bias else ()
    names = [f"layers.{i}.attn.{p}" for i in range(cfg.n_layers) for p in parts]
    s = taylor_scores(model, batches, names, dtype)
    out = []
    for i in range(cfg.n_layers):
        def rows(name: str, i=i) -> Tensor:  # a [out] score per output row
            t = s[f"layers.{i}.attn.{name}"]
            return t.sum(1) if t.dim() == 2 else t

        score = rows("wq.weight") + (rows("wq.bias") if cfg.attn_bias else 0)
        score = score.view(n_kv, -1).sum(1)  # a group's query heads are consecutive
        for kv in ("wk", "wv"):
            kv_rows = rows(f"{kv}.weight") + (rows(f"{kv}.bias") if cfg.attn_bias else 0)
            score = score + kv_rows.view(n_kv, hd).sum(1)
        score = score + s[f"layers.{i}.attn.wo.weight"].sum(0).view(n_kv, -1).sum(1)
        out.append(score)
    return torch.stack(out)


def channel_importance(model: Transformer, batches, dtype: str = "fp32") -> Tensor:
    """[n_layers, hidden]: each SwiGLU channel's Taylor importance (its rows of w_gate and w_up
    and its column of w_down)."""
    cfg = model.cfg
    names = [f"layers.{i}.mlp.{w}.weight" for i in range(cfg.n_layers)
             for w in ("w_gate", "w_up", "w_down")]
    s = taylor_scores(model, batches, names, dtype)
    return torch.stack([s[f"layers.{i}.mlp.w_gate.weight"].sum(1)
                        + s[f"layers.{i}.mlp.w_up.weight"].sum(1)
                        + s[f"layers.{i}.mlp.w_down.weight"].sum(0) for i in range(cfg.n_layers)])


@torch.no_grad()
def block_influence(model: Transformer, batches, dtype: str = "fp32") -> Tensor:
    """[n_layers]: ShortGPT's Block Influence, 1 - mean over calibration tokens of cos(the
    block's input hidden state, its output). A block that changes little scores near 0."""
    device = next(model.parameters()).device
    sums = torch.zeros(len(model.layers), dtype=torch.float64)
    count = 0

    def hook(i: int):
        def record(module, args, output):
            cos = F.cosine_similarity(args[0].float(), output[0].float(), dim=-1)
            sums[i] += cos.sum().double().cpu()
        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(model.layers)]
    model.eval()
    try:
        for x, _ in batches:
            with autocast(device, dtype):
                model(x.to(device))
            count += x.numel()
    finally:
        for h in handles:
            h.remove()
    return (1 - sums / count).float()


# ---------------------------------------------------------------------------------------------
# Structured removal


def _rebuild(model: Transformer, cfg, state: dict[str, Tensor]) -> Transformer:
    """A Transformer of `cfg` holding `state`, on the model's device and in its dtype."""
    w = model.tok_emb.weight
    with torch.device(w.device):
        new = Transformer(cfg)
    new.to(w.dtype).load_state_dict(state)
    return new.train(model.training)


def keep_top(scores: Tensor, n_keep: int) -> Tensor:
    """Indices of the n_keep highest scores of each row, in their original order."""
    return scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values


@torch.no_grad()
def remove_heads(model: Transformer, keep: Tensor) -> Transformer:
    """The model with only the KV groups `keep[layer]` (the same count in every layer), each
    with its query heads; the head width stays, so dim / n_heads may not equal it any more."""
    cfg = model.cfg
    hd, per_group = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    n_keep = keep.shape[1]
    new_cfg = dataclasses.replace(
        cfg, n_heads=n_keep * per_group, n_kv_heads=n_keep,
        head_dim_override=0 if n_keep * per_group * hd == cfg.dim else hd)
    state = dict(model.state_dict())
    for i, groups in enumerate(keep.tolist()):
        q = torch.cat([torch.arange(g * per_group * hd, (g + 1) * per_group * hd)
                       for g in groups])
        kv = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in groups])
        pre = f"layers.{i}.attn."
        for name, idx, dim in (("wq.weight", q, 0), ("wq.bias", q, 0), ("wk.weight", kv, 0),
                               ("wk.bias", kv, 0), ("wv.weight", kv, 0), ("wv.bias", kv, 0),
                               ("wo.weight", q, 1)):
            if pre + name in state:
                t = state[pre + name]
                state[pre + name] = t.index_select(dim, idx.to(t.device))
    return _rebuild(model, new_cfg, state)


@torch.no_grad()
def remove_channels(model: Transformer, keep: Tensor) -> Transformer:
    """The model (dense MLPs) with only the SwiGLU hidden channels `keep[layer]` (the same
    count in each)."""
    cfg = model.cfg
    new_cfg = cfg if keep.shape[1] == cfg.hidden else dataclasses.replace(
        cfg, ffn_hidden=keep.shape[1])
    state = dict(model.state_dict())
    for i, channels in enumerate(keep):
        pre = f"layers.{i}.mlp."
        idx = channels.to(model.tok_emb.weight.device)
        for name, dim in (("w_gate.weight", 0), ("w_up.weight", 0), ("w_down.weight", 1)):
            state[pre + name] = state[pre + name].index_select(dim, idx)
    return _rebuild(model, new_cfg, state)


@torch.no_grad()
def remove_layers(model: Transformer, keep: list[int]) -> Transformer:
    """The model with only the blocks `keep` (in order), renumbered."""
    new_cfg = dataclasses.replace(model.cfg, n_layers=len(keep))
    renumber = {old: new for new, old in enumerate(keep)}
    state = {}
    for name, t in model.state_dict().items():
        if not name.startswith("layers."):
            state[name] = t
            continue
        _, index, rest = name.split(".", 2)
        if int(index) in renumber:
            state[f"layers.{renumber[int(index)]}.{rest}"] = t
    return _rebuild(model, new_cfg, state)


# ---------------------------------------------------------------------------------------------
# The method


@dataclass
class Pruned:
    model: Transformer  # the pruned model (a new, smaller one for structured methods)
    report: dict  # what was removed, and each unit's importance where it is short enough
    masks: Masks | None = None  # magnitude: the zeros to hold through recovery


def kept_count(fraction: float, total: int, unit: str) -> int:
    """round(fraction * total) units (halves up), refused when that is none."""
    n = math.floor(fraction * total + 0.5)
    if n < 1:
        raise ValueError(f"prune: keep_fraction={fraction} keeps 0 of {total} {unit}; raise it "
                         f"to at least {0.5 / total:.3g}")
    return n


def prune(model: Transformer, cfg: PruneConfig, calibration: list[tuple[Tensor, Tensor]],
          dtype: str = "fp32") -> Pruned:
    """Prune `model` as cfg says, scoring importance on the calibration batches. Magnitude
    prunes in place; structured methods return a new model and leave `model` as it was."""
    mc = model.cfg
    if cfg.method == "magnitude":
        masks = magnitude_prune(model, cfg.sparsity)
        zeros, total = masks.zeros()
        return Pruned(model, {"zero_weights": zeros, "of_weights": total,
                              "matrices": len(masks.masks)}, masks)
    if cfg.method == "heads":
        per_group = mc.n_heads // mc.n_kv_heads
        n_keep = kept_count(cfg.keep_fraction, mc.n_kv_heads,
                            f"KV groups (a key/value head with its {per_group} query heads)")
        scores = head_importance(model, calibration, dtype)
        keep = keep_top(scores, n_keep)
        removed = [sorted(set(range(mc.n_kv_heads)) - set(k)) for k in keep.tolist()]
        return Pruned(remove_heads(model, keep), {
            "kv_groups_kept": n_keep, "kv_groups": mc.n_kv_heads, "heads_per_group": per_group,
            "removed_groups": removed, "importance": _rounded(scores)})
    if cfg.method == "mlp":
        if mc.n_experts:
            raise ValueError("prune: method mlp needs dense SwiGLU MLPs; this model is a "
                             "mixture of experts")
        n_keep = kept_count(cfg.keep_fraction, mc.hidden, "MLP hidden channels")
        scores = channel_importance(model, calibration, dtype)
        return Pruned(remove_channels(model, keep_top(scores, n_keep)),
                      {"channels_kept": n_keep, "channels": mc.hidden})
    if cfg.n_layers_removed >= mc.n_layers:
        raise ValueError(f"prune: n_layers_removed={cfg.n_layers_removed} would remove all "
                         f"{mc.n_layers} layers; at most {mc.n_layers - 1}")
    influence = block_influence(model, calibration, dtype)
    keep = keep_top(influence, mc.n_layers - cfg.n_layers_removed).tolist()
    return Pruned(remove_layers(model, keep), {
        "removed_layers": sorted(set(range(mc.n_layers)) - set(keep)),
        "block_influence": _rounded(influence)})


def _rounded(t: Tensor) -> list:
    return np.round(t.double().cpu().numpy(), 6).tolist()
