"""One self-contained HTML report for a run directory `runs/<name>/`.

A recipe may run only some stages, and a killed stage leaves partial files, so every section
renders from whatever files exist and says "not run" otherwise; nothing here raises on a missing
or malformed file. Plots are inline base64 PNGs (Agg, no display needed) so the single file can
be archived or mailed on its own.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any

from jinja2 import Environment
from markupsafe import Markup
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

STAGE_ORDER = ("data", "tokenizer", "tokenize", "pretrain", "sft", "eval")
HIDDEN_KEYS = frozenset({"stage", "fingerprint"})  # bookkeeping that tells a reader nothing


def write_report(root: Path, out: Path | None = None) -> Path:
    """Render the report for run directory `root`; returns the path written."""
    root = Path(root)
    out = Path(out) if out is not None else root / "report.html"
    # autoescape: samples are model output and contain code with `<`
    env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    html = env.from_string(TEMPLATE).render(base_css=Markup(BASE_CSS), **_context(root))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return out


def _context(root: Path) -> dict[str, Any]:
    tokenizer = _summary(root, "tokenizer")
    tokenize = _summary(root, "tokenize")
    evaluation = _read_json(root / "eval" / "eval.json")
    evaluation = evaluation if isinstance(evaluation, dict) else None
    baseline = _number((tokenize or {}).get("unigram_nats"))
    if baseline is None:
        baseline = _number((evaluation or {}).get("unigram_nats"))
    return {
        "title": f"llmforge report: {root.name}",
        "data": _data_section(_summary(root, "data")),
        "tokenizer": _tokenizer_section(tokenizer, tokenize),
        "training": [
            ("Pretraining", "pretrain", _training_section(root / "pretrain", baseline)),
            ("Supervised fine-tuning", "sft", _training_section(root / "sft", None)),
        ],
        "evaluation": _eval_section(evaluation, baseline, tokenizer),
        "samples": _samples_section(evaluation),
        "timings": _timings_section(root),
    }


# ---- reading ---------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _summary(root: Path, stage: str) -> dict | None:
    summary = _read_json(root / stage / "summary.json")
    return summary if isinstance(summary, dict) else None


def _read_metrics(path: Path) -> list[dict]:
    """Parse metrics.jsonl, skipping lines a killed run left half-written."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else None


def scalar_items(summary: dict | None) -> list[tuple[str, Any]]:
    """The (key, value) pairs worth a table row: scalars only, no bookkeeping."""
    return [
        (key, value)
        for key, value in (summary or {}).items()
        if key not in HIDDEN_KEYS and isinstance(value, str | int | float | bool)
    ]


def _series(records: list[dict], key: str) -> list[tuple[float, float]]:
    points = ((_number(r.get("step")), _number(r.get(key))) for r in records)
    return [(step, value) for step, value in points if step is not None and value is not None]


