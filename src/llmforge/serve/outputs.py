"""What the engine hands back: per-step deltas while a request runs, one result at the end."""

from __future__ import annotations

from dataclasses import dataclass, field


class QueueFull(Exception):
    """The engine's waiting queue is at its limit; the caller should answer 429/503."""


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float  # log-probability under the model's raw distribution (before sampling settings)
    top: list[tuple[int, float]] = field(default_factory=list)  # best alternatives, best first


@dataclass
class Delta:
    """What one choice of a request produced in one engine step."""

    index: int  # which of the request's n choices
    token_ids: list[int]
    text: str  # new text; may be "" while a possible stop string or a split character waits
    logprobs: list[TokenLogprob] | None  # one per token_ids entry when logprobs were asked for
    finish_reason: str | None = None  # None while running; "stop", "length" or "abort" at the end


@dataclass
class Choice:
    index: int
    text: str
    token_ids: list[int]  # ending in the stop token when one ended it (it adds no text)
    logprobs: list[TokenLogprob] | None
    finish_reason: str  # "stop" (end-of-turn token, stop string or stop id), "length", "abort"


@dataclass
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    # One entry per prompt token when prompt_logprobs was asked for; the first is None (nothing
    # predicts the first token).
    prompt_logprobs: list[TokenLogprob | None] | None
    choices: list[Choice]
    arrival_time: float  # time.monotonic() when submitted
    first_token_time: float | None  # when the first generated token was ready
    finish_time: float
    error: str | None = None  # set when the engine failed this request (the others carry on)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)
