"""Quality gate: is a candidate model worse than the one serving, beyond the noise?

Both models answer the same fixed items, so the test is paired: each item's score difference
(new - old) is averaged, and its standard error is the differences' standard deviation over
sqrt(n). Pairing removes the items' own difficulty from the noise, so it sees a regression an
unpaired comparison of two accuracies (whose standard errors add) would call noise. A task fails
when the one-sided test rejects "new is no worse than old by more than `tolerance`" at `alpha`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from llmforge.eval.suite import run_suite


@dataclass
class TaskGate:
    task: str
    metric: str  # the per-item score compared (higher is better)
    n: int
    old: float
    new: float
    diff: float  # mean of new - old over the paired items
    stderr: float
    p_value: float  # of "no worse than old - tolerance", one-sided
    worse: bool


@dataclass
class GateResult:
    new: str
    old: str
    alpha: float
    tolerance: float
    tasks: list[TaskGate]

    @property
    def passed(self) -> bool:
        return not any(t.worse for t in self.tasks)


def item_scores(items: list[dict]) -> tuple[str, dict[int, float]]:
    """(metric, {item line: score}) for one task's item records, higher is better:
    acc_norm or acc for multiple choice, exact match, pass@1, or log-likelihood per byte."""
    first = items[0]
    if "correct_norm" in first:
        metric, score = "acc_norm", lambda it: float(it["correct_norm"])
    elif "correct" in first:
        metric, score = "acc", lambda it: float(it["correct"])
    elif "pass@1" in first:
        metric, score = "pass@1", lambda it: float(it["pass@1"])
    else:
        metric, score = "logprob_per_byte", lambda it: it["logprob"] / max(it["bytes"], 1)
    return metric, {it["line"]: score(it) for it in items}


def paired_test(task: str, metric: str, new: dict[int, float], old: dict[int, float],
                alpha: float, tolerance: float) -> TaskGate:
    """One-sided paired z-test over the items both runs scored."""
    lines = sorted(set(new) & set(old))
    if not lines:
        raise ValueError(f"{task}: the two evaluations share no items")
    a = np.array([new[i] for i in lines])
    b = np.array([old[i] for i in lines])
    d = a - b
    diff = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    margin = diff + tolerance
    if se > 0:
        p = float(stats.norm.cdf(margin / se))
    else:  # every item moved by the same amount: no noise to weigh it against
        p = 0.0 if margin < 0 else 1.0
    return TaskGate(task, metric, len(d), float(b.mean()), float(a.mean()), diff, se, p,
                    p < alpha)


def _items(out_dir: Path, task: str) -> list[dict]:
    path = out_dir / "items" / f"{task}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_gate(new: str, old: str, tasks: list[str], out_dir: Path, *, limit: int = 500,
             alpha: float = 0.05, tolerance: float = 0.0, batch_size: int = 16,
             device: str = "cpu", log=print) -> GateResult:
    """Evaluate both models on `tasks` (into out_dir/new, out_dir/old), test each task and
    write out_dir/gate.json."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, not {alpha}")
    reports = {}
    for name, spec in (("new", new), ("old", old)):
        log(f"evaluating {name}: {spec}")
        reports[name] = run_suite(spec, tasks, out_dir / name, limit=limit, device=device,
                                  batch_size=batch_size, log=log)
    gates = []
    for task in reports["new"]["tasks"]:
        metric, new_scores = item_scores(_items(out_dir / "new", task))
        _, old_scores = item_scores(_items(out_dir / "old", task))
        gates.append(paired_test(task, metric, new_scores, old_scores, alpha, tolerance))
    result = GateResult(new, old, alpha, tolerance, gates)
    (out_dir / "gate.json").write_text(json.dumps(
        {**asdict(result), "passed": result.passed}, indent=2))
    return result


def format_gate(result: GateResult) -> str:
    lines = [f"new = {result.new}", f"old = {result.old}",
             f"{'task':<16}{'metric':<18}{'n':>6}{'old':>9}{'new':>9}{'new - old':>11}"
             f"{'± se':>8}{'p':>9}  verdict"]
    for t in result.tasks:
        lines.append(f"{t.task:<16}{t.metric:<18}{t.n:>6}{t.old:>9.4f}{t.new:>9.4f}"
                     f"{t.diff:>+11.4f}{t.stderr:>8.4f}{t.p_value:>9.3g}  "
                     f"{'WORSE' if t.worse else 'ok'}")
    tol = f" by more than {result.tolerance:g}" if result.tolerance else ""
    verdict = "PASS" if result.passed else "FAIL"
    lines.append(f"{verdict}: new is {'not ' if result.passed else ''}worse than old{tol} "
                 f"beyond the noise (one-sided paired test, alpha {result.alpha:g} per task)")
    return "\n".join(lines)
