"""The OpenAI wire format: request bodies in, response and stream-chunk JSON out, errors.

Requests are strict about types (a string where a number belongs is a 400, as with OpenAI) and
ignore fields they do not know, as OpenAI-compatible servers do, so clients written for other
servers still work. Ranges are checked once, by `SamplingParams.validate` in the engine.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmforge.serve.outputs import Choice, Delta, RequestOutput, TokenLogprob
from llmforge.serve.sampling import SamplingParams

TokenText = Callable[[int], str]  # one token id -> its text


class APIError(Exception):
    """A request answered with an HTTP error status and OpenAI's error JSON."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = ("server_error" if self.status >= 500 else
                "rate_limit_error" if self.status == 429 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """An explicit null means the default, as with OpenAI."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) \
            else data


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def plain(self) -> dict:
        """{"role", "content": str}: what chat templates take ("developer" is OpenAI's new
        name for "system")."""
        parts = self.content if isinstance(self.content, list) else [self.content or ""]
        text = "".join(p if isinstance(p, str) else p.text for p in parts)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class _GenerationRequest(_Body):
    """Fields both generation endpoints share (OpenAI's, then vLLM's sampling extras)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """Top alternatives wanted per generated token and per prompt token (None: no logprobs)."""
        raise NotImplementedError

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        logprobs, prompt_logprobs = self.logprob_counts()
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            seed=self.seed, stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos, n=self.n, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return self.logprobs, self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class ChatRequest(_GenerationRequest):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, None


class TokenizeRequest(_Body):
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    tokens: list[int]


# ---------- responses ----------

def usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(o.prompt_tokens for o in outputs)
    completion = sum(o.completion_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _legacy_logprobs(text: TokenText, ids: list[int], entries: list[TokenLogprob | None],
                     offset: int) -> dict:
    """The completions API's logprobs: parallel lists; each top_logprobs dict also holds the
    chosen token, as OpenAI's does (lm-evaluation-harness tests greediness against it)."""
    tokens = [text(i) for i in ids]
    return {
        "tokens": tokens,
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": [None if e is None else
                         {text(e.token_id): e.logprob} | {text(t): lp for t, lp in e.top}
                         for e in entries],
        "text_offset": list(itertools.accumulate(map(len, tokens), initial=offset))[:-1],
    }


def _chat_logprobs(text: TokenText, entries: list[TokenLogprob]) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        token = text(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [item(e.token_id, e.logprob)
                        | {"top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]}


class CompletionShape:
    """/v1/completions choices; `echo` puts each prompt (and its logprobs) before the text."""

    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, text: TokenText, prompt_texts: list[str], echo: bool, logprobs: bool):
        self.text, self.prompt_texts, self.echo, self.logprobs = text, prompt_texts, echo, logprobs
        self.offsets: dict[int, int] = {}  # streamed text length per choice, for text_offset

    @staticmethod
    def _entry(index: int, text: str, logprobs: dict | None, finish: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def choice(self, index: int, output: RequestOutput, choice: Choice, prompt: int) -> dict:
        ids, entries, text = choice.token_ids, choice.logprobs, choice.text
        if self.echo:
            ids, text = output.prompt_ids + ids, self.prompt_texts[prompt] + text
            entries = (output.prompt_logprobs or []) + (entries or [])
        logprobs = _legacy_logprobs(self.text, ids, entries, 0) if self.logprobs else None
        return self._entry(index, text, logprobs, choice.finish_reason)

    def opening(self, index: int, prompt: int) -> dict | None:
        if not self.echo:
            return None
        self.offsets[index] = len(self.prompt_texts[prompt])
        return self._entry(index, self.prompt_texts[prompt], None, None)

    def piece(self, index: int, delta: Delta) -> dict:
        offset = self.offsets.get(index, 0)
        self.offsets[index] = offset + len(delta.text)
        logprobs = (_legacy_logprobs(self.text, delta.token_ids, delta.logprobs, offset)
                    if self.logprobs else None)
        return self._entry(index, delta.text, logprobs, None)

    def finish(self, index: int, reason: str) -> dict:
        return self._entry(index, "", None, reason)


class ChatShape:
    """/v1/chat/completions choices: an assistant message, streamed as role then content."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, text: TokenText, logprobs: bool):
        self.text, self.logprobs = text, logprobs

    def _logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        return _chat_logprobs(self.text, entries or []) if self.logprobs else None

    def choice(self, index: int, output: RequestOutput, choice: Choice, prompt: int) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": choice.text},
                "logprobs": self._logprobs(choice.logprobs), "finish_reason": choice.finish_reason}

    def opening(self, index: int, prompt: int) -> dict:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def piece(self, index: int, delta: Delta) -> dict:
        return {"index": index, "delta": {"content": delta.text},
                "logprobs": self._logprobs(delta.logprobs), "finish_reason": None}

    def finish(self, index: int, reason: str) -> dict:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}


class FeedbackRequest(_Body):
    """POST /v1/feedback: a user's judgement of a response the server returned."""

    id: str = Field(min_length=1)  # the response's id ("chatcmpl-…", "cmpl-…")
    thumb: int | None = None  # 1 up, -1 down
    rating: int | None = None  # 1..5
    preferred: str | None = None  # the answer the user would have wanted instead
    note: str | None = None
