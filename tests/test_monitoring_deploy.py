"""deploy/monitoring/: the Prometheus alerting rules and the Grafana dashboard.

promtool (Debian's prometheus package) checks the rules, runs their unit tests, and parses every
dashboard query. Every metric name a rule or a panel queries must be one our processes expose:
a real `llmforge serve` is started and its /metrics read, so a renamed metric breaks this test
instead of silently emptying a panel or disarming an alert.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from llmforge.serve.launch import launch_server

MONITORING = Path(__file__).resolve().parents[1] / "deploy" / "monitoring"
RULES = MONITORING / "prometheus-alerts.yml"
RULE_TESTS = MONITORING / "prometheus-alerts.test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="needs promtool on PATH (Debian: apt-get install prometheus; "
    "`make test` installs it when it can)")

# Names no `llmforge serve` exposes, each with where it comes from:
NOT_FROM_THE_SERVER = {
    "up",  # written by Prometheus itself for every scrape target
    # `llmforge monitor dashboard --store URL` exports these at its own /metrics:
    "llmforge_drift_detected",  # {column}: 1 while that column has drifted
    "llmforge_drift_statistic",  # {column, test}: the drift test's statistic
}
SEVERITIES = {"critical", "warning", "info"}
# The alerts the rules must keep (more may be added).
REQUIRED_ALERTS = {
    "LLMForgeServerDown", "LLMForgeHighErrorRate", "LLMForgeManyRejections",
    "LLMForgeHighTimeToFirstToken", "LLMForgeHighInterTokenLatency", "LLMForgeQueueBackingUp",
    "LLMForgeRequestStoreDropping", "LLMForgeSafetyFlagSpike", "LLMForgeThumbsDownHigh",
    "LLMForgeDriftDetected"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_METRIC = re.compile(r"(?<![\w:$])(llmforge_\w+|up)(?![\w:])")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana label_values() query) reads: ours
    start with llmforge_, plus Prometheus's own `up`. String literals, label matchers and
    grouping clauses are dropped first, so label names and values never count."""
    expr = _STRING.sub('""', expr)
    expr = _MATCHERS.sub("", expr)
    expr = _GROUPING.sub("", expr)
    return set(_METRIC.findall(expr))


def test_metric_names_reads_only_metric_names():
    expr = ('sum by (flag, model_version) (rate(llmforge_safety_flags_total{job=~"$job", '
            'flag=~"prompt:jailbreak|up"}[$__rate_interval])) / on (job) group_left '
            'sum by (job) (rate(llmforge_requests_total[5m])) and up{job="llmforge"} == 0 '
            'and llmforge:recorded:rate5m > 0')
    assert metric_names(expr) == {"llmforge_safety_flags_total", "llmforge_requests_total", "up"}
    assert metric_names("histogram_quantile(0.95, sum by (le) "
                        "(rate(llmforge_time_to_first_token_seconds_bucket[5m])))") == {
        "llmforge_time_to_first_token_seconds_bucket"}


def load_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"]
            for rule in group["rules"]]


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    out = [(f"panel {p['id']} {p['title']!r} target {t['refId']}", t["expr"])
           for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']}", query))
    return out


# --- promtool --------------------------------------------------------------------------------

def promtool(*args: str, cwd: Path = MONITORING) -> str:
    r = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


@needs_promtool
def test_promtool_accepts_the_rules():
    out = promtool("check", "rules", RULES.name)
    assert "SUCCESS" in out
    assert f"{len(load_rules())} rules found" in out


@needs_promtool
def test_promtool_unit_tests_of_the_rules_pass():
    assert "SUCCESS" in promtool("test", "rules", RULE_TESTS.name)


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path):
    """Each panel query, with Grafana's variables filled in, as a recording rule."""
    def grafana_to_promql(expr: str) -> str:
        expr = re.sub(r"\$__(?:rate_)?interval\b|\$\{__(?:rate_)?interval\}", "5m", expr)
        return re.sub(r"\$\{\w+\}|\$\w+", ".*", expr)  # only ever inside a regex matcher

    panels = [(where, q) for where, q in dashboard_queries(load_dashboard())
              if not where.startswith("variable")]
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(q)}
             for i, (_, q) in enumerate(panels)]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"{len(rules)} rules found" in promtool("check", "rules", str(path), cwd=tmp_path)


# --- structure -------------------------------------------------------------------------------

