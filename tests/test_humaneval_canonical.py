"""The HumanEval pipeline end to end, without a model: the reference solutions all pass in the
sandbox and a wrong answer to every problem fails, so pass@1 is exactly 1 and 0."""

import gzip
import json

import pytest

from llmforge.eval.benchmarks import evaluate_task
from llmforge.eval.sandbox import run_program
from llmforge.eval.tasks import data_root, load_task

pytestmark = pytest.mark.slow


class Answers:
    """Stands in for a language model: answers each prompt with a fixed completion."""

    def __init__(self, completions: dict[str, str]):
        self.completions = completions

    def generate_until(self, prompts, stop, max_new_tokens):
        return [self.completions[p] for p in prompts]


def sandboxed(program: str, timeout_s: float) -> bool:
    return run_program(program, timeout_s=timeout_s).passed


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    path = data_root() / "humaneval" / "HumanEval.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"HumanEval not found at {path}")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def test_reference_solutions_pass_and_wrong_ones_fail(problems):
    task = load_task("humaneval")
    right = Answers({p["prompt"]: p["canonical_solution"] for p in problems})
    wrong = Answers({p["prompt"]: "    return None\n" for p in problems})
    passed = evaluate_task(right, task, run_code=sandboxed)
    failed = evaluate_task(wrong, task, run_code=sandboxed)
    assert passed.n == failed.n == len(problems) == 164
    assert passed.metrics["pass@1"] == 1.0
    assert failed.metrics["pass@1"] == 0.0
