"""What the server hands the request store: one record per answered HTTP request.

Kept apart from the endpoints so they only say "this request finished"; the store's own writer
thread makes sure a slow or broken database never reaches the user (monitor/store.py).
"""

from __future__ import annotations

import json

from llmforge.monitor.safety import SafetyChecker
from llmforge.monitor.store import RequestRecord
from llmforge.serve.outputs import RequestOutput
from llmforge.serve.protocol import ChatRequest, CompletionRequest

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "seed", "n", "stop",
                   "presence_penalty", "frequency_penalty", "repetition_penalty")


def request_record(response_id: str, body: CompletionRequest | ChatRequest,
                   outputs: list[RequestOutput | None], *, model: str, model_version: str,
                   endpoint: str, client_id: str | None, safety: SafetyChecker,
                   error: str | None = None) -> RequestRecord:
    """The store's record of one HTTP request: its prompt(s), answer(s), token counts,
    latencies, sampling settings and safety flags."""
    done = [o for o in outputs if o is not None]
    texts = [c.text for o in done for c in o.choices]
    reasons = sorted({c.finish_reason for o in done for c in o.choices})
    first = done[0] if done else None
    generated = sum(o.completion_tokens for o in done)
    ttft = e2e = itl = None
    if first is not None and first.first_token_time is not None:
        ttft = (first.first_token_time - first.arrival_time) * 1000
        e2e = (first.finish_time - first.arrival_time) * 1000
        tokens = first.completion_tokens
        if tokens > 1:
            itl = (first.finish_time - first.first_token_time) * 1000 / (tokens - 1)
    if isinstance(body, ChatRequest):
        prompt = checked = [m.plain() for m in body.messages]
    else:  # several prompts are checked as one text; token ids are not checked
        prompt = body.prompt
        checked = "\n\n".join(p for p in body.prompts() if isinstance(p, str))
    return RequestRecord(
        id=response_id, model=model, model_version=model_version, client_id=client_id,
        endpoint=endpoint, prompt=prompt,
        output=texts[0] if len(texts) == 1 else json.dumps(texts),
        prompt_tokens=sum(o.prompt_tokens for o in done), completion_tokens=generated,
        finish_reason=",".join(reasons) or None, ttft_ms=ttft, e2e_ms=e2e, itl_ms=itl,
        sampling={k: v for k in SAMPLING_FIELDS if (v := getattr(body, k, None)) is not None},
        status="error" if error else "ok", error=error,
        safety_flags=safety.flags(checked, "\n\n".join(texts)))

