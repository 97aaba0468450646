"""`llmforge monitor dashboard`: the request store as a web page, and drift for Prometheus.

The page (static/dashboard.html) draws everything itself from two JSON endpoints, so it needs
nothing from the internet and the numbers it shows are exactly the API's:

- GET /api/summary?hours=H: latency, throughput, errors, safety flags and feedback over the last
  H hours (timeseries.summarize), with the range's totals.
- GET /api/drift: the drift report of the configured windows (store_drift), with the `now` it
  was computed at, so it can be reproduced.
- GET /metrics: `llmforge_drift_detected{column}` (0/1), `llmforge_drift_statistic{column,test}`
  and `llmforge_drift_p_value{column,test}` gauges, read from the latest drift report at scrape.

A drift report reads whole windows of prompts and may score each with a model, which takes far
longer than a page load or a scrape may; so one report serves everyone for DRIFT_TTL_S seconds,
and concurrent callers wait for the one computation rather than each starting their own.

The dashboard only reads the store; serving stays the job of `llmforge serve`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from llmforge.monitor.drift import DriftReport
from llmforge.monitor.store import RequestStore
from llmforge.monitor.store_drift import PromptPerplexity, store_drift
from llmforge.monitor.timeseries import summarize

DASHBOARD_PAGE = Path(__file__).parent / "static" / "dashboard.html"
DRIFT_TTL_S = 60.0
DEFAULT_HOURS = 24.0
MAX_HOURS = 24.0 * 366  # a year of rows is already more than a page should load


class BadRequest(ValueError):
    """A query the dashboard refuses, answered 400 with the message."""


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities (a degenerate test statistic) turned into None, which
    JSON can hold."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def parse_hours(raw: str | None) -> float:
    """The `hours` query parameter as a positive, finite number of hours (default 24)."""
    if raw is None or not raw.strip():
        return DEFAULT_HOURS
    try:
        hours = float(raw)
    except ValueError:
        raise BadRequest(f"hours must be a number of hours, not {raw!r}") from None
    if not math.isfinite(hours) or hours <= 0:
        raise BadRequest(f"hours must be positive and finite, not {raw!r}")
    if hours > MAX_HOURS:
        raise BadRequest(f"hours must be at most {MAX_HOURS:g}, not {raw!r}")
    return hours


class DriftCache:
    """The latest drift report and when it was computed, recomputed once `ttl_s` has passed."""

    def __init__(self, compute: Callable[[datetime], DriftReport], ttl_s: float = DRIFT_TTL_S,
                 clock: Callable[[], float] = time.monotonic):
        self._compute, self._ttl_s, self._clock = compute, ttl_s, clock
        self._lock = threading.Lock()
        self._entry: tuple[float, datetime, DriftReport] | None = None

    def get(self) -> tuple[datetime, DriftReport]:
        """(now the report was computed for, report)."""
        with self._lock:  # one computation at a time; latecomers get its result
            if self._entry is None or self._clock() - self._entry[0] >= self._ttl_s:
                now = datetime.now(UTC)
                self._entry = (self._clock(), now, self._compute(now))
            return self._entry[1], self._entry[2]


class DriftCollector(Collector):
    """Drift gauges, read from the cached report at every scrape."""

    def __init__(self, drift: DriftCache):
        self.drift = drift

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("llmforge_drift_detected", "1 if the column drifted between the "
                              "reference and current windows, else 0", labels=["column"]),
            GaugeMetricFamily("llmforge_drift_statistic", "The column's drift test statistic",
                              labels=["column", "test"]),
            GaugeMetricFamily("llmforge_drift_p_value", "The column's drift test p-value "
                              "(p-value tests only)", labels=["column", "test"]),
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        detected, statistic, p_value = self._families()
        _, report = self.drift.get()
        for column in report.columns:
            detected.add_metric([column.name], float(column.drifted))
            if column.statistic is not None:
                statistic.add_metric([column.name, column.test], column.statistic)
            if column.p_value is not None:
                p_value.add_metric([column.name, column.test], column.p_value)
        yield from (detected, statistic, p_value)


class _Dashboard:
    """The endpoints, sharing the store, the drift settings and the drift cache."""

    def __init__(self, store: RequestStore, *, reference_days: float, current_days: float,
                 model_version: str | None, perplexity: PromptPerplexity | None,
                 drift_ttl_s: float):
        self.store, self.model_version, self.perplexity = store, model_version, perplexity
        self.reference_days, self.current_days = reference_days, current_days
        self.drift = DriftCache(self._compute_drift, drift_ttl_s)
        self.registry = CollectorRegistry()
        self.registry.register(DriftCollector(self.drift))

    def _compute_drift(self, now: datetime) -> DriftReport:
        return store_drift(self.store, reference_days=self.reference_days,
                           current_days=self.current_days, model_version=self.model_version,
                           now=now, perplexity=self.perplexity)

    def page(self) -> Response:
        if not DASHBOARD_PAGE.is_file():
            return _error(404, "no dashboard page in this installation")
        return FileResponse(DASHBOARD_PAGE, media_type="text/html")

    def health(self) -> dict:
        return {"status": "ok"}

    def summary(self, hours: str | None = None) -> JSONResponse:
        span = parse_hours(hours)
        until = datetime.now(UTC)
        since = until - timedelta(hours=span)
        rows = self.store.requests(since=since, until=until, model_version=self.model_version)
        feedback = self.store.feedback_with_requests(since, until, self.model_version)
        result = summarize(rows, feedback, since=since, until=until)
        return JSONResponse(_finite({**result, "hours": span,
                                     "model_version": self.model_version}))

    def drift_report(self) -> JSONResponse:
        now, report = self.drift.get()
        return JSONResponse(_finite({
            **report.to_dict(), "now": now.isoformat(), "reference_days": self.reference_days,
            "current_days": self.current_days, "model_version": self.model_version,
            "perplexity_model": None if self.perplexity is None else self.perplexity.spec}))

    def metrics(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status)


def dashboard_app(store: RequestStore, *, reference_days: float = 7.0, current_days: float = 1.0,
                  model_version: str | None = None, perplexity: PromptPerplexity | None = None,
                  drift_ttl_s: float = DRIFT_TTL_S) -> FastAPI:
    """The dashboard over an open store (which the caller closes)."""
    dash = _Dashboard(store, reference_days=reference_days, current_days=current_days,
                      model_version=model_version, perplexity=perplexity, drift_ttl_s=drift_ttl_s)
    app = FastAPI(title="llmforge monitor")
    # Plain `def` endpoints: FastAPI runs them in its thread pool, so slow database reads and
    # drift tests never hold up the event loop.
    app.get("/", include_in_schema=False)(dash.page)
    app.get("/health")(dash.health)
    app.get("/api/summary")(dash.summary)
    app.get("/api/drift")(dash.drift_report)
    app.get("/metrics")(dash.metrics)

    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return _error(400, str(exc))

    async def crash(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"{type(exc).__name__}: {exc}")

    app.add_exception_handler(BadRequest, bad_request)
    app.add_exception_handler(Exception, crash)
    return app


def serve_dashboard(store_url: str, *, host: str = "127.0.0.1", port: int = 8001,
                    reference_days: float = 7.0, current_days: float = 1.0,
                    model_version: str | None = None, model: str | None = None) -> None:
    """Serve the dashboard of the store at `store_url` until stopped; `model` (a model spec)
    adds the prompts' perplexity to the drift report."""
    perplexity = PromptPerplexity(model) if model else None
    store = RequestStore(store_url)
    try:
        app = dashboard_app(store, reference_days=reference_days, current_days=current_days,
                            model_version=model_version, perplexity=perplexity)
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        store.close()
