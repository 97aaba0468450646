"""Benchmark tasks: YAML specs, record loading, few-shot prompts and lm-eval-style scoring."""

import json
import math
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from llmforge.eval.benchmarks import (
    TaskResult,
    core_score,
    evaluate_task,
    extract_answer,
    fewshot_contexts,
    mean_stderr,
    normalize_answer,
)
from llmforge.eval.lm import LanguageModel, Loglikelihood
from llmforge.eval.tasks import TaskSpec, data_root, load_records, load_task
from llmforge.model.config import ModelConfig
from llmforge.model.transformer import Transformer


class ScriptedLM(LanguageModel):
    """Log-probabilities looked up by continuation text; generations by prompt."""

    def __init__(self, logprobs=None, outputs=None):
        self.logprobs = logprobs or {}
        self.outputs = outputs or {}
        self.calls: list = []

    def loglikelihood(self, requests):
        self.calls.append(list(requests))
        return [Loglikelihood(self.logprobs[cont], False, 1) for _, cont in requests]

    def generate_until(self, prompts, stop, max_new_tokens=256):
        self.calls.append(list(prompts))
        return [self.outputs.get(p, "") for p in prompts]


def write_task(tmp_path: Path, rows: list, **spec) -> TaskSpec:
    data = tmp_path / "quiz.jsonl"
    data.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    raw = {"name": "quiz", "type": "multiple_choice", "data": "quiz.jsonl",
           "context": "Q: {q}\nA:", "choices": "choices", "gold": "gold", **spec}
    (tmp_path / "quiz.yaml").write_text(json.dumps(raw))  # JSON is YAML
    return load_task(tmp_path / "quiz.yaml")


# -- multiple choice scoring ---------------------------------------------------------------


def test_multiple_choice_acc_acc_norm_and_stderr(tmp_path):
    rows = [
        # raw argmax is the short "b" (-2); per character the long answer wins (-3/10 > -2/1)
        {"q": "one", "choices": ["b", "aaaaaaaaaa"], "gold": 1},
        {"q": "two", "choices": ["x", "yy"], "gold": 0},
        {"q": "three", "choices": ["p", "qq", "rrr"], "gold": 2},
    ]
    lm = ScriptedLM({" b": -2.0, " aaaaaaaaaa": -3.0, " x": -1.0, " yy": -1.5,
                     " p": -4.0, " qq": -5.0, " rrr": -4.5})
    spec = write_task(tmp_path, rows)
    res = evaluate_task(lm, spec)
    assert len(lm.calls) == 1 and len(lm.calls[0]) == 7  # one batched call
    assert lm.calls[0][0] == ("Q: one\nA:", " b")
    assert [it["prediction"] for it in res.items] == [0, 0, 0]
    assert [it["prediction_norm"] for it in res.items] == [1, 1, 2]
    assert res.metrics["acc"] == pytest.approx(1 / 3)
    assert res.metrics["acc_norm"] == pytest.approx(2 / 3)
    p, n = 1 / 3, 3
    assert res.stderr["acc"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    assert res.stderr["acc_norm"] == pytest.approx(math.sqrt(2 / 3 * (1 / 3) / (n - 1)))
    assert res.random_baseline == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 3)
    assert res.n == 3 and res.problems == []
    assert evaluate_task(lm, spec, limit=1).n == 1


def test_mean_stderr_matches_closed_form():
    values = [1.0] * 7 + [0.0] * 13
    p = 7 / 20
    assert mean_stderr(values) == pytest.approx(math.sqrt(p * (1 - p) / 19))
    assert math.isnan(mean_stderr([1.0]))


# -- specs and records ---------------------------------------------------------------------


@pytest.mark.parametrize("raw, key", [
    ({"name": "t", "type": "ranking", "data": "x.jsonl"}, "type"),
    ({"name": "t", "type": "multiple_choice", "data": "x.jsonl", "context": "{q}",
      "gold": "gold"}, "choices"),
    ({"name": "t", "type": "generative", "data": "x.jsonl", "prompt": "{q}"}, "target"),
    ({"name": "t", "type": "perplexity", "data": "x.txt", "format": "text", "colour": 1},
     "colour"),
    ({"type": "perplexity", "data": "x.txt"}, "name"),
    ({"name": "t", "type": "perplexity", "data": "x.txt", "format": "csv"}, "format"),
])
def test_malformed_yaml_names_the_key(tmp_path, raw, key):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=key):
        load_task(path)


def test_unknown_builtin_name():
    with pytest.raises(ValueError, match="no built-in task"):
        load_task("no_such_task")


