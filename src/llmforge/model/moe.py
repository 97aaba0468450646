"""Mixture-of-experts SwiGLU MLP: dropless token-choice top-k routing (Mixtral style).

Each token is sent to its top-k experts by a linear router; every expert is a SwiGLU MLP,
`down(silu(gate(x)) * up(x))`, whose weights are one slice of a stacked 3-D parameter in
nn.Linear's [out, in] layout, so `w_gate[e]` is exactly a dense MLP's `w_gate.weight`.

Nothing is dropped (no capacity factor): the (token, expert) assignments are sorted by expert,
each expert runs one matmul chain over the rows gathered for it, and the weighted results are
scatter-added back. Expert shapes depend on the routing, so this needs one device-to-host sync
per forward (the per-expert counts) and is not a good fit for torch.compile's static graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MoE(nn.Module):
    """Top-k routed SwiGLU experts; `forward` returns (output, load-balancing loss).

    Combine weights are the top-k router probabilities renormalised to sum to 1 per token (the
    Mixtral convention, equivalent to a softmax over the chosen experts' logits). The output scale
    then does not depend on how confident the router is, but with top_k == 1 every combine weight
    is exactly 1 and the router is trained by the auxiliary loss alone (Switch Transformer instead
    scales by the raw probability); use top_k >= 2 if the router should learn from the main loss.
    """

    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"MoE dim must be > 0, got {dim}")
        if hidden <= 0:
            raise ValueError(f"MoE hidden must be > 0, got {hidden}")
        if n_experts < 2:
            raise ValueError(f"MoE n_experts must be >= 2, got {n_experts}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"MoE top_k must be in [1, n_experts={n_experts}], got {top_k}")
        self.dim, self.hidden, self.n_experts, self.top_k = dim, hidden, n_experts, top_k
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w_up = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w_down = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.init_weights(std=0.02, out_std=0.02)  # usable standalone; models re-init with depth

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """N(0, std) for the router and the input projections, N(0, out_std) for w_down (the
        residual output projection, which callers shrink with depth)."""
        for p in (self.router.weight, self.w_gate, self.w_up):
            nn.init.normal_(p, std=std)
        nn.init.normal_(self.w_down, std=out_std)

    def active_param_count(self) -> int:
        """Parameters one token touches: the router plus top_k experts (for FLOPs/MFU)."""
        per_expert = self.w_gate[0].numel() + self.w_up[0].numel() + self.w_down[0].numel()
        return self.router.weight.numel() + self.top_k * per_expert

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Router probabilities [N, E] plus chosen experts and combine weights, both [N, top_k].

        Computed in (at least) fp32 with autocast off: near-tied bf16 logits would flip choices.
        """
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), self.router.weight.to(dtype))
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        return probs, top_i, top_p / top_p.sum(dim=-1, keepdim=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[B, T, dim] -> (y [B, T, dim], aux_loss fp32 scalar).

        y has the dtype the expert matmuls produce (bf16 under bf16 autocast, like the dense
        MLP); the weighted sum over a token's experts is accumulated in fp32.
        """
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n_tokens, k = x.size(0), self.top_k
        probs, top_i, weights = self.route(x)

        # Sort the N*k (token, slot) assignments by expert; stable so tokens keep their order.
        flat_expert = top_i.reshape(-1)
        order = flat_expert.argsort(stable=True)
        token_of = order // k
        weight_of = weights.reshape(-1)[order]
        counts = torch.bincount(flat_expert, minlength=self.n_experts)

        acc = torch.zeros(n_tokens, shape[-1], device=x.device, dtype=probs.dtype)
        out_dtype = x.dtype
        # unbind (not indexing) so backward stacks the expert grads once instead of E full copies.
        expert_w = (self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0))
        start = 0
        for w_gate, w_up, w_down, count in zip(*expert_w, counts.tolist(), strict=True):
            if count == 0:
                continue
            end = start + count
            rows = token_of[start:end]
            xe = x.index_select(0, rows)
            # F.linear so autocast casts activations and weights exactly as for nn.Linear.
            ye = F.linear(F.silu(F.linear(xe, w_gate)) * F.linear(xe, w_up), w_down)
            out_dtype = ye.dtype
            acc.index_add_(0, rows, ye.to(acc.dtype) * weight_of[start:end, None])
            start = end

        # Switch/Mixtral balance loss: E * sum_i f_i * P_i, f_i the share of assignments routed to
        # expert i (a count, no gradient) and P_i its mean router probability. 1.0 when f is
        # uniform; up to E when everything goes to one confident expert.
        # max(., 1): an empty batch gives aux 0 instead of NaN.
        f = counts.to(torch.float32) / max(n_tokens * k, 1)
        p = probs.float().sum(dim=0) / max(n_tokens, 1)
        aux = self.n_experts * (f * p).sum()
        return acc.to(out_dtype).reshape(shape), aux
