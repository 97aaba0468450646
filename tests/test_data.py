"""The data stage: sources, normalisation, dedup, filters, and full accounting of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmforge.data import DataConfig, curate
from llmforge.data.clean import (
    AlphaFilter,
    GeneratedFilter,
    LengthFilter,
    LongestLineFilter,
    normalise,
)
from llmforge.data.records import Drop
from llmforge.data.sources import STDLIB_EXCLUDED_DIRS, Document, Rejected, read_source

PROSE = "The quick brown fox jumps over the lazy dog while the cat watches from the fence. "


def prose(n: int = 4, tag: str = "") -> str:
    return tag + PROSE * n


def small_cfg(source: Path | str, **overrides: object) -> DataConfig:
    steps = ["clean", "exact_dedup", {"length": {"min_chars": 50}}, "longest_line", "alpha",
             "generated"]
    return DataConfig(source=str(source), steps=steps, workers=1, **overrides)


def read_outputs(out: Path) -> tuple[list[dict], list[dict]]:
    return (pq.read_table(out / "documents").to_pylist(),
            pq.read_table(out / "rejects").to_pylist())


def test_stdlib_corpus_is_large_sorted_and_has_no_tests() -> None:
    records = list(read_source("stdlib"))
    ids = [r.id for r in records]
    assert len(records) > 300
    assert ids == sorted(ids)
    assert all(r.source == "stdlib" for r in records)
    assert not any(set(Path(i).parts[:-1]) & STDLIB_EXCLUDED_DIRS for i in ids)
    assert "json/__init__.py" in ids


def test_stdlib_curate_quick_run(tmp_path: Path) -> None:
    progress: list[tuple[int, int]] = []
    summary = curate(DataConfig(max_docs=40), tmp_path,
                     progress=lambda done, total: progress.append((done, total)))
    assert summary["read"] == 40 == summary["kept"] + sum(summary["dropped"].values())
    assert progress == [(1, 2), (2, 2)]  # one task before exact dedup, one after
    kept, _ = read_outputs(tmp_path)
    assert len(kept) == summary["kept"] > 0
    assert sum(len(r["text"]) for r in kept) == summary["kept_chars"] <= summary["read_chars"]


@pytest.mark.parametrize(("raw", "clean"), [
    ("a\r\nb\rc", "a\nb\nc"),
    ("line   \t\nnext \n", "line\nnext"),
    ("keep\ttab\x00\x07\x1b[0m\x7f", "keep\ttab[0m"),
    ("cafe\u0301", "caf\u00e9"),  # decomposed é -> composed (NFC)
    ("a\n\n\n\n\n\nb", "a\n\n\nb"),  # 5 blank lines -> 2
    ("a\n\n\nb", "a\n\n\nb"),  # 2 blank lines stay
    ("\n \n\n  indented\n\n\n", "  indented"),
    ("lone \ud800surrogate", "lone surrogate"),
    ("", ""),
])
def test_normalise(raw: str, clean: str) -> None:
    assert normalise(raw) == clean
    assert normalise(clean) == clean


@pytest.mark.parametrize(("keep", "good", "bad", "reason"), [
    (LengthFilter(10, 20), "x" * 10, "x" * 9, "too_short"),
    (LengthFilter(10, 20), "x" * 20, "x" * 21, "too_long"),
    (LongestLineFilter(10), "a" * 10 + "\n" + "b" * 10, "short\n" + "b" * 11, "long_line"),
    (AlphaFilter(0.5), "abc 12", "ab 1234", "low_alpha"),
    (AlphaFilter(0.5), "abc 12", " \n ", "low_alpha"),
])
def test_filters(keep, good: str, bad: str, reason: str) -> None:
    doc = Document("d", good, "test")
    assert keep(doc) is doc
    drop = keep(Document("d", bad, "test"))
    assert isinstance(drop, Drop) and drop.reason == reason and drop.detail


def test_exact_dedup_keeps_first_after_normalising(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(prose())
    (data / "b.txt").write_text(prose(tag="other "))
    (data / "c.txt").write_bytes(("\r\n" + prose() + "  \r\n\r\n").encode())  # same once normalised
    (data / "d.txt").write_text(prose())
    summary = curate(small_cfg(data), tmp_path / "out")
    assert (summary["read"], summary["kept"], summary["dropped"]) == (4, 2, {"duplicate": 2})
    kept, dropped = read_outputs(tmp_path / "out")
    assert [r["id"] for r in kept] == ["a.txt", "b.txt"]
    assert [(r["id"], r["detail"]) for r in dropped] == [("c.txt", "same text as a.txt"),
                                                         ("d.txt", "same text as a.txt")]


def write_mixed_folder(data: Path) -> None:
    (data / "sub").mkdir(parents=True)
    (data / "good.txt").write_text(prose(tag="txt "))
    (data / "latin1.txt").write_bytes(prose(tag="caf\xe9 ").encode("latin-1"))
    (data / "notes.md").write_text("not a supported type")
    (data / ".hidden.txt").write_text(prose(tag="hidden "))
    lines = [json.dumps({"text": prose(tag="json one ")}),
             "{not json",
             json.dumps({"body": "no text field"}),
             "",
             json.dumps({"text": 42}),
             json.dumps(["a", "list"]),
             json.dumps({"text": "too short"}),
             json.dumps({"text": prose(tag="txt ")})]  # duplicate of good.txt
    (data / "sub" / "rows.jsonl").write_text("\n".join(lines) + "\n")
    with (data / "sub" / "rows.jsonl").open("ab") as f:
        f.write(b'{"text": "bad \xff byte"}\n')
    pq.write_table(pa.table({"text": [prose(tag="pq one "), None, "1234 5678 " * 10]}),
                   data / "sub" / "table.parquet")
    pq.write_table(pa.table({"content": [prose()]}), data / "sub" / "wrong.parquet")
    (data / "sub" / "corrupt.parquet").write_bytes(b"this is not parquet")


def test_mixed_folder_accounts_for_everything(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_mixed_folder(data)
    summary = curate(small_cfg(data), tmp_path / "out")
    kept, dropped = read_outputs(tmp_path / "out")

    assert summary["read"] == summary["kept"] + sum(summary["dropped"].values()) == 16
    assert sorted(r["id"] for r in kept) == ["good.txt", "sub/rows.jsonl:1", "sub/table.parquet:0"]
    assert {r["id"]: r["reason"] for r in dropped} == {
        "latin1.txt": "invalid_utf8",
        "notes.md": "unsupported_type",
        "sub/corrupt.parquet": "unreadable",
        "sub/rows.jsonl:2": "malformed_json",
        "sub/rows.jsonl:3": "missing_field",
        "sub/rows.jsonl:5": "bad_field_type",
        "sub/rows.jsonl:6": "malformed_json",
        "sub/rows.jsonl:7": "too_short",
        "sub/rows.jsonl:8": "duplicate",
        "sub/rows.jsonl:9": "invalid_utf8",
        "sub/table.parquet:1": "missing_field",
        "sub/table.parquet:2": "low_alpha",
        "sub/wrong.parquet": "missing_column",
    }
    assert sum(summary["dropped"].values()) == len(dropped)
    assert all(r["source"] == str(data) for r in kept + dropped)
    assert all(r["detail"] for r in dropped)


def test_glob_source_and_max_docs(tmp_path: Path) -> None:
    write_mixed_folder(tmp_path / "data")
    records = list(read_source(str(tmp_path / "data" / "**" / "*.jsonl")))
    assert [r.id for r in records][:2] == ["rows.jsonl:1", "rows.jsonl:2"]
    assert isinstance(records[0], Document) and isinstance(records[1], Rejected)
    summary = curate(small_cfg(tmp_path / "data" / "**" / "*.jsonl", max_docs=3), tmp_path / "o")
    assert summary["read"] == 3


def test_parquet_with_invalid_utf8_rejects_only_that_row(tmp_path: Path) -> None:
    raw = b"ok" + b"\xff"
    offsets = pa.py_buffer(pa.array([0, 2, 3], pa.int32()).buffers()[1])
    text = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(raw)])
    pq.write_table(pa.table({"text": text}), tmp_path / "t.parquet")
    records = list(read_source(str(tmp_path / "t.parquet")))
    assert [type(r).__name__ for r in records] == ["Document", "Rejected"]
    assert records[1].reason == "invalid_utf8"


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        curate(DataConfig(source=str(tmp_path / "nowhere")), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="min_chars"):
        DataConfig(steps=[{"length": {"min_chars": 10, "max_chars": 5}}])
    with pytest.raises(ValueError, match="unknown step"):
        DataConfig(steps=["no_such_step"])
    with pytest.raises(ValueError, match="once"):
        DataConfig(steps=["clean", "clean"])


@pytest.mark.parametrize(
    "header",
    [
        "# Auto-generated by Tools/scripts/generate_token.py\n",
        "# This file is generated by mkstringprep.py. DO NOT EDIT.\n",
        '""" Codec cp037 generated from \'CP037.TXT\' with gencodec.py.\n',
    ],
)
def test_generated_filter_drops_files_that_say_so(header):
    assert GeneratedFilter()(Document("d", header + "x = 1\n" * 50, "t")).reason == "generated"


def test_generated_filter_keeps_code_that_merely_mentions_generation():
    text = '"""An abstract syntax tree can be generated by passing a flag."""\n' + "x = 1\n" * 50
    assert isinstance(GeneratedFilter()(Document("d", text, "t")), Document)
    late = "x = 1\n" * 400 + "# auto-generated below\n"  # past the header: not a marker
    assert isinstance(GeneratedFilter()(Document("d", late, "t")), Document)
