"""Named model shapes, from a laptop-sized 1M to published ~1B families.

A recipe picks one with `model: {preset: NAME}` and may override any field next to it. Sizes
for our own tokenizers leave vocab_size at 0 (filled in from the tokenizer); their quoted
parameter counts assume a 32,768-token vocabulary and tied embeddings. The published shapes
carry their own vocabulary so their weights can be imported as they are.
"""

from __future__ import annotations

from typing import Any

_OWN = {"tie_embeddings": True}

PRESETS: dict[str, dict[str, Any]] = {
    # Own-tokenizer sizes (count at vocab 32,768).
    "llama-1m": {**_OWN, "dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1,
                 "max_seq_len": 512},
    "llama-20m": {**_OWN, "dim": 384, "n_layers": 6, "n_heads": 6, "n_kv_heads": 2,
                  "max_seq_len": 1024},
    "llama-60m": {**_OWN, "dim": 512, "n_layers": 10, "n_heads": 8, "n_kv_heads": 4,
                  "max_seq_len": 1024},
    "gpt2-124m": {**_OWN, "dim": 768, "n_layers": 12, "n_heads": 12, "n_kv_heads": 12,
                  "max_seq_len": 1024},
    "llama-350m": {**_OWN, "dim": 1024, "n_layers": 24, "n_heads": 16, "n_kv_heads": 8,
                   "max_seq_len": 2048},
    "llama-1b": {**_OWN, "dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8,
                 "ffn_hidden": 8192, "max_seq_len": 2048, "rope_theta": 500000.0},
    # Published shapes (vocabulary included).
    "smollm2-135m": {"vocab_size": 49152, "dim": 576, "n_layers": 30, "n_heads": 9,
                     "n_kv_heads": 3, "ffn_hidden": 1536, "max_seq_len": 8192,
                     "rope_theta": 100000.0, "tie_embeddings": True},
    "smollm2-360m": {"vocab_size": 49152, "dim": 960, "n_layers": 32, "n_heads": 15,
                     "n_kv_heads": 5, "ffn_hidden": 2560, "max_seq_len": 8192,
                     "rope_theta": 100000.0, "tie_embeddings": True},
    "qwen2.5-0.5b": {"vocab_size": 151936, "dim": 896, "n_layers": 24, "n_heads": 14,
                     "n_kv_heads": 2, "ffn_hidden": 4864, "max_seq_len": 32768,
                     "rope_theta": 1000000.0, "norm_eps": 1e-6, "tie_embeddings": True,
                     "attn_bias": True},
    "llama3.2-1b": {"vocab_size": 128256, "dim": 2048, "n_layers": 16, "n_heads": 32,
                    "n_kv_heads": 8, "ffn_hidden": 8192, "max_seq_len": 131072,
                    "rope_theta": 500000.0, "tie_embeddings": True, "rope_scaling": "llama3",
                    "rope_factor": 32.0, "rope_low_freq_factor": 1.0,
                    "rope_high_freq_factor": 4.0, "rope_original_max_len": 8192},
}


def resolve(section: dict[str, Any]) -> dict[str, Any]:
    """A recipe's model section with its preset (if any) expanded under the explicit keys."""
    if "preset" not in section:
        return section
    name = section["preset"]
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (valid: {', '.join(PRESETS)})")
    rest = {k: v for k, v in section.items() if k != "preset"}
    return {**PRESETS[name], **rest}
