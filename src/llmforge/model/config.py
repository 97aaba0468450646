"""Model hyperparameters: one flat dataclass so recipes (YAML) and config.json map onto it 1:1."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

ROPE_SCALINGS = ("", "linear", "llama3")


@dataclass
class ModelConfig:
    """Llama-style decoder shape; fields stay int/float/str/bool so loaders can type-check them."""

    vocab_size: int = 0  # 0 = take it from the tokenizer; the caller fills it in before building
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int = 0  # 0 = auto: ~8/3 * dim rounded up to a multiple of 64 (SwiGLU convention)
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    attn_bias: bool = False  # biases on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm on each head's q and k before RoPE (OLMo 2, Qwen3)
    # Training-only extra loss z_loss * logsumexp(logits)^2 (PaLM); keeps the softmax normaliser
    # near 1 so bf16 logits do not drift. 0 = off; 1e-4 is PaLM's value.
    z_loss: float = 0.0
    # RoPE scaling for contexts past the trained length: "" (none), "linear" (positions / factor)
    # or "llama3" (long wavelengths / factor, short ones kept, smooth between).
    rope_scaling: str = ""
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    # Mixture of experts: 0 = dense SwiGLU MLP; else this many experts of width `hidden`,
    # each token routed to moe_top_k of them, with a load-balancing loss weighted moe_aux_coef.
    n_experts: int = 0
    moe_top_k: int = 2
    moe_aux_coef: float = 0.01
    # Width of each attention head; 0 = dim / n_heads. Set where heads were removed (pruning)
    # or the source model says so (HF head_dim, GGUF attention.key_length).
    head_dim_override: int = 0

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads

    @property
    def hidden(self) -> int:
        """Resolved SwiGLU width; 8/3 keeps parameter count equal to a 4*dim GELU MLP."""
        if self.ffn_hidden > 0:
            return self.ffn_hidden
        return 64 * math.ceil(8 * self.dim / 3 / 64)

    def validate(self, *, require_vocab: bool = True) -> None:
        """Fail early with a message naming the field, instead of a shape error deep in a matmul.

        `require_vocab=False` lets a recipe be checked before the tokenizer has set vocab_size.
        """
        if self.vocab_size < 0 or (require_vocab and self.vocab_size == 0):
            raise ValueError(f"ModelConfig.vocab_size must be > 0, got {self.vocab_size}")
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.ffn_hidden < 0:
            raise ValueError(
                f"ModelConfig.ffn_hidden must be >= 0 (0 = auto), got {self.ffn_hidden}"
            )
        if self.head_dim_override < 0:
            raise ValueError(f"ModelConfig.head_dim_override must be >= 0 (0 = dim/n_heads), "
                             f"got {self.head_dim_override}")
        if self.dim % self.n_heads and not self.head_dim_override:
            raise ValueError(
                f"ModelConfig.dim={self.dim} must be divisible by n_heads={self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads} must be divisible by "
                f"n_kv_heads={self.n_kv_heads}"
            )
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"ModelConfig.rope_scaling must be one of "
                             f"{', '.join(map(repr, ROPE_SCALINGS))}, got {self.rope_scaling!r}")
        if self.rope_factor < 1 or self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError("ModelConfig needs rope_factor >= 1 and rope_high_freq_factor > "
                             "rope_low_freq_factor")
        if self.z_loss < 0 or self.moe_aux_coef < 0:
            raise ValueError("ModelConfig.z_loss and moe_aux_coef must be >= 0")
        if self.n_experts and not (self.n_experts >= 2 and 1 <= self.moe_top_k <= self.n_experts):
            raise ValueError(f"ModelConfig needs n_experts 0 (dense) or >= 2 with 1 <= moe_top_k "
                             f"<= n_experts, got n_experts={self.n_experts}, "
                             f"moe_top_k={self.moe_top_k}")
        if self.head_dim % 2:
            raise ValueError(
                f"ModelConfig.dim/n_heads (or head_dim_override)={self.head_dim} must be even for "
                f"rotary embeddings"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a plain dict, rejecting unknown keys so typos do not silently fall back."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**d)
