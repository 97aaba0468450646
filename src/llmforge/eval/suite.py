"""`llmforge eval --model SPEC --tasks ...`: benchmark any model, and compare two runs.

A run writes `eval.json` (every task's metrics with standard errors, the CORE-like
aggregate), `items/<task>.jsonl` (each item's prompt, scores, prediction and gold, for
inspection) and `report.html`. `--compare A B` reads two such eval.json files and prints the
differences with the standard error of each difference, so a change can be told from noise.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from jinja2 import Environment
from markupsafe import Markup
from matplotlib.figure import Figure

from llmforge.eval.benchmarks import core_score, evaluate_task
from llmforge.eval.lm import LanguageModel
from llmforge.eval.tasks import load_task
from llmforge.report.html import BASE_CSS, PAGE_HEAD, png_base64
from llmforge.serve.chat_model import open_chat_model


def language_model(spec: str, device: str = "cpu", batch_size: int = 16,
                   chat_template: bool = False) -> LanguageModel:
    """Any model `llmforge chat` opens, wrapped for scoring (prefix: BOS, else the first stop)."""
    return LanguageModel.for_chat(open_chat_model(spec, device=device), batch_size, chat_template)


def run_suite(spec: str, tasks: list[str], out_dir: Path, *, limit: int = 0,
              device: str = "cpu", batch_size: int = 16, chat_template: bool = False,
              log=print) -> dict:
    """Evaluate `spec` on each task; write eval.json, items/*.jsonl and report.html."""
    from llmforge.eval.sandbox import run_program

    lm = language_model(spec, device, batch_size, chat_template)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "items").mkdir(exist_ok=True)
    results, summary = [], {}
    specs = [load_task(t) for t in tasks]  # all first: a bad name fails before any scoring
    for task in specs:
        name = task.name
        t0 = time.perf_counter()
        result = evaluate_task(lm, task, limit=limit or None,
                               run_code=lambda src, timeout_s: run_program(
                                   src, timeout_s=timeout_s).passed)
        seconds = time.perf_counter() - t0
        results.append(result)
        with open(out_dir / "items" / f"{name}.jsonl", "w") as f:
            for item in result.items:
                f.write(json.dumps(item) + "\n")
        summary[name] = {"metrics": result.metrics, "stderr": result.stderr, "n": result.n,
                         "problems": len(result.problems), "seconds": round(seconds, 1)}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        log(f"{name}: {shown} (n={result.n}, {seconds:.0f}s)")
    report = {"model": spec, "limit": limit, "chat_template": chat_template, "tasks": summary}
    if any(r.random_baseline > 0 for r in results):
        report["core"] = core_score(results)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    write_suite_report(report, out_dir / "report.html")
    return report


def compare(a_path: Path, b_path: Path) -> list[dict]:
    """Rows of (task, metric, A, B, B - A, stderr of the difference, |diff| / stderr)."""
    a, b = (json.loads(Path(p).read_text()) for p in (a_path, b_path))
    rows = []
    for task in sorted(set(a["tasks"]) & set(b["tasks"])):
        ta, tb = a["tasks"][task], b["tasks"][task]
        for metric in sorted(set(ta["metrics"]) & set(tb["metrics"])):
            se = math.hypot(ta["stderr"].get(metric, 0.0), tb["stderr"].get(metric, 0.0))
            diff = tb["metrics"][metric] - ta["metrics"][metric]
            rows.append({"task": task, "metric": metric, "a": ta["metrics"][metric],
                         "b": tb["metrics"][metric], "diff": diff, "stderr": se,
                         "z": diff / se if se else (math.inf if diff else 0.0)})
    return rows


def format_comparison(rows: list[dict], a_name: str, b_name: str) -> str:
    lines = [f"A = {a_name}", f"B = {b_name}",
             f"{'task':<16}{'metric':<16}{'A':>9}{'B':>9}{'B - A':>10}{'± se':>9}  note"]
    for r in rows:
        note = "beyond 2 se" if abs(r["z"]) > 2 else ""
        lines.append(f"{r['task']:<16}{r['metric']:<16}{r['a']:>9.4f}{r['b']:>9.4f}"
                     f"{r['diff']:>+10.4f}{r['stderr']:>9.4f}  {note}")
    return "\n".join(lines)


TEMPLATE = PAGE_HEAD + """img { max-width: 100%; }
</style></head><body>
<h1>Evaluation</h1>
<p>{{ report.model }}{% if report.limit %} (first {{ report.limit }} items per task){% endif %}</p>
{% if report.core is defined %}<p>CORE-like aggregate: {{ "%.4f"|format(report.core) }}</p>
{% endif %}
<table><tr><th>task</th><th>metric</th><th>value</th><th>stderr</th><th>n</th></tr>
{% for task, r in report.tasks.items() %}{% for metric, value in r.metrics.items() %}
<tr><td>{{ task }}</td><td>{{ metric }}</td><td class="num">{{ "%.4f"|format(value) }}</td>
<td class="num">{{ "%.4f"|format(r.stderr[metric]) if metric in r.stderr else "" }}</td>
<td class="num">{{ r.n }}</td></tr>
{% endfor %}{% endfor %}
</table>
{% if chart %}<img alt="scores with standard errors" src="data:image/png;base64,{{ chart }}">
{% endif %}
</body></html>
"""


def write_suite_report(report: dict, path: Path) -> Path:
    """A table of every metric with its standard error and a bar chart with error bars."""
    bars = [(f"{task}\n{metric}", value, r["stderr"].get(metric, 0.0))
            for task, r in report["tasks"].items() for metric, value in r["metrics"].items()
            if metric.startswith(("acc", "exact", "pass"))]
    chart = ""
    if bars:
        fig = Figure(figsize=(max(4.0, 1.2 * len(bars)), 3.2))
        ax = fig.add_subplot()
        labels, values, errors = zip(*bars, strict=True)
        ax.bar(range(len(values)), values, yerr=errors, capsize=4, color="#4c78a8")
        ax.set_xticks(range(len(values)), labels, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("score")
        fig.tight_layout()
        chart = png_base64(fig)
    env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    html = env.from_string(TEMPLATE).render(base_css=Markup(BASE_CSS), report=report,
                                            chart=chart, title=f"Evaluation: {report['model']}")
    path.write_text(html)
    return path