def fmt(value: Any) -> str:
    """Numbers as a reader wants them: thousands separators, four significant digits."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.1f}"
    return f"{value:.4g}"


# ---- plots -----------------------------------------------------------------------------------


def png_base64(fig: Figure) -> str:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _funnel_plot(read: float, dropped: dict[str, float], kept: float) -> str:
    """Rows remaining after each filter in the order they ran, so the costly filter stands out."""
    labels, values, left = ["read"], [read], read
    for reason, count in dropped.items():
        left -= count
        labels.append(f"after {reason}")
        values.append(left)
    labels.append("kept")
    values.append(kept)
    fig = Figure(figsize=(7, 0.45 * len(labels) + 1), layout="constrained")
    ax = fig.subplots()
    ax.barh(labels, values, color="#4c72b0")
    ax.invert_yaxis()
    ax.set_xlabel("documents")
    for y, value in enumerate(values):
        ax.text(value, y, f" {fmt(value)}", va="center", fontsize=8)
    ax.margins(x=0.15)
    return png_base64(fig)


def _loss_plot(records: list[dict], baseline: float | None) -> str | None:
    train, val = _series(records, "loss"), _series(records, "val_loss")
    if not train and not val:
        return None
    fig = Figure(figsize=(7, 3.5), layout="constrained")
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss", ms=3)
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="gray", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return png_base64(fig)


def _lr_plot(records: list[dict]) -> str | None:
    lr = _series(records, "lr")
    if not lr:
        return None
    fig = Figure(figsize=(7, 2), layout="constrained")
    ax = fig.subplots()
    ax.plot(*zip(*lr, strict=True), color="#dd8452", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    return png_base64(fig)


# ---- sections (None means the stage did not run) ---------------------------------------------


def _data_section(summary: dict | None) -> dict | None:
    if summary is None:
        return None
    read, kept = _number(summary.get("read")), _number(summary.get("kept"))
    raw = summary.get("dropped")
    dropped = {str(k): n for k, v in (raw if isinstance(raw, dict) else {}).items()
               if (n := _number(v)) is not None}
    drops = [(reason, count, 100 * count / read if read else None)
             for reason, count in dropped.items()]
    plot = _funnel_plot(read, dropped, kept) if read is not None and kept is not None else None
    return {"plot": plot, "drops": drops, "facts": scalar_items(summary)}


def _tokenizer_section(tokenizer: dict | None, tokenize: dict | None) -> list | None:
    pairs = (("tokenizer", tokenizer), ("tokenize", tokenize))
    tables = [(name, scalar_items(s)) for name, s in pairs if s is not None]
    return tables or None


def _training_section(stage_dir: Path, baseline: float | None) -> dict | None:
    records = _read_metrics(stage_dir / "metrics.jsonl")
    summary = _summary(stage_dir.parent, stage_dir.name)
    if not records and summary is None:
        return None
    return {
        "loss_plot": _loss_plot(records, baseline),
        "lr_plot": _lr_plot(records),
        "facts": scalar_items(summary),
        "finished": summary is not None,
    }


def _models(evaluation: dict | None) -> dict[str, dict]:
    models = (evaluation or {}).get("models")
    if not isinstance(models, dict):
        return {}
    return {name: m for name, m in models.items() if isinstance(m, dict)}


def _eval_section(evaluation: dict | None, baseline: float | None,
                  tokenizer: dict | None) -> list | None:
    if evaluation is None:
        return None
    rows = [(name, m.get("val_loss"), m.get("bpb"), m.get("perplexity"))
            for name, m in _models(evaluation).items()]
    if baseline is not None:
        bytes_per_token = _number((tokenizer or {}).get("bytes_per_token"))
        bpb = baseline / math.log(2) / bytes_per_token if bytes_per_token else None
        rows.append(("unigram baseline", baseline, bpb, math.exp(min(baseline, 700))))
    return rows


def _pairs(samples: Any) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from a samples list, ignoring malformed entries."""
    if not isinstance(samples, list):
        return []
    return [(str(s.get("prompt", "")), str(s.get("completion", "")))
            for s in samples if isinstance(s, dict)]


def _samples_section(evaluation: dict | None) -> dict | None:
    """Chat completions aligned by prompt, one column per model, so SFT's effect reads across."""
    models = _models(evaluation)
    if not models:
        return None
    chat = {name: dict(_pairs(m.get("chat_samples"))) for name, m in models.items()}
    columns = [name for name, by_prompt in chat.items() if by_prompt]
    prompts = list(dict.fromkeys(p for name in columns for p in chat[name]))
    return {
        "columns": columns,
        "chat": [(p, [chat[name].get(p) for name in columns]) for p in prompts],
        "plain": [(name, _pairs(m.get("samples"))) for name, m in models.items()],
    }


def _stage_key(name: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER), name)


def _timings_section(root: Path) -> dict | None:
    names = sorted((p.parent.name for p in root.glob("*/summary.json")), key=_stage_key)
    rows = [(name, s) for name in names
            if (s := _number((_summary(root, name) or {}).get("elapsed_s"))) is not None]
    return {"rows": rows, "total": sum(s for _, s in rows)} if rows else None


# The look every llmforge page shares (run report, datacard).
BASE_CSS = """body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ddd; padding: .25em .7em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f8fa; padding: .6em; white-space: pre-wrap; word-break: break-word; }"""

