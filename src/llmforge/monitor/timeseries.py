"""The request store's rows as time series: what the dashboard plots, computed without any web.

A person reading a dashboard wants a few dozen points per line: fewer hide a spike, more turn
into noise and cost the browser. So a range is cut into buckets of a round width (1 minute ...
1 day) giving at most MAX_BUCKETS, with edges on multiples of the width since the epoch, so the
same minute or hour lands in the same bucket on every refresh. Rates divide by the part of a
bucket inside the range, so a clipped first or last bucket is not read as a drop in traffic.

Latency percentiles are numpy's (linear interpolation) over the rows that carry the value, of
any status; a bucket without such rows gets None, which the page draws as a gap, not a zero.
Every value is JSON-able: times as ISO 8601 strings, missing numbers as None.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

MAX_BUCKETS = 60
# Round bucket widths, in seconds: 1, 2, 5, 10, 15, 30 minutes; 1, 2, 3, 6, 12 hours; 1 day.
BUCKET_WIDTHS_S = (60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft_ms", "itl_ms", "e2e_ms")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def bucket_width(span: timedelta) -> timedelta:
    """The smallest round width that cuts `span` into at most MAX_BUCKETS buckets (whole days
    beyond BUCKET_WIDTHS_S)."""
    seconds = span.total_seconds()
    for width in BUCKET_WIDTHS_S:
        if seconds <= width * MAX_BUCKETS:
            return timedelta(seconds=width)
    return timedelta(days=math.ceil(seconds / (86400 * MAX_BUCKETS)))


def bucket_edges(since: datetime, until: datetime) -> list[tuple[datetime, datetime]]:
    """[start, end) of each bucket covering [since, until): epoch-aligned edges, the first and
    last clipped to the range."""
    if until <= since:
        raise ValueError(f"until ({until.isoformat()}) must be after since ({since.isoformat()})")
    width = bucket_width(until - since).total_seconds()
    edge = _EPOCH + timedelta(seconds=(since - _EPOCH).total_seconds() // width * width)
    buckets = []
    while edge < until:
        nxt = edge + timedelta(seconds=width)
        buckets.append((max(edge, since), min(nxt, until)))
        edge = nxt
    return buckets


def percentiles(values: Iterable[float | None]) -> dict[str, float | None]:
    """p50, p90 and p99 of the values that are not None (all None when there are none)."""
    present = [v for v in values if v is not None]
    if not present:
        return {f"p{q}": None for q in PERCENTILES}
    return {f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(present, PERCENTILES),
                                               strict=True)}


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def _iso(value: datetime) -> str:
    return value.isoformat()


def _split(items: Sequence[Mapping[str, Any]], starts: list[datetime],
           until: datetime) -> list[list[Mapping[str, Any]]]:
    """Items (with `created_at`) grouped by bucket; items outside [starts[0], until) dropped."""
    groups: list[list[Mapping[str, Any]]] = [[] for _ in starts]
    for item in items:
        at = item["created_at"]
        if starts[0] <= at < until:
            groups[bisect_right(starts, at) - 1].append(item)
    return groups


# --- per group of requests -------------------------------------------------------------------

def traffic(rows: Sequence[Mapping[str, Any]], seconds: float) -> dict[str, Any]:
    """Counts, error share, tokens and throughput of requests seen over `seconds`."""
    errors = sum(r["status"] == "error" for r in rows)
    generated = sum(r["completion_tokens"] or 0 for r in rows)
    return {
        "requests": len(rows),
        "errors": errors,
        "error_rate": _ratio(errors, len(rows)),
        "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in rows),
        "completion_tokens": generated,
        "requests_per_min": _ratio(len(rows) * 60.0, seconds),
        "tokens_per_s": _ratio(generated, seconds),
    }


def latency(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Percentiles of each latency column (milliseconds)."""
    return {name: percentiles(r[name] for r in rows) for name in LATENCIES}


def flag_counts(rows: Iterable[Mapping[str, Any]]) -> Counter[str]:
    """How many requests carry each safety flag (a flag repeated on one request counts once)."""
    return Counter(flag for r in rows for flag in set(r["safety_flags"] or ()))


