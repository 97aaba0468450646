"""Model hyperparameters: one flat dataclass so recipes (YAML) and config.json map onto it 1:1."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


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

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

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
        if self.dim % self.n_heads:
            raise ValueError(
                f"ModelConfig.dim={self.dim} must be divisible by n_heads={self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads} must be divisible by "
                f"n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"ModelConfig.dim/n_heads={self.head_dim} must be even for rotary embeddings"
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
