"""The datacard renders every section of a full data-stage summary, and degrades on a bare one."""

from __future__ import annotations

from pathlib import Path

from llmforge.data.datacard import write_datacard

SECTIONS = ("Overview", "Funnel", "Drop reasons", "Languages", "Document lengths",
            "Deduplication")


def _full_summary() -> dict:
    funnel = [
        {"step": "read", "in": 1000, "in_chars": 900_000, "kept": 990, "kept_chars": 899_000,
         "modified": 0, "dropped": {"empty": 10}},
        {"step": "clean", "in": 990, "in_chars": 899_000, "kept": 990, "kept_chars": 880_000,
         "modified": 120, "dropped": {}},
        {"step": "quality", "in": 990, "in_chars": 880_000, "kept": 800, "kept_chars": 850_000,
         "modified": 0, "dropped": {"too_short": 150, "symbol_ratio": 40}},
        {"step": "exact_dedup", "in": 800, "in_chars": 850_000, "kept": 760,
         "kept_chars": 810_000, "modified": 0, "dropped": {"duplicate": 40}},
        {"step": "minhash_dedup", "in": 760, "in_chars": 810_000, "kept": 700,
         "kept_chars": 750_000, "modified": 0, "dropped": {"near_duplicate": 60}},
    ]
    return {
        "read": 1000, "kept": 700, "read_chars": 900_000, "kept_chars": 750_000,
        "kept_words": 123_456, "elapsed_s": 12.5, "run_id": "demo-1",
        "dropped": {"too_short": 150, "near_duplicate": 60, "symbol_ratio": 40,
                    "duplicate": 40, "empty": 10},
        "funnel": funnel,
        "dedup": {"exact_dedup": {"unique": 760, "duplicates": 40},
                  "minhash_dedup": {"near_duplicates": 60,
                                    "cluster_sizes": {"2": 40, "3": 7, "12": 1}}},
        "languages": {"en": 600, "fr": 80, "unknown": 20},
        "length_bins": [0, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000],
        "kept_lengths": [0, 50, 300, 250, 80, 20, 0, 0, 0, 0],
        "dropped_lengths": [160, 40, 60, 30, 10, 0, 0, 0, 0, 0],
        "examples": {
            "quality/too_short": [
                {"id": "doc-1", "detail": "12 words < 50", "text": "<script>alert(1)</script>"},
                {"id": "doc-2", "detail": "3 words < 50", "text": "a | b\n```\nfenced ``` text"},
                {"id": "doc-3", "detail": "9 words < 50", "text": "short"},
                {"id": "doc-4", "detail": "1 word < 50", "text": "fourth is not shown"},
            ],
            "minhash_dedup/near_duplicate": [
                {"id": "doc-9", "detail": "near-duplicate of doc-8", "text": "the same again"},
            ],
        },
    }


def test_full_summary_renders_every_section(tmp_path: Path) -> None:
    md_path, html_path = write_datacard(_full_summary(), tmp_path / "card", title="Demo data")
    assert md_path == tmp_path / "card" / "datacard.md"
    assert html_path == tmp_path / "card" / "datacard.html"
    html = html_path.read_text(encoding="utf-8")
    assert "<title>Demo data</title>" in html
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in html
    assert html.count("<img src=\"data:image/png;base64,") >= 4
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>" not in html
    for number in ("1,000", "700", "70.0%", "123,456", "750,000", "12.5", "demo-1"):
        assert number in html
    assert "1k–3k" in html and "near-duplicate of doc-8" in html
    assert "fourth is not shown" not in html  # three examples per reason at most
    assert "&lt;script&gt;" not in md_path.read_text(encoding="utf-8")


def test_markdown_has_funnel_rows_reasons_and_safe_excerpts(tmp_path: Path) -> None:
    md_path, _ = write_datacard(_full_summary(), tmp_path)
    md = md_path.read_text(encoding="utf-8")
    lines = md.splitlines()
    assert lines[0] == "# Datacard"
    for title in SECTIONS:
        assert f"## {title}" in lines
    row = next(line for line in lines if line.startswith("| quality "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["quality", "990", "800", "190", "19.2%", "880,000", "850,000", "0"]
    reasons = [line.split("|")[1].strip() for line in lines
               if line.split("|")[2:3] and line.split("|")[2].strip() in
               ("read", "quality", "exact_dedup", "minhash_dedup")]
    assert reasons == ["too_short", "near_duplicate", "symbol_ratio", "duplicate", "empty"]
    assert "### Examples: `quality/too_short`" in lines
    assert "````text\na | b\n```\nfenced ``` text\n````" in md  # fence outlasts the backticks
    assert "| 1k–3k" in md and "| 2 " in md  # length bins and cluster sizes
    assert "fourth is not shown" not in md


def test_minimal_summary_says_what_is_missing(tmp_path: Path) -> None:
    summary = {"read": 10, "kept": 10, "dropped": {},
               "funnel": [{"step": "read", "in": 10, "in_chars": 500, "kept": 10,
                           "kept_chars": 500, "modified": 0, "dropped": {}}]}
    md_path, html_path = write_datacard(summary, tmp_path)
    md, html = md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")
    for text in ("No drop reasons recorded.", "No language counts recorded.",
                 "No document lengths recorded.", "No dedup step ran."):
        assert text in md and text in html
    assert html.count("<img ") == 1  # the funnel only
    assert "| read " in md


def test_empty_summary_does_not_fail(tmp_path: Path) -> None:
    md_path, html_path = write_datacard({}, tmp_path)
    assert "No per-step counts recorded." in md_path.read_text(encoding="utf-8")
    assert "<img " not in html_path.read_text(encoding="utf-8")
