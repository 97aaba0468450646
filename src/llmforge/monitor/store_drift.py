"""Drift of what a request store holds: its rows cut into windows, chat prompts as plain text,
and, given the model, the model's own perplexity on each prompt.

Perplexity is the one drift column the server cannot record for free: it takes a scoring pass
of the model over the prompt. So it is computed here, offline, on at most `max_scored` evenly
spaced prompts of each window; a prompt far from what the model was trained on reads as a
jump in perplexity before users notice worse answers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from llmforge.monitor.drift import DriftReport, drift_report, split_windows
from llmforge.monitor.store import RequestStore

MAX_SCORED = 500


def prompt_text(row: Mapping[str, Any]) -> str:
    """A stored prompt as text: chat messages (stored as JSON) joined by newlines."""
    prompt = row["prompt"]
    if not row.get("endpoint", "").startswith("chat"):
        return prompt
    try:
        messages = json.loads(prompt)
        return "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    except (json.JSONDecodeError, TypeError, AttributeError):
        return prompt


class PromptPerplexity:
    """Mean negative log-likelihood per token of prompts under one model (any spec `llmforge
    chat` opens)."""

    def __init__(self, spec: str, device: str = "cpu", batch_size: int = 16):
        from llmforge.eval.suite import language_model

        self.spec = spec
        self.lm = language_model(spec, device, batch_size)

    def __call__(self, texts: Sequence[str]) -> list[float | None]:
        """One value per text; None for a text with no tokens."""
        scored = self.lm.loglikelihood_rolling(list(texts))
        return [-s.logprob / s.n_tokens if s.n_tokens else None for s in scored]


def _with_nll(rows: list[dict], perplexity: PromptPerplexity, max_scored: int) -> list[dict]:
    """`rows` with `prompt_nll` on up to `max_scored` evenly spaced ones."""
    step = max(1, -(-len(rows) // max_scored))
    picked = rows[::step]
    for row, nll in zip(picked, perplexity([r["prompt"] for r in picked]), strict=True):
        row["prompt_nll"] = nll
    return rows


def store_drift(store: RequestStore, *, reference_days: float = 7.0, current_days: float = 1.0,
                model_version: str | None = None, now: datetime | None = None,
                perplexity: PromptPerplexity | None = None, max_scored: int = MAX_SCORED,
                thresholds: Mapping[str, float] | None = None) -> DriftReport:
    """Drift of the last `current_days` of answered requests against the `reference_days`
    before them (see `split_windows`), optionally of one model version."""
    since = None if now is None else now - timedelta(days=reference_days + current_days)
    rows = [{**r, "prompt": prompt_text(r)}
            for r in store.requests(since=since, model_version=model_version)
            if r["status"] == "ok"]
    reference, current = split_windows(rows, reference_days, current_days, now)
    if perplexity is not None:
        reference, current = (_with_nll(w, perplexity, max_scored) for w in (reference, current))
    return drift_report(reference, current, thresholds=thresholds)
