"""Token-by-token sampling with a KV cache, yielding as it goes so callers can stream."""

from __future__ import annotations

from collections.abc import Collection, Iterator

import torch
from torch import Tensor

from llmforge.model.transformer import Transformer


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Mask (to -inf) everything outside the top-k and the top-p nucleus of a [V] logit vector."""
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def next_token(
    logits: Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> int:
    if temperature == 0.0:
        return int(logits.argmax())
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Collection[int] = (),
    seed: int | None = None,
) -> Iterator[int]:
    """Yield up to max_new_tokens ids; greedy when temperature == 0.

    Stops early at a stop id (not yielded) or when the sequence would exceed model max_seq_len.
    """
    if not prompt_ids:
        raise ValueError("generate needs a non-empty prompt")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    max_len = model.cfg.max_seq_len
    if len(prompt_ids) > max_len:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens, more than max_seq_len={max_len}")
    n_new = min(max_new_tokens, max_len - len(prompt_ids))
    if n_new <= 0:
        return
    device = model.tok_emb.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    # The last sampled token is never fed back, so the cache needs one slot less than the total.
    cache = model.new_cache(1, len(prompt_ids) + n_new - 1)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    for _ in range(n_new):
        logits = model(idx, cache=cache)[0, -1]
        token = next_token(logits, temperature, top_k, top_p, generator)
        if token in stop_ids:
            return
        yield token
        idx = torch.tensor([[token]], dtype=torch.long, device=device)
