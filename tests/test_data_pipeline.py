"""The data pipeline as a whole: sharding, executors, resume after a kill, bad input, dedup."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llmforge.config import load_recipe
from llmforge.data import DataConfig, curate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT = SHARED / "wikitext-2-raw" / "wiki.test.raw"
WEB_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "web-data.yaml"
STEPS = ["clean", "length", "gopher_repetition", "gopher_quality", "exact_dedup",
         "minhash_dedup", "pii"]


def wiki_articles() -> list[str]:
    if not WIKITEXT.is_file():
        pytest.skip(f"shared data not found at {WIKITEXT}")
    articles, current = [], []
    for line in WIKITEXT.read_text(encoding="utf-8").splitlines():
        if line.startswith(" = ") and not line.startswith(" = = ") and current:
            articles.append("\n".join(current))
            current = []
        current.append(line)
    return [*articles, "\n".join(current)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~2.4 MB of JSONL: wikitext articles, exact copies and near copies (some words changed)."""
    articles = wiki_articles()
    path = tmp_path_factory.mktemp("corpus") / "wiki.jsonl"
    with open(path, "w") as f:
        for rep in range(2):
            for i, text in enumerate(articles):
                if rep == 1 and i % 3 == 0:
                    text = text.replace(" the ", " a ", 3)  # a near copy
                elif rep == 1 and i % 3 == 1:
                    continue
                f.write(json.dumps({"text": text + f"\nContact: editor{i}@example.org"}) + "\n")
    return path


def table(out: Path):
    return pq.read_table(out / "documents")


def test_shards_and_workers_do_not_change_the_result(corpus, tmp_path):
    one = curate(DataConfig(source=str(corpus), steps=STEPS, workers=1, shard_mb=64),
                 tmp_path / "one")
    many = curate(DataConfig(source=str(corpus), steps=STEPS, workers=2, shard_mb=1),
                  tmp_path / "many")
    assert len(list((tmp_path / "many" / "documents").glob("*.parquet"))) > 1
    assert table(tmp_path / "one").equals(table(tmp_path / "many"))
    assert one["dropped"] == many["dropped"] and one["kept"] == many["kept"]
    assert one["read"] == one["kept"] + sum(one["dropped"].values())
    assert one["dropped"]["duplicate"] > 0 and one["dropped"]["near_duplicate"] > 0
    texts = table(tmp_path / "one")["text"].to_pylist()
    assert all("@example.org" not in t for t in texts) and any("<EMAIL>" in t for t in texts)
    funnel = {s["step"]: s for s in one["funnel"]}
    assert funnel["pii"]["modified"] == funnel["pii"]["kept"]  # every document had an email


def test_survivor_is_the_first_in_input_order(corpus, tmp_path):
    curate(DataConfig(source=str(corpus), steps=["exact_dedup", "minhash_dedup"], workers=1),
           tmp_path)
    rejects = pq.read_table(tmp_path / "rejects").to_pylist()
    kept = set(table(tmp_path)["id"].to_pylist())
    assert rejects
    for r in rejects:
        first = r["detail"].rsplit(" ", 1)[-1]
        assert first in kept and int(first.split(":")[-1]) < int(r["id"].split(":")[-1])


@pytest.mark.slow
def test_ray_executor_matches_local(corpus, tmp_path):
    pytest.importorskip("ray")
    cfg = dict(source=str(corpus), steps=STEPS, workers=2, shard_mb=1)
    curate(DataConfig(**cfg), tmp_path / "local")
    curate(DataConfig(**cfg, executor="ray"), tmp_path / "ray")
    assert table(tmp_path / "local").equals(table(tmp_path / "ray"))


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(corpus, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"name": "kill", "data": {
        "source": str(corpus), "steps": load_recipe(WEB_RECIPE).data.steps, "workers": 1,
        "shard_mb": 1}}))
    cmd = [sys.executable, "-m", "llmforge", "data", str(recipe)]
    work = tmp_path / "runs" / "kill" / "data" / "work"
    proc = subprocess.Popen([*cmd, f"run_dir={tmp_path / 'runs'}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(work.glob("seg0/stats-*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before_kill = sorted(p.name for p in work.glob("seg*/stats-*.json"))
    assert finished_before_kill and not (work.parent / "summary.json").exists()
    subprocess.run([*cmd, f"run_dir={tmp_path / 'runs'}"], check=True, capture_output=True)
    subprocess.run([*cmd, f"run_dir={tmp_path / 'clean'}"], check=True, capture_output=True)
    resumed, clean = tmp_path / "runs/kill/data", tmp_path / "clean/kill/data"
    assert table(resumed).equals(table(clean))
    summary = json.loads((resumed / "summary.json").read_text())
    expected = json.loads((clean / "summary.json").read_text())
    assert summary["funnel"] == expected["funnel"] and summary["dedup"] == expected["dedup"]
    assert (resumed / "datacard.html").is_file() and (resumed / "datacard.md").is_file()


def test_bad_input_is_counted_and_set_aside(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = "A perfectly ordinary sentence about the weather and the sea. " * 10
    (src / "good.txt").write_text(good)
    (src / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 30)
    (src / "empty.txt").write_text("")
    (src / "huge.txt").write_text("word " * 20_000_000)  # 100 MB, one document
    lines = [json.dumps({"text": good + " jsonl"}), "{not json", json.dumps({"body": "x"}),
             json.dumps({"text": None})]
    (src / "records.jsonl").write_text("\n".join(lines) + "\n")
    whole = gzip.compress(("\n".join(json.dumps({"text": good + str(i)}) for i in range(50))
                           + "\n").encode())
    (src / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    summary = curate(DataConfig(source=str(src), steps=["clean", "length"], workers=1), tmp_path
                     / "out")
    read = {s["step"]: s for s in summary["funnel"]}["read"]["dropped"]
    assert read["invalid_utf8"] == 1 and read["malformed_json"] == 1
    assert read["missing_field"] >= 2 and read["truncated_file"] == 1
    assert summary["dropped"]["too_long"] == 1  # the 100 MB document
    assert summary["dropped"]["empty_after_cleaning"] == 1
    assert summary["read"] == summary["kept"] + sum(summary["dropped"].values())
    rejects = pq.read_table(tmp_path / "out" / "rejects", columns=["id", "reason"]).to_pylist()
    assert len(rejects) == sum(summary["dropped"].values())
    assert summary["kept"] >= 3  # good.txt, the JSONL line, and the gzip's intact prefix


def test_dedup_against_an_earlier_dataset(corpus, tmp_path):
    curate(DataConfig(source=str(corpus), steps=["minhash_dedup"], workers=1), tmp_path / "old")
    index = tmp_path / "old" / "minhash_index.npz"
    assert index.is_file()
    new = tmp_path / "new.jsonl"
    articles = wiki_articles()
    new.write_text("\n".join(json.dumps({"text": a.replace(" of ", " from ", 2)})
                             for a in articles[:5]) + "\n")
    summary = curate(DataConfig(source=str(new), workers=1,
                                steps=[{"minhash_dedup": {"against": str(index)}}]),
                     tmp_path / "new")
    assert summary["dropped"] == {"near_duplicate": 5}
    assert "earlier dataset" in pq.read_table(tmp_path / "new" / "rejects")["detail"][0].as_py()


def test_rejects_can_be_switched_off(corpus, tmp_path):
    curate(DataConfig(source=str(corpus), steps=["exact_dedup"], workers=1,
                      write_rejects=False), tmp_path)
    assert not (tmp_path / "rejects").exists()
