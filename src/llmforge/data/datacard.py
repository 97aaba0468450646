"""Datacard: what the data stage read, dropped and kept, as Markdown and as one HTML page.

Both files render from the same tables, so they cannot disagree; the HTML adds plots as inline
base64 PNGs (the report's helpers) so it can be archived on its own. A recipe may skip dedup or
language tagging, so each section renders from whatever the summary holds and says when it is
empty instead of failing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment
from markupsafe import Markup
from matplotlib.figure import Figure

from llmforge.report.html import BASE_CSS, PAGE_HEAD, fmt, png_base64, scalar_items

TOP_REASONS = 20
EXAMPLES_SHOWN = 3
OVERVIEW_KEYS = frozenset({"read", "kept", "read_chars", "kept_chars", "kept_words"})
COLORS = ("#4c72b0", "#dd8452")  # kept, dropped


@dataclass
class Table:
    headers: tuple[str, ...]
    rows: list[tuple[str, ...]]
    text_cols: int = 1  # leading label columns; the rest hold numbers and align right
    caption: str = ""


@dataclass
class Section:
    title: str
    note: str = ""
    tables: list[Table] = field(default_factory=list)
    plots: list[tuple[str, str]] = field(default_factory=list)  # (alt text, base64 PNG)
    examples: list[tuple[str, list[dict]]] = field(default_factory=list)  # (step/reason, docs)


def write_datacard(summary: dict, out_dir: Path, *, title: str = "Datacard") -> tuple[Path, Path]:
    """Write `datacard.md` and `datacard.html` into out_dir; returns (markdown, html) paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = [_overview(summary), _funnel(summary), _reasons(summary), _languages(summary),
                _lengths(summary), _dedup(summary)]
    md, html = out_dir / "datacard.md", out_dir / "datacard.html"
    md.write_text(_markdown(title, sections), encoding="utf-8")
    html.write_text(_html(title, sections), encoding="utf-8")
    return md, html


# ---- sections ------------------------------------------------------------------------------


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "—"


def _overview(s: dict) -> Section:
    read, kept = s.get("read", 0), s.get("kept", 0)
    read_chars, kept_chars = s.get("read_chars", 0), s.get("kept_chars", 0)
    rows = [
        ("documents read", fmt(read)),
        ("documents kept", f"{fmt(kept)} ({_pct(kept, read)})"),
        ("documents dropped", f"{fmt(read - kept)} ({_pct(read - kept, read)})"),
        ("characters kept", f"{fmt(kept_chars)} of {fmt(read_chars)} "
                            f"({_pct(kept_chars, read_chars)})"),
        ("words kept", fmt(s.get("kept_words"))),
    ]
    rows += [(key, fmt(value)) for key, value in scalar_items(s) if key not in OVERVIEW_KEYS]
    return Section("Overview", tables=[Table(("measure", "value"), rows)])


def _funnel(s: dict) -> Section:
    funnel = s.get("funnel") or []
    if not funnel:
        return Section("Funnel", note="No per-step counts recorded.")
    headers = ("step", "docs in", "kept", "dropped", "% of in", "chars in", "chars kept",
               "modified")
    return Section("Funnel", note="Steps in pipeline order; 'read' counts records the reader "
                                  "itself rejected.",
                   tables=[Table(headers, [_funnel_row(f) for f in funnel])],
                   plots=[("documents kept and dropped at each step", _funnel_plot(funnel))])


def _funnel_row(f: dict) -> tuple[str, ...]:
    n_in, kept = f.get("in", 0), f.get("kept", 0)
    return (str(f.get("step")), fmt(n_in), fmt(kept), fmt(n_in - kept), _pct(n_in - kept, n_in),
            fmt(f.get("in_chars", 0)), fmt(f.get("kept_chars", 0)), fmt(f.get("modified", 0)))


def _drops(funnel: list[dict]) -> list[tuple[str, str, int]]:
    """(step, reason, count), most frequent first; ties stay in pipeline order."""
    drops = [(str(f.get("step")), str(reason), count)
             for f in funnel for reason, count in (f.get("dropped") or {}).items()]
    return sorted(drops, key=lambda d: -d[2])


