"""Muon: momentum SGD whose update is orthogonalised by a Newton-Schulz iteration.

Muon (Keller Jordan, 2024) is for the hidden weight matrices of a network. Replacing the update
by its nearest semi-orthogonal matrix makes every direction in it move at the same rate, so rare
but useful directions are not drowned out by the dominant ones. Embeddings, the output head,
norms and biases are trained with AdamW instead; `split_for_muon` does that routing.

A 3-D parameter [E, out, in] (stacked MoE experts) is treated as E separate matrices.
Under FSDP2 the grads are DTensors sharded on dim 0, while Newton-Schulz needs whole matrices:
each update is gathered, orthogonalised, and this rank's shard of the result is kept; the
momentum buffer stays a DTensor so distributed checkpoints reshard it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed support: only plain tensors exist
    DTensor = None

NS_COEFFS = (3.4445, -4.7750, 2.0315)
ADJUST_LR = ("match_adamw", "spectral")
EXCLUDED_NAMES = ("tok_emb", "lm_head")


def newton_schulz(G: Tensor, steps: int) -> Tensor:
    """Approximately orthogonalise G (or each matrix of a batch [..., rows, cols]).

    Returns roughly U V^T of G's SVD. The quintic's coefficients trade exactness for speed: the
    singular values land in about [0.7, 1.2] rather than on 1, which costs nothing in training.
    """
    # Rule: bfloat16 on CUDA, where it is fast and stable enough; float32 on every other device.
    dtype = torch.bfloat16 if G.device.type == "cuda" else torch.float32
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    tall = G.size(-2) > G.size(-1)
    if tall:  # work on the wide side so the Gram matrix X X^T is the small one
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


def split_for_muon(named_params: Iterable[tuple[str, Tensor]]) -> tuple[list, list]:
    """Route trainable parameters: (hidden matrices for Muon, everything else for AdamW).

    Embeddings and the output head go to AdamW although they are matrices, as the Muon authors
    recommend: their rows are looked up or scored one token at a time, not mixed as a whole.
    """
    muon, other = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        hidden = p.ndim in (2, 3) and not any(key in name for key in EXCLUDED_NAMES)
        (muon if hidden else other).append(p)
    return muon, other


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weight matrices and 3-D stacks of them (other shapes belong to AdamW).

    adjust_lr="match_adamw" scales the step by 0.2 * sqrt(max(rows, cols)), which gives the
    update the RMS of a typical AdamW update (Moonshot, "Muon is scalable"), so AdamW's lr and
    weight decay carry over. adjust_lr="spectral" scales by sqrt(max(1, rows / cols)) (Jordan).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0,
                 adjust_lr: str = "match_adamw") -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay, adjust_lr=adjust_lr)
        _check_hyperparams(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Validate before adding, so a wrong shape or setting fails at construction."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if p.ndim not in (2, 3):
                raise ValueError(f"Muon takes 2-D or 3-D parameters, got shape "
                                 f"{tuple(p.shape)}; route it to AdamW (see split_for_muon)")
        _check_hyperparams({**self.defaults, **param_group})
        super().add_param_group({**param_group, "params": params})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict) -> None:
        """One Muon step for p, on this rank's shard when p is a DTensor."""
        grad = p.grad
        state = self.state[p]
        if "momentum_buffer" not in state:
            # Same kind as the grad (a DTensor under FSDP2), so a distributed checkpoint
            # stores it with its global shape and it reshards like the weights.
            state["momentum_buffer"] = torch.zeros_like(grad)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(grad)
        update = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        sharded = DTensor is not None and isinstance(update, DTensor)
        if sharded:
            update = _orthogonalize_sharded(update, group["ns_steps"])
        else:
            update = newton_schulz(update, group["ns_steps"])
        lr = group["lr"]
        weight = p.to_local() if sharded else p
        weight.mul_(1 - lr * group["weight_decay"])
        weight.add_(update, alpha=-lr * _lr_scale(p.shape, group["adjust_lr"]))


def _orthogonalize_sharded(update: Tensor, steps: int) -> Tensor:
    """Gather the full update, orthogonalise it, and return this rank's shard of the result.

    Every rank computes the same full result, so the shard is cut locally (src_data_rank=None)
    with DTensor's own chunking rules rather than scattered from rank 0.
    """
    full = newton_schulz(update.full_tensor(), steps)
    return distribute_tensor(full, update.device_mesh, update.placements,
                             src_data_rank=None).to_local()


def _lr_scale(shape: torch.Size, adjust_lr: str) -> float:
    """Step-size multiplier for a matrix of this shape (the last two dims of a 3-D stack)."""
    rows, cols = shape[-2], shape[-1]
    if adjust_lr == "match_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


def _check_hyperparams(group: dict) -> None:
    """Raise a ValueError that names the first invalid setting."""
    if not group["lr"] > 0:
        raise ValueError(f"Muon: lr must be > 0, got {group['lr']}")
    if not 0 <= group["momentum"] < 1:
        raise ValueError(f"Muon: momentum must be in [0, 1), got {group['momentum']}")
    if not (isinstance(group["ns_steps"], int) and group["ns_steps"] >= 1):
        raise ValueError(f"Muon: ns_steps must be an integer >= 1, got {group['ns_steps']}")
    if not group["weight_decay"] >= 0:
        raise ValueError(f"Muon: weight_decay must be >= 0, got {group['weight_decay']}")
    if group["adjust_lr"] not in ADJUST_LR:
        raise ValueError(f"Muon: adjust_lr must be one of {ADJUST_LR}, got {group['adjust_lr']!r}")
