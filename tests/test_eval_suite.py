"""`llmforge eval --model/--compare`: comparison arithmetic and the written report."""

import json
import math

import pytest

from llmforge.cli import main
from llmforge.eval.suite import compare, format_comparison, write_suite_report


def eval_json(path, acc, se, n=100):
    path.mkdir(parents=True, exist_ok=True)
    report = {"model": str(path), "limit": 0, "core": 0.1, "tasks": {
        "arc_easy": {"metrics": {"acc": acc, "acc_norm": acc + 0.01},
                     "stderr": {"acc": se, "acc_norm": se}, "n": n, "problems": 0},
        "only_in_a": {"metrics": {"acc": 0.5}, "stderr": {"acc": 0.05}, "n": n, "problems": 0}}}
    (path / "eval.json").write_text(json.dumps(report))
    return path


def test_compare_gives_differences_with_their_standard_errors(tmp_path, capsys):
    a = eval_json(tmp_path / "a", 0.50, 0.03)
    b = eval_json(tmp_path / "b", 0.62, 0.04)
    b_json = json.loads((b / "eval.json").read_text())
    del b_json["tasks"]["only_in_a"]
    (b / "eval.json").write_text(json.dumps(b_json))
    rows = compare(a / "eval.json", b / "eval.json")
    assert [(r["task"], r["metric"]) for r in rows] == [("arc_easy", "acc"),
                                                         ("arc_easy", "acc_norm")]
    assert rows[0]["diff"] == pytest.approx(0.12)
    assert rows[0]["stderr"] == pytest.approx(0.05)  # sqrt(0.03^2 + 0.04^2)
    assert rows[0]["z"] == pytest.approx(2.4)
    assert "beyond 2 se" in format_comparison(rows, "a", "b")
    assert main(["eval", "--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "+0.1200" in out and "0.0500" in out


def test_compare_without_stderr_is_infinite_only_when_different(tmp_path):
    a = eval_json(tmp_path / "a", 0.5, 0.0)
    b = eval_json(tmp_path / "b", 0.5, 0.0)
    assert compare(a / "eval.json", b / "eval.json")[0]["z"] == 0.0
    c = eval_json(tmp_path / "c", 0.6, 0.0)
    assert math.isinf(compare(a / "eval.json", c / "eval.json")[0]["z"])


def test_report_has_the_table_and_a_chart(tmp_path):
    report = json.loads((eval_json(tmp_path / "a", 0.5, 0.03) / "eval.json").read_text())
    html = write_suite_report(report, tmp_path / "report.html").read_text()
    assert "<td>arc_easy</td><td>acc</td>" in html and "0.5000" in html and "0.0300" in html
    assert "data:image/png;base64," in html and "CORE-like aggregate: 0.1000" in html


def test_a_user_task_runs_end_to_end_through_the_cli(tmp_path):
    """One YAML + one JSONL (with a broken line set aside), a tiny model, `llmforge eval`."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from llmforge.model.config import ModelConfig
    from llmforge.model.io import save_model
    from llmforge.model.transformer import Transformer
    from llmforge.tokenizer.bpe import TokenizerConfig, train_tokenizer

    texts = ["The sky is blue. Grass is green. Snow is white.\n"] * 10
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(10)], "text": texts,
                             "source": ["t"] * 10}), tmp_path / "docs.parquet")
    train_tokenizer(TokenizerConfig(vocab_size=280), tmp_path / "docs.parquet",
                    tmp_path / "tok.json")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=280, dim=32, n_layers=1, n_heads=2,
                                    n_kv_heads=1, max_seq_len=64))
    save_model(model, tmp_path / "model")
    shutil.copy(tmp_path / "tok.json", tmp_path / "model" / "tokenizer.json")

    lines = [json.dumps({"q": f"Colour {i}?", "options": ["blue", "green", "white"],
                         "answer": i % 3}) for i in range(12)]
    lines.insert(3, "{not json")
    (tmp_path / "colours.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "colours.yaml").write_text(
        "name: colours\ntype: multiple_choice\ndata: colours.jsonl\n"
        "context: \"Question: {q}\\nAnswer:\"\nchoices: options\ngold: answer\n")
    out = tmp_path / "bench"
    assert main(["eval", "--model", str(tmp_path / "model"), "--tasks",
                 str(tmp_path / "colours.yaml"), "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    task = report["tasks"]["colours"]
    assert task["n"] == 12 and task["problems"] == 1
    assert 0 <= task["metrics"]["acc"] <= 1 and task["stderr"]["acc"] > 0
    assert report["core"] == pytest.approx((task["metrics"]["acc_norm"] - 1 / 3) / (2 / 3))
    items = (out / "items" / "colours.jsonl").read_text().splitlines()
    assert len(items) == 12
    assert (out / "report.html").is_file()


def test_chat_template_scores_and_generates_the_assistant_reply(tiny_chat_model):
    """--chat-template: the context is a user turn, the continuation opens the reply, and
    generation starts from the chat prompt, exactly as the model is served."""
    from llmforge.eval.lm import LanguageModel
    from llmforge.serve.chat_model import open_chat_model
    from llmforge.serve.engine import Engine
    from llmforge.serve.sampling import SamplingParams

    chat = open_chat_model(str(tiny_chat_model))
    plain = LanguageModel.for_chat(chat)
    lm = LanguageModel.for_chat(chat, chat_template=True)
    prompt = chat.format.prompt([{"role": "user", "content": "Say hi"}])
    context, continuation = lm.encode_pair("Say hi\n", " hello world")
    assert context == prompt and continuation == lm.encode("hello world")
    assert plain.encode_pair("Say hi\n", " hello world")[0] != prompt

    [scored] = lm.loglikelihood([("Say hi\n", " hello world")])
    [direct] = plain._score([(prompt, continuation)])
    assert scored.logprob == pytest.approx(direct.logprob, abs=1e-5)

    [generated] = lm.generate_until(["Say hi"], stop=[], max_new_tokens=8)
    engine = Engine(chat.model, chat.tokenizer, stop_ids=chat.stop_ids)
    try:
        [out] = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))
    finally:
        engine.shutdown()
    assert generated == out.choices[0].text