def _reasons(s: dict) -> Section:
    drops = _drops(s.get("funnel") or [])
    if not drops:
        return Section("Drop reasons", note="No drop reasons recorded.")
    shown = drops[:TOP_REASONS]
    rows = [(reason, step, fmt(n), _pct(n, s.get("read", 0))) for step, reason, n in shown]
    examples = s.get("examples") or {}
    picked = [(f"{step}/{reason}", [_example(e) for e in examples.get(f"{step}/{reason}", [])])
              for step, reason, _ in shown]
    rest = len(drops) - len(shown)
    return Section("Drop reasons", note=f"{rest} rarer reasons not shown." if rest else "",
                   tables=[Table(("reason", "step", "documents", "% of read"), rows, 2)],
                   examples=[(key, items[:EXAMPLES_SHOWN]) for key, items in picked if items])


def _example(e: Any) -> dict:
    e = e if isinstance(e, dict) else {}
    return {key: str(e.get(key, "")) for key in ("id", "detail", "text")}


def _languages(s: dict) -> Section:
    langs = sorted((s.get("languages") or {}).items(), key=lambda kv: -kv[1])
    if not langs:
        return Section("Languages", note="No language counts recorded.")
    total = sum(n for _, n in langs)
    rows = [(str(lang), fmt(n), _pct(n, total)) for lang, n in langs]
    plot = _bars([str(lang) for lang, _ in langs], {"documents": [n for _, n in langs]},
                 xlabel="language")
    return Section("Languages", note="Of kept documents.",
                   tables=[Table(("language", "documents", "% of kept"), rows)],
                   plots=[("kept documents per language", plot)])


def _short(n: float) -> str:
    for size, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= size:
            return f"{n / size:g}{suffix}"
    return f"{n:g}"


def _bin_label(bins: list[int], i: int) -> str:
    """'1k–3k' for a bin with an upper edge, '≥1M' for the open last one."""
    if i + 1 < len(bins):
        return f"{_short(bins[i])}–{_short(bins[i + 1])}"
    return f"≥{_short(bins[i])}"


def _padded(counts: Any, n: int) -> list[int]:
    counts = list(counts or [])[:n]
    return counts + [0] * (n - len(counts))


def _lengths(s: dict) -> Section:
    bins = list(s.get("length_bins") or [])
    kept = _padded(s.get("kept_lengths"), len(bins))
    dropped = _padded(s.get("dropped_lengths"), len(bins))
    used = [i for i in range(len(bins)) if kept[i] or dropped[i]]
    if not used:
        return Section("Document lengths", note="No document lengths recorded.")
    span = range(used[-1] + 1)  # trailing empty bins (up to 1M chars) would only add noise
    labels = [_bin_label(bins, i) for i in span]
    rows = [(labels[i], fmt(kept[i]), fmt(dropped[i])) for i in span]
    plot = _bars(labels, {"kept": kept[: len(span)], "dropped": dropped[: len(span)]},
                 xlabel="length (characters)")
    return Section("Document lengths", note="Bins are log-spaced, in characters.",
                   tables=[Table(("length (chars)", "kept", "dropped"), rows)],
                   plots=[("kept and dropped documents by length", plot)])


def _dedup(s: dict) -> Section:
    dedup = s.get("dedup") or {}
    exact, near = dedup.get("exact_dedup"), dedup.get("minhash_dedup")
    if exact is None and near is None:
        return Section("Deduplication", note="No dedup step ran.")
    facts = []
    if exact is not None:
        facts += [("exact duplicates removed", fmt(exact.get("duplicates"))),
                  ("unique texts", fmt(exact.get("unique")))]
    if near is not None:
        facts.append(("near-duplicates removed (MinHash)", fmt(near.get("near_duplicates"))))
    section = Section("Deduplication", tables=[Table(("measure", "value"), facts)])
    sizes = sorted((int(k), n) for k, n in ((near or {}).get("cluster_sizes") or {}).items())
    if sizes:
        rows = [(str(k), fmt(n), fmt(k * n)) for k, n in sizes]
        section.tables.append(Table(("cluster size", "clusters", "documents"), rows,
                                    caption="Near-duplicate clusters by size"))
        plot = _bars([str(k) for k, _ in sizes], {"clusters": [n for _, n in sizes]},
                     xlabel="cluster size (documents)", ylabel="clusters")
        section.plots.append(("near-duplicate clusters by size", plot))
    return section


# ---- plots ---------------------------------------------------------------------------------


