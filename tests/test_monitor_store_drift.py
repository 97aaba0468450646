"""`llmforge monitor drift`: the drift report of what a real SQLite request store holds, with the
model's own perplexity on the prompts."""

from __future__ import annotations

import json
from datetime import timedelta

from test_monitor_drift import T0, request_log

from llmforge.cli import main
from llmforge.monitor.store import RequestRecord, RequestStore
from llmforge.monitor.store_drift import PromptPerplexity, prompt_text, store_drift


def fill(url: str, rows: list[dict], chat_every: int = 3) -> None:
    """Store the rows as served requests; every `chat_every`-th one as a chat request."""
    with RequestStore(url) as store:
        for i, row in enumerate(rows):
            chat = i % chat_every == 0
            prompt = [{"role": "user", "content": row["prompt"]}] if chat else row["prompt"]
            store.log(RequestRecord(
                id=f"r{i}", model="m", prompt=prompt, output=row["output"], model_version="v1",
                endpoint="chat.completions" if chat else "completions",
                prompt_tokens=row["prompt_tokens"], completion_tokens=row["completion_tokens"],
                finish_reason=row["finish_reason"], created_at=row["created_at"]))
        # A failed request has no answer to judge: the report leaves it out.
        store.log(RequestRecord(id="failed", model="m", prompt="x", output="", status="error",
                                created_at=rows[-1]["created_at"] - timedelta(hours=1)))
        store.flush()
        assert store.count() == len(rows) + 1


def test_chat_prompts_are_read_as_their_text():
    assert prompt_text({"endpoint": "chat.completions", "prompt": json.dumps(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])}) \
        == "Be brief.\nHi"
    assert prompt_text({"endpoint": "completions", "prompt": "[1, 2]"}) == "[1, 2]"
    assert prompt_text({"endpoint": "chat.completions", "prompt": "not json"}) == "not json"


def test_planted_shift_in_a_store_is_reported_and_fails_the_command(tmp_path, tiny_chat_model,
                                                                     capsys):
    url = f"sqlite:///{tmp_path / 'requests.db'}"
    shift_at = T0 + timedelta(days=7, hours=12)
    fill(url, [*request_log(seed=40, start=T0, days=7, n=300),
               *request_log(seed=41, start=T0 + timedelta(days=7), days=1, n=300,
                            shift_at=shift_at)])
    out = tmp_path / "drift.json"
    code = main(["monitor", "drift", "--store", url, "--reference-days", "7", "--current-days",
                 "1", "--model", str(tiny_chat_model), "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 1, printed
    report = json.loads(out.read_text())
    assert {"prompt_tokens", "language", "refusal", "finish_reason"} <= set(report["drifted"])
    assert report["reference_window"]["rows"] == 300 and report["current_window"]["rows"] == 300
    columns = {c["name"]: c for c in report["columns"]}
    # The model scored the prompts: the perplexity column was tested, not skipped.
    assert columns["prompt_perplexity"]["statistic"] is not None
    assert columns["prompt_perplexity"]["reference_value"] > 1
    # Chat prompts were read as text, so their language was identified.
    assert columns["language"]["reference_value"]["en"] == 1.0
    assert report["since"] is not None and "since" in printed


def test_no_shift_passes_and_perplexity_is_sampled(tmp_path, tiny_chat_model):
    url = f"sqlite:///{tmp_path / 'requests.db'}"
    fill(url, [*request_log(seed=50, start=T0, days=7, n=200),
               *request_log(seed=51, start=T0 + timedelta(days=7), days=1, n=200)])
    assert main(["monitor", "drift", "--store", url]) == 0
    with RequestStore(url) as store:
        report = store_drift(store, perplexity=PromptPerplexity(str(tiny_chat_model)),
                             max_scored=40)
    assert report.drifted == []
    perplexity = {c.name: c for c in report.columns}["prompt_perplexity"]
    assert perplexity.statistic is not None and "40 -> 40 rows" in perplexity.detail