def test_bad_records_become_problems_and_the_rest_are_scored(tmp_path):
    rows = [
        {"q": "ok", "choices": ["a", "b"], "gold": 0},
        "{not json",
        {"q": "no choices field", "gold": 0},
        {"q": "gold too big", "choices": ["a", "b"], "gold": 5},
        {"q": "empty", "choices": [], "gold": 0},
        {"choices": ["a", "b"], "gold": 1},  # the template's {q} is missing
        {"q": "ok too", "choices": ["a", "b"], "gold": 1},
    ]
    spec = write_task(tmp_path, rows)
    records, problems = load_records(spec)
    assert [r["line"] for r in records] == [1, 7]
    reasons = {p["line"]: p["reason"] for p in problems}
    assert set(reasons) == {2, 3, 4, 5, 6}
    assert "bad JSON" in reasons[2]
    assert "'choices'" in reasons[3]
    assert "out of range" in reasons[4]
    assert "non-empty" in reasons[5]
    assert "'q'" in reasons[6]
    res = evaluate_task(ScriptedLM({" a": -1.0, " b": -2.0}), spec)
    assert res.n == 2 and res.metrics["acc"] == 0.5 and len(res.problems) == 5


def test_data_root_env_override(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.jsonl").write_text(json.dumps({"q": "x", "a": "1"}) + "\n")
    monkeypatch.setenv("LLMFORGE_DATA_ROOT", str(tmp_path))
    assert data_root() == tmp_path
    spec = TaskSpec.from_dict({"name": "g", "type": "generative", "data": "sub/d.jsonl",
                               "prompt": "{q}", "target": "a"})
    assert load_records(spec)[0][0]["prompt"] == "x"


BUILTIN_COUNTS = {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "gsm8k": 1319,
                  "humaneval": 164, "wikitext2": 62}


@pytest.mark.parametrize("name", sorted(BUILTIN_COUNTS))
def test_builtin_tasks_load(name):
    spec = load_task(name)
    path = spec.resolve(spec.data)
    if not path.exists():
        pytest.skip(f"{path} not present")
    records, problems = load_records(spec)
    assert problems == []
    assert len(records) == BUILTIN_COUNTS[name]
    if spec.type == "multiple_choice":
        lm = ScriptedLM()
        lm.loglikelihood = lambda reqs: [Loglikelihood(-float(len(c)), False, 1) for _, c in reqs]
        res = evaluate_task(lm, spec, limit=5)
        assert res.n == 5 and 0 <= res.metrics["acc"] <= 1
    if name == "hellaswag":
        assert not any("[step]" in c or "[title]" in c for r in records for c in r["choices"])
    if name.startswith("arc"):
        assert records[0]["context"].startswith("Question: ")
        assert records[0]["context"].endswith("\nAnswer:")


def test_hellaswag_preprocess():
    from llmforge.eval.tasks import hellaswag_preprocess

    assert hellaswag_preprocess(" How to cook [title] Boil water. [step] Add  salt. ") == \
        "How to cook. Boil water. Add salt."


# -- few-shot ------------------------------------------------------------------------------


def test_fewshot_is_deterministic_and_excludes_the_item(tmp_path):
    rows = [{"q": f"q{i}", "choices": ["no", "yes"], "gold": i % 2} for i in range(6)]
    spec = write_task(tmp_path, rows, num_fewshot=3, fewshot_seed=7)
    records, _ = load_records(spec)
    a = fewshot_contexts(spec, records, records, same_file=True)
    assert a == fewshot_contexts(spec, records, records, same_file=True)
    for rec, prefix in zip(records, a, strict=True):
        assert prefix.count("\n\n") == 3
        assert f"Q: {rec['context'][3:5]}\n" not in prefix  # never the item itself
        assert "Q: q" in prefix and ("A: yes" in prefix or "A: no" in prefix)
    other = write_task(tmp_path, rows, num_fewshot=3, fewshot_seed=8)
    assert fewshot_contexts(other, records, records, same_file=True) != a
    lm = ScriptedLM({" no": -1.0, " yes": -2.0})
    res = evaluate_task(lm, spec)
    assert lm.calls[0][0][0] == a[0] + "Q: q0\nA:"
    assert res.items[0]["prompt"].endswith("\n\nQ: q0\nA:")


def test_fewshot_needs_enough_examples(tmp_path):
    rows = [{"q": f"q{i}", "choices": ["a", "b"], "gold": 0} for i in range(2)]
    spec = write_task(tmp_path, rows, num_fewshot=2)
    with pytest.raises(ValueError, match="2-shot"):
        evaluate_task(ScriptedLM({" a": -1.0, " b": -1.0}), spec)


# -- generative ----------------------------------------------------------------------------


def test_gsm8k_answer_extraction():
    spec = load_task("gsm8k")
    out = extract_answer("So 3 + 4 = 7.\nThe answer is $1,234.", spec.answer_regex)
    assert normalize_answer(out) == "1234"
    target = "She sells 9 eggs.\n#### 1234"
    assert normalize_answer(extract_answer(target, spec.target_regex, last=False)) == "1234"
    assert normalize_answer(extract_answer("#### -3,000", spec.target_regex, last=False)) \
        == "-3000"
    assert extract_answer("no numbers here", spec.answer_regex) == "[invalid]"


def test_generative_exact_match(tmp_path):
    rows = [{"question": "1+1?", "answer": "2\n#### 2"},
            {"question": "10*100?", "answer": "so\n#### 1,000"}]
    data = tmp_path / "g.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gsm = load_task("gsm8k")
    spec = TaskSpec.from_dict({"name": "g", "type": "generative", "data": str(data),
                               "prompt": gsm.prompt, "target": "answer",
                               "answer_regex": gsm.answer_regex,
                               "target_regex": gsm.target_regex, "stop": gsm.stop})
    lm = ScriptedLM(outputs={"Question: 1+1?\nAnswer:": " 1 and 1 make 2.",
                             "Question: 10*100?\nAnswer:": " It is $100."})
    res = evaluate_task(lm, spec)
    assert [it["correct"] for it in res.items] == [True, False]
    assert res.metrics["exact_match"] == 0.5 and res.random_baseline == 0


# -- code ----------------------------------------------------------------------------------


def _ensure_passk(monkeypatch):
    try:
        import llmforge.eval.passk  # noqa: F401
    except ImportError:
        fake = types.ModuleType("llmforge.eval.passk")

        def pass_at_k(n, c, k):
            return 1.0 if n - c < k else 1.0 - math.prod(1 - k / i for i in range(n - c + 1,
                                                                                    n + 1))
        fake.pass_at_k = pass_at_k
        monkeypatch.setitem(sys.modules, "llmforge.eval.passk", fake)


def test_code_task_with_fake_runner(tmp_path, monkeypatch):
    _ensure_passk(monkeypatch)
    rows = [{"task_id": f"T/{i}", "prompt": f"def f{i}(x):\n", "test": "def check(f): pass",
             "entry_point": f"f{i}"} for i in range(3)]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = TaskSpec.from_dict({"name": "c", "type": "code", "data": str(data),
                               "prompt": "{prompt}", "test": "test",
                               "entry_point": "entry_point", "timeout_s": 3})
    lm = ScriptedLM(outputs={"def f0(x):\n": "    return x", "def f1(x):\n": "    return",
                             "def f2(x):\n": "    return x"})
    programs = []

    def run_code(program, timeout_s):
        programs.append((program, timeout_s))
        return "return x" in program

    res = evaluate_task(lm, spec, run_code=run_code)
    assert programs[0] == ("def f0(x):\n    return x\ndef check(f): pass\ncheck(f0)\n", 3.0)
    assert res.metrics["pass@1"] == pytest.approx(2 / 3)
    assert res.stderr["pass@1"] == pytest.approx(math.sqrt(2 / 3 * 1 / 3 / 2))
    with pytest.raises(ValueError, match="run_code"):
        evaluate_task(lm, spec)


# -- perplexity with a real (tiny) model ---------------------------------------------------


def byte_tokenizer() -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|bos|>"])
    return tok


@pytest.mark.usefixtures("one_thread")
def test_perplexity_bits_per_byte_with_tiny_model(tmp_path):
    torch.manual_seed(0)
    tok = byte_tokenizer()
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), dim=32, n_layers=1, n_heads=2,
                      n_kv_heads=1, max_seq_len=16)
    lm = LanguageModel(Transformer(cfg), tok, prefix_id=tok.token_to_id("<|bos|>"))
    text = " = Alpha = \n The first article , naïve café .\n = = Part = = \n More text .\n" \
           " = Beta = \n Second one ü 日本 .\n"
    (tmp_path / "wiki.raw").write_text(text)
    spec = TaskSpec.from_dict({"name": "w", "type": "perplexity", "format": "text",
                               "data": str(tmp_path / "wiki.raw"),
                               "doc_start": load_task("wikitext2").doc_start})
    records, _ = load_records(spec)
    assert [r["text"][:9] for r in records] == [" = Alpha ", " = Beta ="]
    res = evaluate_task(lm, spec)
    docs = [r["text"] for r in records]
    nats = -sum(s.logprob for s in lm.loglikelihood_rolling(docs))
    n_bytes = len("".join(docs).encode("utf-8"))
    assert n_bytes == len(text.encode("utf-8"))
    assert res.metrics["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes)
    assert res.metrics["byte_perplexity"] == pytest.approx(math.exp(nats / n_bytes))
    words = sum(len(re.split(r"\s+", d)) for d in docs)  # lm-eval counts the edge blanks
    assert res.metrics["word_perplexity"] == pytest.approx(math.exp(nats / words))


# -- CORE ----------------------------------------------------------------------------------


def test_core_score_centres_on_chance():
    four = TaskResult("a", {"acc": 0.5, "acc_norm": 0.625}, {}, 10, random_baseline=0.25)
    two = TaskResult("b", {"acc": 0.75}, {}, 10, random_baseline=0.5)
    gen = TaskResult("g", {"exact_match": 0.9}, {}, 10)
    # (0.625 - 0.25) / 0.75 = 0.5 ; (0.75 - 0.5) / 0.5 = 0.5 ; chance -> 0
    assert core_score([four, two, gen]) == pytest.approx(0.5)
    chance = TaskResult("c", {"acc": 0.25, "acc_norm": 0.25}, {}, 10, random_baseline=0.25)
    assert core_score([chance]) == pytest.approx(0.0)
    assert core_score([four, chance]) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        core_score([gen])