def _funnel_plot(funnel: list[dict]) -> str:
    """Kept and dropped stacked per step, so the step that costs the most stands out."""
    kept = [f.get("kept", 0) for f in funnel]
    dropped = [f.get("in", 0) - k for f, k in zip(funnel, kept, strict=True)]
    y = range(len(funnel))
    fig = Figure(figsize=(7, 0.45 * len(funnel) + 1.2), layout="constrained")
    ax = fig.subplots()
    ax.barh(y, kept, color=COLORS[0], label="kept")
    ax.barh(y, dropped, left=kept, color=COLORS[1], label="dropped")
    ax.set_yticks(y, [str(f.get("step")) for f in funnel])  # positions: step names may repeat
    ax.invert_yaxis()
    ax.set_xlabel("documents")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1), ncols=2, frameon=False)  # off bars
    return png_base64(fig)


def _bars(labels: list[str], series: dict[str, list], *, xlabel: str,
          ylabel: str = "documents") -> str:
    """Grouped vertical bars, one colour per series."""
    fig = Figure(figsize=(7, 3), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar([x + offset for x in range(len(labels))], values, width, label=name,
               color=COLORS[i % len(COLORS)])
    ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 8 else 0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return png_base64(fig)


# ---- markdown ------------------------------------------------------------------------------


def _markdown(title: str, sections: list[Section]) -> str:
    parts = [f"# {title}"]
    for section in sections:
        parts.append(f"## {section.title}")
        parts += [section.note] if section.note else []
        parts += [_md_table(t) for t in section.tables]
        for key, items in section.examples:
            parts.append(f"### Examples: {_md_code(key)}")
            parts += [_md_example(e) for e in items]
    return "\n\n".join(parts) + "\n"


def _md_table(t: Table) -> str:
    """A GFM table padded to aligned columns, so it also reads as plain text."""
    cells = [[" ".join(str(c).splitlines()).replace("|", "\\|") for c in row]
             for row in [t.headers, *t.rows]]
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(len(t.headers))]
    numeric = [i >= t.text_cols for i in range(len(widths))]

    def line(row: list[str]) -> str:
        padded = (c.rjust(w) if num else c.ljust(w)
                  for c, w, num in zip(row, widths, numeric, strict=True))
        return "| " + " | ".join(padded) + " |"

    rule = line(["-" * (w - 1) + ":" if num else "-" * w
                 for w, num in zip(widths, numeric, strict=True)])
    table = "\n".join([line(cells[0]), rule, *map(line, cells[1:])])
    return f"**{t.caption}**\n\n{table}" if t.caption else table


def _longest_backticks(text: str) -> int:
    return max((len(run) for run in re.findall("`+", text)), default=0)


def _md_code(text: str) -> str:
    """Inline code that survives backticks and newlines in the text."""
    text = " ".join(text.splitlines())
    if not text:
        return "—"
    ticks = "`" * (_longest_backticks(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _md_example(e: dict) -> str:
    fence = "`" * max(3, _longest_backticks(e["text"]) + 1)  # longer than any run inside
    return f"{_md_code(e['id'])}: {_md_code(e['detail'])}\n\n{fence}text\n{e['text']}\n{fence}"


# ---- html ----------------------------------------------------------------------------------


def _html(title: str, sections: list[Section]) -> str:
    # autoescape: excerpts are raw web text and may hold markup
    env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(TEMPLATE).render(base_css=Markup(BASE_CSS), title=title,
                                            sections=sections)


TEMPLATE = PAGE_HEAD + """caption { text-align: left; font-weight: bold; padding: .3em 0; }
pre { margin: .3em 0 1em; }
.note { color: #666; font-style: italic; }
img { max-width: 100%; display: block; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
{% for section in sections %}
<h2>{{ section.title }}</h2>
{% if section.note %}<p class="note">{{ section.note }}</p>{% endif %}
{% for table in section.tables %}
<table>{% if table.caption %}<caption>{{ table.caption }}</caption>{% endif %}
<tr>{% for header in table.headers %}<th>{{ header }}</th>{% endfor %}</tr>
{% for row in table.rows %}<tr>{% for cell in row %}
<td{% if loop.index0 >= table.text_cols %} class="num"{% endif %}>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% endfor %}
{% for alt, png in section.plots %}
<img src="data:image/png;base64,{{ png }}" alt="{{ alt }}">
{% endfor %}
{% for key, items in section.examples %}
<h3>Examples: {{ key }}</h3>
{% for e in items %}<p><code>{{ e.id }}</code>: {{ e.detail }}</p>
<pre>{{ e.text }}</pre>
{% endfor %}{% endfor %}
{% endfor %}
</body>
</html>
"""