# Start of every llmforge page, up to its own style rules.
PAGE_HEAD = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>
{{ base_css }}
"""

TEMPLATE = PAGE_HEAD + """pre { margin: .3em 0; }
.not-run { color: #888; font-style: italic; }
.tables { display: flex; gap: 2em; flex-wrap: wrap; }
.side { display: grid; grid-template-columns: repeat({{ samples.columns|length
        if samples and samples.columns else 1 }}, 1fr); gap: 1em; }
img { max-width: 100%; }
</style>
</head>
<body>
{%- macro not_run(what) %}<p class="not-run">Not run (no {{ what }}).</p>{% endmacro %}
{%- macro facts(rows) %}
<table>{% for key, value in rows %}
<tr><th>{{ key }}</th><td class="num">{{ value|fmt }}</td></tr>{% endfor %}
</table>
{%- endmacro %}
{%- macro image(png, alt) %}{% if png %}
<img src="data:image/png;base64,{{ png }}" alt="{{ alt }}">{% endif %}{% endmacro %}
<h1>{{ title }}</h1>

<h2 id="data">Data funnel</h2>
{% if data %}{{ image(data.plot, "documents remaining after each filter") }}
{% if data.drops %}<table>
<tr><th>drop reason</th><th>documents</th><th>% of read</th></tr>
{% for reason, count, pct in data.drops %}<tr><td>{{ reason }}</td>
<td class="num">{{ count|fmt }}</td><td class="num">{{ pct|fmt }}</td></tr>
{% endfor %}</table>{% endif %}
{% if data.facts %}{{ facts(data.facts) }}{% endif %}
{% else %}{{ not_run("data/summary.json") }}{% endif %}

<h2 id="tokenizer">Tokenizer</h2>
{% if tokenizer %}<div class="tables">{% for name, rows in tokenizer %}
<div><h3>{{ name }}</h3>{{ facts(rows) }}</div>{% endfor %}</div>
{% else %}{{ not_run("tokenizer/summary.json or tokenize/summary.json") }}{% endif %}

{% for heading, stage, section in training %}
<h2 id="{{ stage }}">{{ heading }}</h2>
{% if section %}{% if not section.finished %}
<p class="not-run">No {{ stage }}/summary.json: the stage did not finish.</p>{% endif %}
{{ image(section.loss_plot, stage ~ " loss") }}
{{ image(section.lr_plot, stage ~ " learning rate") }}
{% if section.facts %}{{ facts(section.facts) }}{% endif %}
{% else %}{{ not_run(stage ~ "/metrics.jsonl or " ~ stage ~ "/summary.json") }}{% endif %}
{% endfor %}

<h2 id="evaluation">Evaluation</h2>
{% if evaluation %}<table>
<tr><th>model</th><th>val loss (nats/token)</th><th>bits per byte</th><th>perplexity</th></tr>
{% for name, loss, bpb, ppl in evaluation %}<tr><td>{{ name }}</td>
<td class="num">{{ loss|fmt }}</td><td class="num">{{ bpb|fmt }}</td>
<td class="num">{{ ppl|fmt }}</td></tr>
{% endfor %}</table>
{% else %}{{ not_run("eval/eval.json") }}{% endif %}

<h2 id="samples">Samples before and after SFT</h2>
{% if samples %}{% for prompt, completions in samples.chat %}
<h3>Prompt</h3><pre>{{ prompt }}</pre>
<div class="side">{% for completion in completions %}
<div><h4>{{ samples.columns[loop.index0] }}</h4>{% if completion is none %}
<p class="not-run">no sample</p>{% else %}<pre>{{ completion }}</pre>{% endif %}</div>
{% endfor %}</div>
{% endfor %}{% for name, pairs in samples.plain %}{% if pairs %}
<h3>{{ name }}: plain prompts</h3>{% for prompt, completion in pairs %}
<pre><b>{{ prompt }}</b>{{ completion }}</pre>{% endfor %}{% endif %}{% endfor %}
{% else %}{{ not_run("eval/eval.json") }}{% endif %}

<h2 id="timings">Stage timings</h2>
{% if timings %}<table>
<tr><th>stage</th><th>seconds</th></tr>
{% for name, seconds in timings.rows %}
<tr><td>{{ name }}</td><td class="num">{{ seconds|fmt }}</td></tr>
{% endfor %}<tr><th>total</th><th class="num">{{ timings.total|fmt }}</th></tr>
</table>
{% else %}{{ not_run("*/summary.json with elapsed_s") }}{% endif %}
</body>
</html>
"""