def feedback_stats(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Thumbs up and down, mean rating and preferred answers among feedback entries."""
    ratings = [e["rating"] for e in entries if e["rating"] is not None]
    return {
        "feedback": len(entries),
        "thumbs_up": sum(e["thumb"] == 1 for e in entries),
        "thumbs_down": sum(e["thumb"] == -1 for e in entries),
        "ratings": len(ratings),
        "mean_rating": float(np.mean(ratings)) if ratings else None,
        "preferred": sum(bool(e["preferred"] and e["preferred"].strip()) for e in entries),
    }


def safety_by_version(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per model version: requests, flagged requests, and each flag's count and rate."""
    versions: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        versions.setdefault(r["model_version"], []).append(r)
    table = []
    for version in sorted(versions):
        group = versions[version]
        flagged = sum(bool(r["safety_flags"]) for r in group)
        table.append({
            "model_version": version,
            "requests": len(group),
            "flagged": flagged,
            "flagged_rate": flagged / len(group),
            "flags": {flag: {"count": n, "rate": n / len(group)}
                      for flag, n in sorted(flag_counts(group).items())},
        })
    return table


# --- the whole range -------------------------------------------------------------------------

def _columns(stats: list[Mapping[str, Any]], keys: Iterable[str]) -> dict[str, list[Any]]:
    return {key: [s[key] for s in stats] for key in keys}


def _flag_series(groups: list[list[Mapping[str, Any]]], flags: list[str]) -> dict[str, list[int]]:
    counts = [flag_counts(g) for g in groups]
    return {flag: [c[flag] for c in counts] for flag in flags}


def summarize(requests: Sequence[Mapping[str, Any]], feedback: Sequence[Mapping[str, Any]], *,
              since: datetime, until: datetime) -> dict[str, Any]:
    """Everything the dashboard plots for [since, until): per-bucket series and range totals.

    `requests` are request store rows and `feedback` feedback rows (`feedback_with_requests`);
    both are cut by their own `created_at`, and rows outside the range are ignored.
    """
    buckets = bucket_edges(since, until)
    starts = [start for start, _ in buckets]
    rows = [r for r in requests if since <= r["created_at"] < until]
    entries = [e for e in feedback if since <= e["created_at"] < until]
    groups, feedback_groups = _split(rows, starts, until), _split(entries, starts, until)
    spans = [(end - start).total_seconds() for start, end in buckets]
    flags = sorted(flag_counts(rows))
    versions = sorted({r["model_version"] for r in rows})

    traffic_stats = [traffic(g, s) for g, s in zip(groups, spans, strict=True)]
    latency_stats = [latency(g) for g in groups]
    feedback_series = [feedback_stats(g) for g in feedback_groups]
    series = {
        **_columns(traffic_stats, ("requests", "errors", "error_rate", "completion_tokens",
                                   "requests_per_min", "tokens_per_s")),
        **{name: {p: [s[name][p] for s in latency_stats] for p in latency_stats[0][name]}
           for name in LATENCIES},
        "safety": _flag_series(groups, flags),
        "safety_by_version": {
            v: _flag_series([[r for r in g if r["model_version"] == v] for g in groups], flags)
            for v in versions},
        **_columns(feedback_series, ("feedback", "thumbs_up", "thumbs_down", "mean_rating",
                                     "preferred")),
    }
    totals = {**traffic(rows, (until - since).total_seconds()), **latency(rows),
              "flagged": sum(bool(r["safety_flags"]) for r in rows),
              "safety": dict(sorted(flag_counts(rows).items())), **feedback_stats(entries)}
    return {
        "since": _iso(since),
        "until": _iso(until),
        "bucket_seconds": int(bucket_width(until - since).total_seconds()),
        "buckets": {"start": [_iso(s) for s, _ in buckets], "end": [_iso(e) for _, e in buckets]},
        "series": series,
        "totals": totals,
        "safety_flags": flags,
        "safety_by_version": safety_by_version(rows),
    }