def test_every_alert_has_for_severity_summary_and_description():
    rules = load_rules()
    alerts = [r for r in rules if "alert" in r]
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names)), "alert names repeat"
    assert REQUIRED_ALERTS <= set(names), f"missing alerts: {REQUIRED_ALERTS - set(names)}"
    for rule in rules:
        assert ("alert" in rule) != ("record" in rule), rule
        assert rule["expr"].strip(), rule
    for alert in alerts:
        name = alert["alert"]
        assert re.fullmatch(r"\d+[smh]", str(alert.get("for", ""))), f"{name}: no for:"
        assert alert.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity"
        annotations = alert.get("annotations", {})
        assert annotations.get("summary", "").strip(), f"{name}: no summary"
        assert annotations.get("description", "").strip(), f"{name}: no description"


def test_every_alert_is_seen_firing_in_the_unit_tests():
    fired = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    quiet = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", []) if not case.get("exp_alerts")}
    alerts = {r["alert"] for r in load_rules() if "alert" in r}
    assert alerts <= fired, f"never seen firing: {alerts - fired}"
    # and explicitly quiet (pending, or below the threshold) for the core ones
    assert {"LLMForgeHighErrorRate", "LLMForgeHighTimeToFirstToken",
            "LLMForgeSafetyFlagSpike", "LLMForgeDriftDetected"} <= quiet


def test_dashboard_imports_cleanly_and_every_panel_has_queries():
    d = load_dashboard()
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"]
    assert d["__inputs"][0]["pluginId"] == "prometheus"
    assert 36 <= d["schemaVersion"] <= 41
    assert d["uid"] and d["title"]
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"job", "instance"} <= variables
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        where = f"panel {p['id']} {p.get('title')!r}"
        assert p.get("title"), where
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", where
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0, where
        assert g["x"] + g["w"] <= 24, f"{where} is wider than the dashboard"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{where} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = p["id"]
        if p["type"] == "row":
            continue
        targets = p.get("targets")
        assert targets, f"{where} has no targets"
        refs = [t.get("refId") for t in targets]
        assert all(refs) and len(refs) == len(set(refs)), f"{where}: refIds {refs}"
        for t in targets:
            assert t.get("expr", "").strip(), f"{where} target {t.get('refId')}: no expr"
    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in ("outcome", "error", "first token", "inter-token", "end-to-end", "tokens per",
                  "running", "safety", "feedback", "store", "drift"):
        assert topic in titles, f"no panel about {topic}"


# --- every queried metric is exposed ---------------------------------------------------------

@pytest.fixture(scope="module")
def served_metrics(tiny_chat_model, tmp_path_factory):
    """The metric names a real `llmforge serve --store` exposes after one completion and one
    piece of feedback: every sample name, and from the # TYPE lines every family (a labelled
    counter with no samples yet still has its # HELP and # TYPE lines) with a histogram's
    _bucket, _sum and _count."""
    tmp = tmp_path_factory.mktemp("monitoring_deploy")
    with launch_server(tiny_chat_model, "--store", f"sqlite:///{tmp / 'requests.db'}",
                       threads=1, log=tmp / "server.log") as server:
        model = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
        r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                       json={"model": model, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
        r = httpx.post(f"{server.url}/v1/feedback", timeout=30,
                       json={"id": r.json()["id"], "thumb": -1})
        assert r.status_code == 200, r.text
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
    names, families = set(), set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            families.add(name)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][\w:]*", line).group())
    return names, families


def test_every_queried_metric_is_exposed(served_metrics):
    exposed, _ = served_metrics
    queries = [(f"alert {r.get('alert') or r.get('record')}", r["expr"]) for r in load_rules()]
    queries += dashboard_queries(load_dashboard())
    unknown = {}
    for where, expr in queries:
        used = metric_names(expr)
        assert used, f"{where}: no metric name found in {expr!r}"
        if missing := used - exposed - NOT_FROM_THE_SERVER:
            unknown[where] = sorted(missing)
    assert not unknown, ("queried but not exposed by llmforge serve (nor listed in "
                         f"NOT_FROM_THE_SERVER): {unknown}")


def test_the_dashboard_shows_every_server_metric(served_metrics):
    _, families = served_metrics
    used = set().union(*(metric_names(q) for _, q in dashboard_queries(load_dashboard())))
    # prometheus_client writes each counter's and histogram's creation time as a gauge family
    # of its own, NAME_created: not something to plot
    ours = {f for f in families if f.startswith("llmforge_") and not f.endswith("_created")}
    shown = {f for f in ours if used & {f, f"{f}_bucket", f"{f}_sum", f"{f}_count"}}
    assert ours == shown, f"no panel shows {sorted(ours - shown)}"
