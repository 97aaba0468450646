"""Score a `LanguageModel` on a task: multiple choice, generation, code or perplexity.

Scoring follows lm-evaluation-harness (0.4) so numbers are comparable:

- multiple choice: `acc` is the argmax of log P(delimiter + choice | context); `acc_norm`
  divides each log-probability by the choice's length in characters first;
- generative: `exact_match` after extracting the answer (the last `answer_regex` match in the
  output, the first `target_regex` match in the target) and dropping commas, "$", a trailing
  "." and case, as lm-eval's gsm8k "flexible-extract";
- code: pass@k of completions run against the problem's tests by a caller-supplied `run_code`;
- perplexity: word_perplexity, byte_perplexity and bits_per_byte from summed rolling
  log-likelihoods.

Standard errors are lm-eval's `mean_stderr`: sample standard deviation / sqrt(n).
`core_score` averages centred multiple-choice accuracy, (acc - chance) / (1 - chance), as the
DCLM / nanochat CORE metric does.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from llmforge.eval.lm import LanguageModel
from llmforge.eval.tasks import CODE_STOP, TaskSpec, load_records

INVALID = "[invalid]"  # lm-eval's answer when the regex finds nothing


@dataclass
class TaskResult:
    name: str
    metrics: dict[str, float]
    stderr: dict[str, float]
    n: int
    items: list[dict] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)
    random_baseline: float = 0.0

    def as_dict(self, items: bool = False) -> dict:
        out = asdict(self)
        if not items:
            out.pop("items")
        return out


# -- statistics ----------------------------------------------------------------------------


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def mean_stderr(values: list[float]) -> float:
    """Sample standard deviation (n - 1) over sqrt(n); for 0/1 values sqrt(p(1-p)/(n-1))."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = mean(values)
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


# -- answers -------------------------------------------------------------------------------


def extract_answer(text: str, regex: str, *, last: bool = True) -> str:
    """The last (or first) match of `regex` in `text`; with groups, the first non-empty one."""
    if not regex:
        return text
    matches = re.findall(regex, text)
    if not matches:
        return INVALID
    match = matches[-1] if last else matches[0]
    if isinstance(match, tuple):
        match = next((m for m in match if m), match[0])
    return match


def normalize_answer(text: str) -> str:
    """lm-eval gsm8k exact_match: ignore ",", "$", a trailing ".", case; surrounding spaces."""
    text = text.strip()
    text = re.sub(r"(?s).*#### ", "", text)
    text = text.replace(",", "").replace("$", "")
    text = re.sub(r"\.$", "", text)
    return text.strip().lower()


# -- few-shot ------------------------------------------------------------------------------


def _example(spec: TaskSpec, rec: dict) -> str:
    if spec.type == "multiple_choice":
        return rec["context"] + spec.target_delimiter + rec["choices"][rec["gold"]]
    return rec["prompt"] + spec.target_delimiter + rec["target"]


def _same(a: dict, b: dict, same_file: bool) -> bool:
    if same_file:
        return a["line"] == b["line"]
    return {k: v for k, v in a.items() if k != "line"} == {k: v for k, v in b.items()
                                                          if k != "line"}


def fewshot_contexts(spec: TaskSpec, items: list[dict], pool: list[dict],
                     same_file: bool) -> list[str]:
    """Each item's prefix of `num_fewshot` solved examples (never the item itself)."""
    k = spec.num_fewshot
    if not k:
        return [""] * len(items)
    if len(pool) - (1 if same_file else 0) < k:
        raise ValueError(f"task {spec.name!r}: {k}-shot needs more than {len(pool)} examples")
    rng = random.Random(spec.fewshot_seed)
    prefixes = []
    for item in items:
        drawn = rng.sample(range(len(pool)), min(k + 1, len(pool)))
        shots = [pool[i] for i in drawn if not _same(pool[i], item, same_file)][:k]
        if len(shots) < k:  # every draw but one was a copy of the item: take the rest in order
            shots += [r for r in pool if not _same(r, item, same_file)
                      and r not in shots][: k - len(shots)]
        prefixes.append("".join(_example(spec, r) + spec.fewshot_delimiter for r in shots))
    return prefixes


# -- evaluation ----------------------------------------------------------------------------


def evaluate_task(lm: LanguageModel, spec: TaskSpec, *,
                  run_code: Callable[[str, float], bool] | None = None,
                  limit: int | None = None) -> TaskResult:
    """Score `lm` on the first `limit` items (default spec.limit; 0 = all) of the task."""
    records, problems = load_records(spec)
    limit = spec.limit if limit is None else limit
    items = records[:limit] if limit else records
    if not items:
        raise ValueError(f"task {spec.name!r} has no scorable records "
                         f"({len(problems)} problems)")
    if spec.num_fewshot:
        same_file = not spec.fewshot_split
        pool = records if same_file else load_records(spec, spec.fewshot_split)[0]
        prefixes = fewshot_contexts(spec, items, pool, same_file)
    else:
        prefixes = [""] * len(items)
    score = {"multiple_choice": _multiple_choice, "generative": _generative,
             "perplexity": _perplexity}
    if spec.type == "code":
        if run_code is None:
            raise ValueError(f"code task {spec.name!r} needs run_code(program, timeout_s)")
        result = _code(lm, spec, items, run_code)
    else:
        result = score[spec.type](lm, spec, items, prefixes)
    result.problems = problems
    return result


