"""Llama-style decoder-only transformer in one file.

Layout and numerics follow Hugging Face Llama (RMSNorm in fp32, rotate_half RoPE, GQA, SwiGLU) so
weights move between the two by renaming only, with no permutation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from llmforge.model.config import ModelConfig
from llmforge.model.loss import linear_cross_entropy
from llmforge.model.moe import MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 even under bf16: the mean of squares loses too much precision otherwise.
        in_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * x.to(in_dtype)
        # Under autocast every consumer (q, k, v; gate, up) would cast y to bf16 on its own:
        # cast once here instead. The values are the same either way.
        device = x.device.type
        return y.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else y


def rope_frequencies(cfg: ModelConfig) -> Tensor:
    """Rotation speed of each pair of dimensions, after the config's context-extension scaling."""
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    if cfg.rope_scaling == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
        # Wavelengths longer than original_len / low_freq_factor slow down by the factor, shorter
        # than original_len / high_freq_factor keep their speed; in between, a linear blend in
        # original_len / wavelength.
        periods_in_context = cfg.rope_original_max_len * inv_freq / (2 * math.pi)
        lo, hi = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        keep = ((periods_in_context - lo) / (hi - lo)).clamp(0.0, 1.0)
        inv_freq = inv_freq * ((1 - keep) / cfg.rope_factor + keep)
    return inv_freq.float()


