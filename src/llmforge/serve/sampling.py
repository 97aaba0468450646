"""Sampling settings of one request, checked once at the door."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # <= 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt and output tokens; 1 = off
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings, not included in the output
    stop_token_ids: tuple[int, ...] = ()  # extra to the model's own end-of-turn ids
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob + top-k others
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (completions' echo)
