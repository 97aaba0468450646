"""Model FLOPs utilisation: the FLOPs a step needs, counted from the config, over the peak.

Counting follows PaLM (Chowdhery et al. 2022, appendix B): 6 FLOPs per matmul weight per
token for forward + backward, plus 12 * layers * dim * seq_len per token for attention scores
and values (no discount for causal masking), so figures compare with nanoGPT and nanochat.
"""

from __future__ import annotations

import functools
import time

import torch

from llmforge.model.config import ModelConfig


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of a `seq_len`-token sequence."""
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    # A mixture-of-experts token passes through its top-k experts and the router only.
    mlp = 3 * cfg.dim * cfg.hidden * (cfg.moe_top_k if cfg.n_experts else 1)
    mlp += cfg.dim * cfg.n_experts
    per_layer = 2 * cfg.dim * cfg.dim + 2 * cfg.dim * kv_dim + mlp
    matmul_weights = cfg.n_layers * per_layer + cfg.vocab_size * cfg.dim  # + lm head
    return 6 * matmul_weights + 12 * cfg.n_layers * cfg.dim * seq_len


@functools.cache
def measured_peak_flops(device_type: str, bf16: bool, size: int = 2048, repeats: int = 5) -> float:
    """Best square-matmul throughput this device reaches: the ceiling MFU is measured against."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(size, size, device=device_type, dtype=dtype)
    b = torch.randn(size, size, device=device_type, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device_type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best