def rope_tables(cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """cos/sin of shape [max_seq_len, head_dim], each frequency repeated for both halves (HF)."""
    inv_freq = rope_frequencies(cfg)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate [B, H, T, D] by position; pairs are (i, i + D/2), the non-interleaved convention."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Preallocated keys/values for every layer, so decoding appends in place instead of concat."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # tokens already stored; advanced by Transformer.forward after all layers

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write new k/v at the current length and return everything cached for this layer."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None,
        layer: int,
        mask: dict,
    ) -> Tensor:
        """`mask` is SDPA's masking arguments for these positions (`causal_mask_args`)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)  # cache is in model dtype; q may be autocast bf16
        gqa = self.n_kv_heads < self.n_heads
        y = F.scaled_dot_product_attention(
            q, k, v, **mask, enable_gqa=gqa
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def causal_mask_args(
    t_new: int, start: int, device: torch.device, doc_ids: Tensor | None = None
) -> dict:
    """SDPA's is_causal aligns the mask top-left, which is only right when nothing is cached.

    With `doc_ids` ([B, T], equal within a document) a token attends only to earlier tokens of
    its own document, so packed documents do not see each other.
    """
    if doc_ids is not None:
        if start:
            raise ValueError("document masking applies to whole sequences, not cached decoding")
        causal = torch.ones(t_new, t_new, dtype=torch.bool, device=device).tril()
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
        return {"attn_mask": (same_doc & causal)[:, None]}
    if start == 0:
        return {"is_causal": t_new > 1}
    if t_new == 1:
        return {}  # one new token may see every cached position
    mask = torch.ones(t_new, start + t_new, dtype=torch.bool, device=device).tril(diagonal=start)
    return {"attn_mask": mask}


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w_gate = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.w_down = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.n_experts:
            self.mlp = MoE(cfg.dim, cfg.hidden, cfg.n_experts, cfg.moe_top_k)
        else:
            self.mlp = MLP(cfg)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None,
        layer: int,
        mask: dict,
    ) -> tuple[Tensor, Tensor | None]:
        """The new residual stream and, for a mixture-of-experts block, its load-balancing loss."""
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, mask)
        if isinstance(self.mlp, MoE):
            y, aux = self.mlp(self.mlp_norm(x))
            return x + y, aux
        return x + self.mlp(self.mlp_norm(x)), None


class Transformer(nn.Module):
    # Rows of lm-head + cross-entropy computed at once (model/loss.py); bounds logits memory.
    loss_chunk_rows: int = 1024
    # Recompute each block's activations in the backward pass instead of storing them: trades
    # about a third more compute for memory that no longer grows with depth. Set by the trainer.
    activation_checkpointing: bool = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied models have no lm_head module, so state_dict holds the shared matrix exactly once.
        self.lm_head = None
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @property
    def output_weight(self) -> Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std); residual output projections shrunk by 1/sqrt(2*n_layers) (GPT-2) so the
        residual stream variance does not grow with depth. Norms start at 1, biases at 0."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if ".mlp." in name and self.cfg.n_experts:
                continue  # experts initialise themselves below
            if name.endswith(("attn.wo.weight", "mlp.w_down.weight")):
                nn.init.normal_(p, std=out_std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                nn.init.normal_(p, std=std)
            else:
                nn.init.ones_(p)
        for module in self.modules():
            if isinstance(module, MoE):
                module.init_weights(std, out_std)

    def num_params(self, include_embedding: bool = True) -> int:
        """Unique parameter count (a tied matrix counts once)."""
        n = sum(p.numel() for p in self.parameters())
        return n if include_embedding else n - self.tok_emb.weight.numel()

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache max_len={max_len} exceeds max_seq_len={self.cfg.max_seq_len}")
        w = self.tok_emb.weight
        c = self.cfg
        shape = (c.n_layers, batch_size, c.n_kv_heads, max_len, c.head_dim)
        return KVCache(*shape, device=w.device, dtype=w.dtype)

    def hidden_states(
        self, idx: Tensor, cos: Tensor, sin: Tensor, cache, mask: dict
    ) -> tuple[Tensor, list[Tensor]]:
        """Final-norm hidden states of idx and any mixture-of-experts balancing losses.

        `cos`/`sin` are the RoPE rows of idx's positions ([T, D], or [B, 1, T, D] when each
        row sits at its own positions); `cache` is anything with `update(layer, k, v)`
        returning the keys and values to attend to, `mask` SDPA's masking arguments for them.
        """
        x = self.tok_emb(idx)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        aux_losses = []
        for i, layer in enumerate(self.layers):
            if recompute:
                x, aux = checkpoint(layer, x, cos, sin, cache, i, mask, use_reentrant=False)
            else:
                x, aux = layer(x, cos, sin, cache, i, mask)
            if aux is not None:
                aux_losses.append(aux)
        return self.norm(x), aux_losses

    def logits(self, x: Tensor) -> Tensor:
        """float32 next-token logits of final hidden states."""
        return F.linear(x, self.output_weight).float()

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        cache: KVCache | None = None,
        reduction: str = "mean",
        doc_ids: Tensor | None = None,
    ) -> Tensor:
        """Loss (targets given) or float32 logits [B, T, V] for the tokens in idx.

        With a cache, idx continues the cached sequence and only its logits are returned. With
        `doc_ids` attention stays inside each document of a packed sequence. In training mode
        the loss also carries the z-loss and mixture-of-experts balancing terms when configured;
        in eval mode it is the plain cross-entropy.
        """
        _, T = idx.shape
        start = 0 if cache is None else cache.length
        limit = self.cfg.max_seq_len if cache is None else cache.max_len
        if start + T > limit:
            raise ValueError(f"sequence length {start + T} exceeds the limit of {limit} positions")
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        mask = causal_mask_args(T, start, idx.device, doc_ids)  # once, shared by every layer
        x, aux_losses = self.hidden_states(idx, cos, sin, cache, mask)
        if cache is not None:
            cache.length += T
        if targets is None:
            return self.logits(x)
        loss = linear_cross_entropy(
            x, self.output_weight, targets, reduction=reduction, chunk_rows=self.loss_chunk_rows,
            z_loss=self.cfg.z_loss if self.training else 0.0,
        )
        if aux_losses and self.training and reduction == "mean":
            loss = loss + self.cfg.moe_aux_coef * torch.stack(aux_losses).mean()
        return loss
