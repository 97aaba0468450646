"""The monitoring dashboard on a real SQLite request store: the time series it aggregates, its
HTTP API served by `llmforge monitor dashboard` in a child process, and its page in headless
Chromium.

The store holds two days of synthetic traffic (fixed seeds, explicit times) on two model
versions, with a burst of errors, safety flags, feedback arriving minutes after its request,
and a shift planted 20 hours ago: prompts grow several times longer and half of them turn
French or German, so the drift report must flag those columns.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from llmforge.monitor.dashboard import DriftCache, dashboard_app, parse_hours
from llmforge.monitor.store import FEEDBACK, Feedback, RequestRecord, RequestStore
from llmforge.monitor.store_drift import store_drift
from llmforge.monitor.timeseries import (
    LATENCIES,
    MAX_BUCKETS,
    bucket_edges,
    bucket_width,
    summarize,
)
from llmforge.serve.launch import free_port

NOW = datetime.now(UTC).replace(microsecond=0)
START = NOW - timedelta(days=2)
SHIFT_AT = NOW - timedelta(hours=20)
ERROR_BURST = (NOW - timedelta(hours=30), NOW - timedelta(hours=29))
N_REQUESTS = 1200
PLANTED = {"prompt_tokens", "language", "token_distribution"}
TIMEOUT_MS = 30_000

ENGLISH = [
    "How do rainbows form after a summer storm?",
    "Write a limerick about a cat who loves cheese.",
    "What does a hash map do and when should I use one?",
    "List three tips for sleeping better at night.",
    "Explain the rules of chess to a ten year old.",
    "Why do leaves change colour in the autumn?",
    "Draft a polite note to my neighbour about the noise.",
    "What is a good recipe for a quick vegetable soup?",
    "Describe how a bill becomes a law in simple words.",
    "Suggest a name for a small bakery by the harbour.",
]
FOREIGN = [
    "Comment se forment les arcs-en-ciel après un orage d'été ?",
    "Écris un petit poème sur un chat qui adore le fromage.",
    "Pourquoi les feuilles changent-elles de couleur en automne ?",
    "Quelle est une bonne recette de soupe de légumes rapide ?",
    "Wie entstehen Regenbögen nach einem Sommergewitter?",
    "Warum verfärben sich die Blätter im Herbst so schnell?",
    "Schreibe eine höfliche Nachricht an meinen Nachbarn wegen des Lärms.",
    "Erkläre einem zehnjährigen Kind die Regeln des Schachspiels.",
]
ANSWERS = ["Here is a short answer that covers the main points you asked about.",
           "Certainly. First, consider the basics; then look at the details step by step.",
           "I'm sorry, but I can't help with that request."]
FLAG_RATES = {"v1": {"prompt:pii": 0.02, "output:toxicity": 0.01},
              "v2": {"prompt:pii": 0.02, "output:toxicity": 0.05, "prompt:jailbreak": 0.03}}


# --- the seeded store --------------------------------------------------------------------------

def _prompt(rng: np.random.Generator, at: datetime) -> str:
    shifted = at >= SHIFT_AT
    pool = FOREIGN if shifted and rng.random() < 0.5 else ENGLISH
    return " ".join(rng.choice(pool, 4 + rng.poisson(3) if shifted else 1 + rng.poisson(1)))


def _record(rng: np.random.Generator, i: int, at: datetime) -> RequestRecord:
    """One synthetic request: v2 rolls out over the two days, v2 decodes a little faster."""
    version = "v2" if rng.random() < 0.2 + 0.6 * (at - START) / (NOW - START) else "v1"
    prompt = _prompt(rng, at)
    prompt_tokens = int(len(prompt.split()) * 1.3) + 4
    in_burst = ERROR_BURST[0] <= at < ERROR_BURST[1]
    error = rng.random() < (0.4 if in_burst else 0.02)
    flags = [f for f, rate in FLAG_RATES[version].items() if rng.random() < rate]
    chat = i % 3 != 0
    fields = {"id": f"req-{i:05d}", "model": "tiny", "model_version": version,
              "client_id": f"client-{rng.integers(8)}",
              "endpoint": "chat.completions" if chat else "completions",
              "prompt": [{"role": "user", "content": prompt}] if chat else prompt,
              "prompt_tokens": prompt_tokens, "sampling": {"temperature": 0.7},
              "safety_flags": flags, "created_at": at}
    if error:
        return RequestRecord(**fields, output="", status="error", error="engine failure")
    generated = int(rng.lognormal(4.0, 0.5)) + 2
    hour = at.hour + at.minute / 60
    ttft = rng.lognormal(math.log(60 + 1.5 * prompt_tokens), 0.3)
    itl = rng.lognormal(math.log((20 if version == "v1" else 16) * (1.2 + 0.2 * math.sin(hour))),
                        0.15)
    return RequestRecord(**fields, output=str(rng.choice(ANSWERS, p=[0.6, 0.37, 0.03])),
                         completion_tokens=generated,
                         finish_reason="length" if rng.random() < 0.1 else "stop",
                         ttft_ms=float(ttft), itl_ms=float(itl),
                         e2e_ms=float(ttft + itl * (generated - 1)))


def _feedback(rng: np.random.Generator) -> Feedback:
    thumb = 1 if rng.random() < 0.7 else -1
    rating = int(np.clip(round(rng.normal(4 if thumb == 1 else 2, 0.8)), 1, 5))
    preferred = "A clearer answer, please." if thumb == -1 and rng.random() < 0.4 else None
    with_thumb = rng.random() < 0.9
    return Feedback(thumb=thumb if with_thumb else None,
                    rating=rating if not with_thumb or rng.random() < 0.6 else None,
                    preferred=preferred)


def _seed(store: RequestStore, url: str) -> None:
    rng = np.random.default_rng(20260301)
    span = NOW - START - timedelta(minutes=1)
    records = [_record(rng, i, START + span * ((i + rng.random()) / N_REQUESTS))
               for i in range(N_REQUESTS)]
    for r in records:
        store.log(r)
    assert store.flush(30) and not store.failures
    given = []  # feedback comes minutes after its answer
    for r in records:
        if r.status == "ok" and rng.random() < 0.12:
            at = min(r.created_at + timedelta(minutes=float(rng.uniform(1, 30))),
                     NOW - timedelta(seconds=1))
            given.append({"fid": store.add_feedback(r.id, _feedback(rng)), "at": at})
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(FEEDBACK.update().where(FEEDBACK.c.id == sa.bindparam("fid"))
                     .values(created_at=sa.bindparam("at")), given)
    engine.dispose()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """(store URL, open store) with the synthetic traffic."""
    url = f"sqlite:///{tmp_path_factory.mktemp('dashboard') / 'requests.db'}"
    store = RequestStore(url)
    _seed(store, url)
    yield url, store
    store.close()


def _summary_of(store: RequestStore, since: datetime, until: datetime) -> dict:
    return summarize(store.requests(since=since, until=until), store.feedback_with_requests(),
                     since=since, until=until)


def _jsonable(value):
    return json.loads(json.dumps(value))


def _close(a, b) -> bool:
    """Equal JSON values, floats up to a relative 1e-9."""
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-9)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# --- time series -------------------------------------------------------------------------------

@pytest.mark.parametrize(("hours", "minutes"), [(1, 1), (6, 10), (24, 30), (48, 60),
                                                (168, 180), (24 * 90, 2 * 1440)])
def test_bucket_width_is_round_and_gives_at_most_60_buckets(hours, minutes):
    until = datetime(2026, 3, 1, 12, 7, 13, 250_000, tzinfo=UTC)
    since = until - timedelta(hours=hours)
    assert bucket_width(until - since) == timedelta(minutes=minutes)
    buckets = bucket_edges(since, until)
    assert 30 <= len(buckets) <= MAX_BUCKETS + 1
    assert buckets[0][0] == since and buckets[-1][1] == until
    assert all(a[1] == b[0] for a, b in zip(buckets, buckets[1:], strict=False))
    width = timedelta(minutes=minutes)
    assert all(end - start == width for start, end in buckets[1:-1])
    assert all((end - datetime(1970, 1, 1, tzinfo=UTC)) % width == timedelta(0)
               for _, end in buckets[:-1])  # inner edges on round times


def test_bucket_edges_refuse_an_empty_range():
    with pytest.raises(ValueError, match="must be after"):
        bucket_edges(NOW, NOW)


def _bucket_rows(rows, buckets):
    return [[r for r in rows if start <= r["created_at"] < end] for start, end in buckets]


def test_bucket_counts_add_up_to_totals(seeded):
    _, store = seeded
    since, until = NOW - timedelta(hours=48), NOW + timedelta(minutes=1)
    s = _summary_of(store, since, until)
    series, totals = s["series"], s["totals"]
    assert totals["requests"] == sum(series["requests"]) == N_REQUESTS
    assert totals["errors"] == sum(series["errors"]) > 10
    assert totals["completion_tokens"] == sum(series["completion_tokens"])
    assert totals["feedback"] == sum(series["feedback"]) == len(store.feedback_with_requests())
    for key in ("thumbs_up", "thumbs_down", "preferred"):
        assert totals[key] == sum(series[key])
    assert set(s["safety_flags"]) == {"prompt:pii", "output:toxicity", "prompt:jailbreak"}
    for flag in s["safety_flags"]:
        assert totals["safety"][flag] == sum(series["safety"][flag])
        assert totals["safety"][flag] == sum(sum(by_flag[flag]) for by_flag in
                                             series["safety_by_version"].values())
        assert totals["safety"][flag] == sum(v["flags"].get(flag, {"count": 0})["count"]
                                             for v in s["safety_by_version"])
    assert len(series["requests"]) == len(s["buckets"]["start"]) == len(s["buckets"]["end"])
    assert json.loads(json.dumps(s)) == s  # JSON-able as it is


def test_percentiles_and_rates_match_numpy_on_the_same_rows(seeded):
    _, store = seeded
    since, until = NOW - timedelta(hours=24), NOW
    s = _summary_of(store, since, until)
    rows = store.requests(since=since, until=until)
    buckets = [(datetime.fromisoformat(a), datetime.fromisoformat(b))
               for a, b in zip(s["buckets"]["start"], s["buckets"]["end"], strict=True)]
    for i, group in enumerate(_bucket_rows(rows, buckets)):
        seconds = (buckets[i][1] - buckets[i][0]).total_seconds()
        assert s["series"]["requests"][i] == len(group)
        errors = sum(r["status"] == "error" for r in group)
        assert s["series"]["error_rate"][i] == (errors / len(group) if group else None)
        assert s["series"]["requests_per_min"][i] == pytest.approx(len(group) * 60 / seconds)
        assert s["series"]["tokens_per_s"][i] == pytest.approx(
            sum(r["completion_tokens"] for r in group) / seconds)
        for name in LATENCIES:
            values = [r[name] for r in group if r[name] is not None]
            got = [s["series"][name][p][i] for p in ("p50", "p90", "p99")]
            assert got == (list(np.percentile(values, [50, 90, 99])) if values else [None] * 3)
    for name in LATENCIES:
        values = [r[name] for r in rows if r[name] is not None]
        assert list(s["totals"][name].values()) == list(np.percentile(values, [50, 90, 99]))
    t = s["totals"]
    assert t["error_rate"] == t["errors"] / t["requests"]
    assert t["tokens_per_s"] == pytest.approx(t["completion_tokens"] / 86400)
    assert t["requests_per_min"] == pytest.approx(t["requests"] / 1440)


def test_safety_and_feedback_by_hand(seeded):
    _, store = seeded
    since, until = START, NOW
    s = _summary_of(store, since, until)
    rows = store.requests(since=since, until=until)
    for version in s["safety_by_version"]:
        mine = [r for r in rows if r["model_version"] == version["model_version"]]
        assert version["requests"] == len(mine)
        for flag, entry in version["flags"].items():
            count = sum(flag in r["safety_flags"] for r in mine)
            assert entry == {"count": count, "rate": count / len(mine)}
    v2 = next(v for v in s["safety_by_version"] if v["model_version"] == "v2")
    v1 = next(v for v in s["safety_by_version"] if v["model_version"] == "v1")
    assert "prompt:jailbreak" in v2["flags"] and "prompt:jailbreak" not in v1["flags"]
    entries = store.feedback_with_requests()
    ratings = [e["rating"] for e in entries if e["rating"] is not None]
    assert s["totals"]["mean_rating"] == pytest.approx(np.mean(ratings))
    assert s["totals"]["thumbs_up"] == sum(e["thumb"] == 1 for e in entries) > 0
    assert s["totals"]["thumbs_down"] == sum(e["thumb"] == -1 for e in entries) > 0
    assert sum(x is not None for x in s["series"]["mean_rating"]) > 10  # spread over time


def test_empty_store_and_empty_range(tmp_path):
    with RequestStore(f"sqlite:///{tmp_path / 'empty.db'}") as store:
        s = _summary_of(store, NOW - timedelta(hours=6), NOW)
        assert s["totals"]["requests"] == 0 and s["totals"]["error_rate"] is None
        assert s["totals"]["e2e_ms"] == {"p50": None, "p90": None, "p99": None}
        assert s["totals"]["mean_rating"] is None and s["safety_by_version"] == []
        assert set(s["series"]["requests"]) == {0} and set(s["series"]["error_rate"]) == {None}
        client = TestClient(dashboard_app(store))
        r = client.get("/api/summary", params={"hours": 6})
        assert r.status_code == 200 and r.json()["totals"]["requests"] == 0
        drift = client.get("/api/drift").json()
        assert drift["drifted"] == [] and drift["current_window"]["rows"] == 0
        metrics = client.get("/metrics").text
        assert 'llmforge_drift_detected{column="language"} 0.0' in metrics
        assert "llmforge_drift_statistic{" not in metrics  # nothing was testable
        assert client.get("/health").json() == {"status": "ok"}
        assert "<svg" in client.get("/").text


@pytest.mark.parametrize("raw", ["0", "-3", "abc", "nan", "inf", "1e9"])
def test_bad_hours_are_refused(raw):
    with pytest.raises(ValueError, match="hours must"):
        parse_hours(raw)


def test_hours_default_and_values():
    assert parse_hours(None) == parse_hours("") == 24.0
    assert parse_hours("0.5") == 0.5


def test_drift_cache_computes_once_per_ttl():
    clock, calls = [0.0], []

    def compute(now):
        calls.append(now)
        return f"report {len(calls)}"

    cache = DriftCache(compute, ttl_s=60, clock=lambda: clock[0])
    first = cache.get()
    clock[0] = 59.0
    assert cache.get() == first and len(calls) == 1
    clock[0] = 60.0
    assert cache.get()[1] == "report 2" and calls[1] >= calls[0]


# --- the served dashboard ----------------------------------------------------------------------

@contextlib.contextmanager
def dashboard_process(store_url: str, log: Path, timeout: float = 90.0):
    """`llmforge monitor dashboard` on a free port until the block ends: its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "llmforge.cli", "monitor", "dashboard", "--store", store_url,
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dashboard did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _healthy(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/health", timeout=1.0).status_code == 200
    return False


@pytest.fixture(scope="module")
def server(seeded, tmp_path_factory):
    url, _ = seeded
    log = tmp_path_factory.mktemp("dashboard_server") / "dashboard.log"
    with dashboard_process(url, log) as base:
        yield base


def _get(url: str, **params) -> httpx.Response:
    return httpx.get(url, params=params, timeout=120)


def test_summary_api_equals_the_store_aggregated_directly(server, seeded):
    _, store = seeded
    for hours in (1, 24):
        r = _get(f"{server}/api/summary", hours=hours)
        assert r.status_code == 200
        body = r.json()
        since, until = (datetime.fromisoformat(body[k]) for k in ("since", "until"))
        assert until - since == timedelta(hours=hours)
        assert datetime.now(UTC) - until < timedelta(minutes=2)
        expected = _jsonable(_summary_of(store, since, until))
        assert body == {**expected, "hours": hours, "model_version": None}
        assert body["totals"]["requests"] > 0


def test_default_range_is_24_hours(server):
    body = _get(f"{server}/api/summary").json()
    assert body["hours"] == 24 and body["bucket_seconds"] == 1800


@pytest.mark.parametrize("raw", ["0", "-1", "soon", "nan"])
def test_bad_hours_give_400_with_a_message(server, raw):
    r = _get(f"{server}/api/summary", hours=raw)
    assert r.status_code == 400
    assert re.search(r"hours must be", r.json()["error"]["message"])


def test_drift_api_flags_the_planted_shift(server, seeded):
    _, store = seeded
    body = _get(f"{server}/api/drift").json()
    now = datetime.fromisoformat(body["now"])
    expected = store_drift(store, reference_days=7, current_days=1, now=now)
    # Equal up to float rounding: distances sum over sets of tokens, whose order differs
    # between processes (string hashing is randomised).
    assert _close({k: body[k] for k in expected.to_dict()}, _jsonable(expected.to_dict()))
    assert PLANTED <= set(body["drifted"])
    assert body["since"] is not None
    assert SHIFT_AT - timedelta(hours=6) <= datetime.fromisoformat(body["since"]) <= NOW
    assert body["reference_days"] == 7 and body["current_days"] == 1
    assert body["perplexity_model"] is None


def test_metrics_expose_drift_gauges(server):
    drifted = set(_get(f"{server}/api/drift").json()["drifted"])
    text = _get(f"{server}/metrics").text
    assert 'llmforge_drift_detected{column="language"} 1.0' in text
    assert re.search(r'llmforge_drift_statistic\{column="language",test="chi_square"\} [\d.e+-]+',
                     text)
    detected = dict(re.findall(r'llmforge_drift_detected\{column="(\w+)"\} ([\d.]+)', text))
    assert len(detected) == 7
    assert {c for c, v in detected.items() if v == "1.0"} == drifted


# --- the page in headless Chromium -------------------------------------------------------------

CHARTS = ["chart-ttft", "chart-itl", "chart-e2e", "chart-requests-per-min", "chart-tokens-per-s",
          "chart-error-rate", "chart-safety", "chart-feedback", "chart-rating"]


@pytest.fixture
def page(browser):
    """A fresh page; JavaScript errors on it fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _open(page, url: str) -> dict:
    """Load the dashboard; the summary JSON the page rendered."""
    with page.expect_response(lambda r: "/api/summary" in r.url) as response:
        page.goto(url)
    return response.value.json()


def _card(page, name: str):
    return page.locator(f"#card-{name}")


def _check_cards(page, totals: dict) -> None:
    from playwright.sync_api import expect

    expect(_card(page, "requests")).to_have_text(f"{totals['requests']:,}")
    for name, key in [("error-rate", "error_rate"), ("tokens-per-s", "tokens_per_s"),
                      ("thumbs-up", "thumbs_up"), ("thumbs-down", "thumbs_down")]:
        assert float(_card(page, name).get_attribute("data-value")) == totals[key]
    assert float(_card(page, "e2e-p50").get_attribute("data-value")) == totals["e2e_ms"]["p50"]
    assert float(_card(page, "e2e-p99").get_attribute("data-value")) == totals["e2e_ms"]["p99"]
    expect(_card(page, "error-rate")).to_have_text(f"{totals['error_rate'] * 100:.2f}%")
    expect(_card(page, "thumbs-up")).to_have_text(str(totals["thumbs_up"]))


def _save_screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=path, full_page=True)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    if os.environ.get("LLMFORGE_SCREENSHOT_DIR"):  # a copy for people to look at
        out = Path(os.environ["LLMFORGE_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / name)
    return path


def test_page_renders_the_api_numbers_and_the_drift(server, page, tmp_path):
    from playwright.sync_api import expect

    summary = _open(page, server)
    expect(page.locator("body")).to_have_attribute("data-hours", "24")
    for chart in CHARTS:
        svg = page.locator(f"#{chart}")
        expect(svg).to_have_attribute("data-state", "ready")
        assert int(svg.get_attribute("data-points")) > 0, chart
        assert svg.locator("path.line, rect[data-series]").count() > 0, chart
    for chart in ("chart-ttft", "chart-itl", "chart-e2e"):
        lines = page.locator(f"#{chart} path.line")
        expect(lines).to_have_count(3)  # p50, p90, p99
        assert len(re.findall(r"[ML]", lines.first.get_attribute("d"))) > 20
    assert page.locator("#chart-safety rect[data-series]").count() == sum(
        1 for f in summary["safety_flags"] for n in summary["series"]["safety"][f] if n)
    _check_cards(page, summary["totals"])
    expect(page.locator("#safety-table thead th")).to_have_text(["", "v1", "v2"])
    expect(page.locator("#safety-table tbody tr")).to_have_count(2 + 3)  # requests, any, flags
    for version in summary["safety_by_version"]:
        for flag in summary["safety_flags"]:
            entry = version["flags"].get(flag, {"count": 0, "rate": 0})
            expect(page.locator(f'#safety-table tr[data-row="{flag}"] '
                                f'td[data-version="{version["model_version"]}"]')).to_have_text(
                f"{entry['count']} ({entry['rate'] * 100:.1f}%)")

    expect(page.locator("body")).to_have_attribute("data-drift", "ready")
    drift = _get(f"{server}/api/drift").json()  # cached: the report the page got
    rows = page.locator("#drift-table tbody tr")
    expect(rows).to_have_count(len(drift["columns"]))
    for column in drift["columns"]:
        row = page.locator(f'#drift-table tr[data-column="{column["name"]}"]')
        expect(row).to_have_attribute("data-drifted", str(column["drifted"]).lower())
    for name in PLANTED:
        row = page.locator(f'#drift-table tr[data-column="{name}"]')
        expect(row).to_have_class("drifted")
        expect(row.locator(".badge")).to_have_text("yes")
    expect(page.locator("#drift-meta")).to_contain_text("drifting since")
    expect(page.locator('#drift-table tr[data-column="language"]')).to_contain_text("→")
    _save_screenshot(page, tmp_path, "dashboard.png")

    with page.expect_response(lambda r: "/api/summary?hours=1" in r.url) as response:
        page.click("#range button[data-hours='1']")
    hour = response.value.json()
    expect(page.locator("body")).to_have_attribute("data-hours", "1")
    assert hour["totals"]["requests"] != summary["totals"]["requests"]
    _check_cards(page, hour["totals"])
    expect(page.locator("#range button[data-hours='1']")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#chart-e2e")).to_have_attribute("data-state", "ready")
    assert len(hour["buckets"]["start"]) in (60, 61)
    _save_screenshot(page, tmp_path, "dashboard_1h.png")

    with page.expect_response(lambda r: "/api/summary?hours=168" in r.url) as response:
        page.click("#range button[data-hours='168']")
    week = response.value.json()
    expect(page.locator("body")).to_have_attribute("data-hours", "168")
    _check_cards(page, week["totals"])
    assert week["totals"]["requests"] == N_REQUESTS and week["bucket_seconds"] == 3 * 3600
    expect(page.locator("#chart-e2e")).to_have_attribute("data-state", "ready")
    expect(page.locator("#bucket-note")).to_have_text("3-hour buckets")
    _save_screenshot(page, tmp_path, "dashboard_7d.png")


def test_page_shows_no_data_for_an_empty_range(server, page, tmp_path):
    from playwright.sync_api import expect

    until = NOW
    empty = _jsonable({**summarize([], [], since=until - timedelta(hours=24), until=until),
                       "hours": 24, "model_version": None})
    page.route("**/api/summary*", lambda route: route.fulfill(json=empty))
    page.goto(server)
    expect(page.locator("body")).to_have_attribute("data-hours", "24")
    for chart in CHARTS:
        svg = page.locator(f"#{chart}")
        expect(svg).to_have_attribute("data-state", "empty")
        expect(svg.locator("text.empty")).to_contain_text("no ")
    expect(_card(page, "requests")).to_have_text("0")
    expect(_card(page, "e2e-p50")).to_have_text("–")
    expect(page.locator("#safety-table")).to_contain_text("no requests")
    _save_screenshot(page, tmp_path, "dashboard_empty.png")