def _multiple_choice(lm: LanguageModel, spec: TaskSpec, items: list[dict],
                     prefixes: list[str]) -> TaskResult:
    requests = [(prefix + it["context"], spec.target_delimiter + choice)
                for prefix, it in zip(prefixes, items, strict=True) for choice in it["choices"]]
    scores = lm.loglikelihood(requests)
    out, start = [], 0
    for prefix, it in zip(prefixes, items, strict=True):
        n = len(it["choices"])
        lls = [s.logprob for s in scores[start : start + n]]
        start += n
        normed = [ll / len(c) for ll, c in zip(lls, it["choices"], strict=True)]
        pred = max(range(n), key=lambda i: lls[i])  # first maximum, as np.argmax
        pred_norm = max(range(n), key=lambda i: normed[i])
        out.append({"line": it["line"], "prompt": prefix + it["context"],
                    "choices": it["choices"], "logprobs": lls, "gold": it["gold"],
                    "prediction": pred, "prediction_norm": pred_norm,
                    "correct": pred == it["gold"], "correct_norm": pred_norm == it["gold"]})
    acc = [float(o["correct"]) for o in out]
    acc_norm = [float(o["correct_norm"]) for o in out]
    return TaskResult(spec.name, {"acc": mean(acc), "acc_norm": mean(acc_norm)},
                      {"acc": mean_stderr(acc), "acc_norm": mean_stderr(acc_norm)}, len(out),
                      out, random_baseline=mean([1 / len(it["choices"]) for it in items]))


def _generative(lm: LanguageModel, spec: TaskSpec, items: list[dict],
                prefixes: list[str]) -> TaskResult:
    prompts = [prefix + it["prompt"] for prefix, it in zip(prefixes, items, strict=True)]
    outputs = lm.generate_until(prompts, stop=spec.stop, max_new_tokens=spec.max_new_tokens)
    out = []
    for prompt, output, it in zip(prompts, outputs, items, strict=True):
        pred = normalize_answer(extract_answer(output, spec.answer_regex, last=True))
        gold = extract_answer(it["target"], spec.target_regex, last=False)
        gold = normalize_answer(it["target"] if gold == INVALID else gold)
        out.append({"line": it["line"], "prompt": prompt, "output": output,
                    "prediction": pred, "gold": gold, "correct": pred == gold})
    em = [float(o["correct"]) for o in out]
    return TaskResult(spec.name, {"exact_match": mean(em)}, {"exact_match": mean_stderr(em)},
                      len(out), out)


def _code(lm: LanguageModel, spec: TaskSpec, items: list[dict],
          run_code: Callable[[str, float], bool]) -> TaskResult:
    from llmforge.eval.passk import pass_at_k

    prompts = [it["prompt"] for it in items for _ in range(spec.n_samples)]
    completions = lm.generate_until(prompts, stop=spec.stop or CODE_STOP,
                                    max_new_tokens=spec.max_new_tokens)
    out = []
    for i, it in enumerate(items):
        samples = completions[i * spec.n_samples : (i + 1) * spec.n_samples]
        passed = [bool(run_code(it["prompt"] + c + "\n" + it["test"]
                                + f"\ncheck({it['entry_point']})\n", float(spec.timeout_s)))
                  for c in samples]
        out.append({"line": it["line"], "task_id": it.get("task_id", ""),
                    "prompt": it["prompt"], "completions": samples, "passed": passed,
                    **{f"pass@{k}": pass_at_k(spec.n_samples, sum(passed), k)
                       for k in spec.k}})
    metrics = {f"pass@{k}": mean([o[f"pass@{k}"] for o in out]) for k in spec.k}
    stderr = {f"pass@{k}": mean_stderr([o[f"pass@{k}"] for o in out]) for k in spec.k}
    return TaskResult(spec.name, metrics, stderr, len(out), out)


def _perplexity(lm: LanguageModel, spec: TaskSpec, items: list[dict],
                prefixes: list[str]) -> TaskResult:
    texts = [it["text"] for it in items]
    scores = lm.loglikelihood_rolling(texts)
    out = [{"line": it["line"], "logprob": s.logprob, "n_tokens": s.n_tokens,
            "words": len(re.split(r"\s+", t)), "bytes": len(t.encode("utf-8"))}
           for it, t, s in zip(items, texts, scores, strict=True)]
    nats = -sum(o["logprob"] for o in out)
    words = sum(o["words"] for o in out)
    n_bytes = sum(o["bytes"] for o in out)
    metrics = {"word_perplexity": math.exp(nats / words),
               "byte_perplexity": math.exp(nats / n_bytes),
               "bits_per_byte": nats / n_bytes / math.log(2)}
    return TaskResult(spec.name, metrics, {}, len(out), out)


def core_score(results: list[TaskResult]) -> float:
    """Mean centred accuracy over multiple-choice results (acc_norm where present).

    Each task's accuracy is rescaled so chance is 0 and perfect is 1:
    (acc - random_baseline) / (1 - random_baseline). Other task types are ignored.
    """
    centred = []
    for r in results:
        if "acc" not in r.metrics:
            continue
        acc = r.metrics.get("acc_norm", r.metrics["acc"])
        centred.append((acc - r.random_baseline) / (1 - r.random_baseline))
    if not centred:
        raise ValueError("core_score needs at least one multiple-choice result")
    return mean(centred)
