"""Cross-entropy of a linear head without materialising the full [rows, vocab] logits.

On small models the lm-head and its loss dominate the step. Computing them chunk by chunk and
taking the gradients in the same pass (the idea behind Liger's fused linear cross-entropy and
"cut cross-entropy") bounds memory to one chunk of logits and skips autograd's second pass
over them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, h: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int, z_loss: float
    ) -> Tensor:
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        # The gradient matmuls run in autocast's dtype too (bf16: about twice fp32's speed);
        # softmax, logsumexp and the weight-gradient sum stay in fp32.
        device = h.device.type
        mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        total = h.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(h) if needs_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        for start in range(0, h.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            h_chunk, t_chunk = h[rows], targets[rows]
            logits = F.linear(h_chunk, weight).float()
            valid = t_chunk != IGNORE_INDEX
            safe = t_chunk.clamp_min(0)  # ignored rows gather a placeholder, then weigh zero
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            # One pass of exp serves both the log-sum-exp and the softmax of the gradient.
            peak = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(peak).exp_()
            sums = exps.sum(dim=-1)
            lse = peak.squeeze(1) + sums.log()
            total += ((lse - picked + z_loss * lse.square()) * valid).sum()
            if needs_grad:
                scale = 1 / sums  # softmax = exps * scale
                if z_loss:  # d(z * lse^2)/d logits = 2 z lse softmax
                    scale = scale * (1 + 2 * z_loss * lse)
                grad_logits = exps.mul_((scale * valid)[:, None])
                grad_logits[torch.arange(len(safe)), safe] -= valid.to(grad_logits.dtype)
                grad_logits = grad_logits.to(mm_dtype or grad_logits.dtype)
                grad_h[rows] = grad_logits @ weight.to(grad_logits.dtype)
                grad_w += grad_logits.T @ h_chunk.to(grad_logits.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_total, (grad_w * grad_total).to(ctx.weight_dtype), None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, *, reduction: str = "mean",
                         chunk_rows: int = 1024, z_loss: float = 0.0) -> Tensor:
    """cross_entropy(h @ weight.T, targets) over rows where target != -100, chunk by chunk,
    plus z_loss * logsumexp(logits)^2 per row when z_loss > 0."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    total = _LinearCrossEntropy.apply(h, weight, targets, chunk_rows, z_loss)
    return total if reduction == "sum" else total / (targets != IGNORE_INDEX).sum()
