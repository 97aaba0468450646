"""Validation loss, bits per byte and greedy samples: the numbers every stage is judged by.

Bits per byte divides the summed loss by the UTF-8 bytes of the text it covers, so models with
different tokenizers can be compared; loss per token cannot.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from llmforge.model.generate import generate
from llmforge.tokenizer.chat import render_prompt, stop_ids
from llmforge.train.device import DTYPES, autocast


@dataclass
class EvalConfig:
    seq_len: int = 256
    batch_size: int = 16
    max_val_windows: int = 0  # 0 = the whole validation split
    max_new_tokens: int = 96
    dtype: str = "auto"  # auto (bf16 autocast where the hardware has it) | bf16 | fp32
    # Prompts end before a newline: byte-level BPE merges "\n" with the indentation after it.
    prompts: list[str] = field(
        default_factory=lambda: ["def fibonacci(n):", "import os", "class Stack:"]
    )
    chat_prompts: list[str] = field(
        default_factory=lambda: [
            "Return the sum of the squares of a list of numbers.",
            "Return True if the string is a palindrome.",
            "Read a file and return its lines without trailing whitespace.",
        ]
    )

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@torch.no_grad()
def summed_loss(
    model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], dtype: str
) -> tuple[float, int]:
    """Total next-token loss in nats and the number of predicted tokens."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x, y in batches:
        with autocast(device, dtype):
            total += model(x.to(device), y.to(device), reduction="sum").item()
        count += int((y != -100).sum())
    return total, count


def loss_report(total_nats: float, n_tokens: int, n_bytes: int) -> dict:
    mean = total_nats / n_tokens
    return {
        "val_loss": round(mean, 5),
        "perplexity": round(math.exp(mean), 3),
        "bpb": round(total_nats / math.log(2) / n_bytes, 5),
        "val_tokens": n_tokens,
    }


def greedy_samples(model: torch.nn.Module, tok: Tokenizer, cfg: EvalConfig) -> dict:
    """Greedy continuations of plain prompts and replies to chat prompts."""
    bos = tok.token_to_id("<|bos|>")
    stops = stop_ids(tok)

    def complete(ids: list[int]) -> str:
        return tok.decode(list(generate(model, ids, cfg.max_new_tokens, stop_ids=stops)))

    def reply(prompt: str) -> str:
        return complete(render_prompt(tok, [{"role": "user", "content": prompt}]))

    return {
        "samples": [{"prompt": p, "completion": complete([bos, *tok.encode(p).ids])}
                    for p in cfg.prompts],
        "chat_samples": [{"prompt": p, "completion": reply(p)} for p in cfg.chat_prompts],
    }
