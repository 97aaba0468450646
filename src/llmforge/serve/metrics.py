"""Prometheus metrics of one server: request outcomes, latencies, token counts, engine load.

A private registry, so two apps in one process (tests) never share counters. Latencies are
taken on the engine thread as tokens come out, not when the event loop gets round to them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmforge.serve.outputs import Delta, RequestOutput
from llmforge.serve.speculative import SpecStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, num_running: Callable[[], int], num_waiting: Callable[[], int],
                 store_failures: Callable[[], Mapping[str, int]] = dict,
                 spec_decode: Callable[[], SpecStats] = SpecStats):
        """`num_running`, `num_waiting`, `store_failures` (the request store's dropped
        records by reason) and `spec_decode` (the engine's speculative decoding totals, zeros
        without a draft model) are read (called) at every scrape."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llmforge_requests", "HTTP API requests by endpoint and outcome "
                                "(success, error, abort, rejected)", ["endpoint", "outcome"],
                                registry=r)
        self.ttft = Histogram("llmforge_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("llmforge_inter_token_latency_seconds",
                             "Time between a choice's successive engine steps with new tokens",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("llmforge_e2e_request_latency_seconds", "Arrival to finish",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("llmforge_prompt_tokens", "Prompt tokens processed",
                                     registry=r)
        self.generation_tokens = Counter("llmforge_generation_tokens", "Tokens generated",
                                         registry=r)
        self.safety_flags = Counter("llmforge_safety_flags", "Safety flags raised on prompts "
                                    "and outputs, by model version and flag",
                                    ["model_version", "flag"], registry=r)
        self.feedback = Counter("llmforge_feedback", "User feedback received, by kind "
                                "(thumb_up, thumb_down, rating, preferred, note)", ["kind"],
                                registry=r)
        r.register(_LiveCounter("llmforge_request_store_failures", "Request records the store "
                                "dropped, by reason", "reason", store_failures))
        r.register(_SpecDecode(spec_decode))
        Gauge("llmforge_num_requests_running", "Requests being decoded",
              registry=r).set_function(num_running)
        Gauge("llmforge_num_requests_waiting", "Requests queued for a decode slot",
              registry=r).set_function(num_waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self) -> RequestTimer:
        return RequestTimer(self)


class _LiveCounter:
    """A labelled counter read from a live {label: count} mapping at every scrape."""

    def __init__(self, name: str, documentation: str, label: str,
                 read: Callable[[], Mapping[str, int]]):
        self.name, self.documentation, self.label, self.read = name, documentation, label, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, count in sorted(self.read().items()):
            family.add_metric([value], count)
        yield family


class _SpecDecode:
    """Draft tokens proposed and accepted (vLLM's spec_decode names), read from the engine."""

    def __init__(self, read: Callable[[], SpecStats]):
        self.read = read

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self.read()
        yield CounterMetricFamily("llmforge_spec_decode_num_draft_tokens",
                                  "Draft tokens the draft model proposed", value=stats.proposed)
        yield CounterMetricFamily("llmforge_spec_decode_num_accepted_tokens",
                                  "Draft tokens the target model accepted", value=stats.accepted)
        yield GaugeMetricFamily("llmforge_spec_decode_draft_acceptance_rate",
                                "Accepted over proposed draft tokens since the start (NaN "
                                "before any)", value=stats.acceptance_rate)


class RequestTimer:
    """One engine request's callbacks feeding the histograms (runs on the engine thread)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.last: dict[int, float] = {}  # choice index -> time of its previous tokens

    def delta(self, delta: Delta) -> None:
        if not delta.token_ids:
            return
        now = time.monotonic()
        if delta.index in self.last:
            self.metrics.itl.observe(now - self.last[delta.index])
        self.last[delta.index] = now

    def finish(self, out: RequestOutput) -> None:
        m = self.metrics
        if out.first_token_time is not None:
            m.ttft.observe(out.first_token_time - out.arrival_time)
        m.e2e.observe(out.finish_time - out.arrival_time)
        m.prompt_tokens.inc(out.prompt_tokens)
        m.generation_tokens.inc(out.completion_tokens)


class CountRequests:
    """ASGI middleware: one `llmforge_requests_total` increment per request to `endpoints`.

    The outcome follows the status (2xx success, 429 rejected, else error) unless the handler
    set `request.state.outcome` (a stream the client left is an "abort" though it began 200).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, endpoints: set[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.endpoints:
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            outcome = scope.get("state", {}).get("outcome") or (
                "success" if status < 400 else "rejected" if status == 429 else "error")
            self.metrics.requests.labels(scope["path"], outcome).inc()
