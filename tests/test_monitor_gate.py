"""`llmforge monitor gate NEW OLD`: a model is not worse than itself, and an untrained model is
worse than the same model after it learned the task's sentences."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from llmforge.cli import main
from llmforge.model.io import load_model, save_model
from llmforge.monitor.gate import paired_test
from llmforge.tokenizer import load_tokenizer

SUBJECTS = ["the fox", "a cat", "my dog", "the bird", "an owl", "the cow", "a frog", "the bee"]
ACTIONS = ["jumps over the wall", "sleeps in the sun", "eats the bread", "sings at night",
           "runs to the river", "hides under the bed"]


def sentences() -> list[tuple[str, str]]:
    return [(s, a) for s in SUBJECTS for a in ACTIONS if (SUBJECTS.index(s) + ACTIONS.index(a))
            % 2 == 0]


def train(model_dir, steps: int = 150) -> None:
    """Teach the model every (subject, action) sentence of `sentences`, in place."""
    model = load_model(model_dir)
    tok = load_tokenizer(model_dir / "tokenizer.json")
    rows = [tok.encode(f"{s} {a}.\n").ids for s, a in sentences()]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    targets = ids[:, 1:].clone()
    targets[ids[:, 1:] == 0] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        loss = model(ids[:, :-1], targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_model(model, model_dir)


@pytest.fixture(scope="module")
def models(tiny_chat_model, tmp_path_factory):
    """(untrained, trained, task yaml): the trained model has learned which action goes with
    which subject; the task asks exactly that."""
    tmp = tmp_path_factory.mktemp("gate")
    untrained, trained = tmp / "untrained", tmp / "trained"
    shutil.copytree(tiny_chat_model, untrained)
    shutil.copytree(tiny_chat_model, trained)
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        train(trained)
    rng = random.Random(0)
    items = []
    for subject, action in sentences():
        wrong = rng.choice([a for a in ACTIONS if (subject, a) not in sentences()])
        choices = [action, wrong]
        rng.shuffle(choices)
        items.append(json.dumps({"subject": subject, "choices": choices,
                                 "gold": choices.index(action)}))
    (tmp / "animals.jsonl").write_text("\n".join(items) + "\n")
    task = tmp / "animals.yaml"
    task.write_text("name: animals\ntype: multiple_choice\ndata: animals.jsonl\n"
                    "context: \"{subject}\"\nchoices: choices\ngold: gold\n")
    return untrained, trained, task


def gate(new, old, task, out, *extra) -> tuple[int, dict]:
    code = main(["monitor", "gate", str(new), str(old), "--tasks", str(task), "--limit", "0",
                 "--out", str(out), *extra])
    return code, json.loads((out / "gate.json").read_text())


def test_a_model_passes_against_itself(models, tmp_path, capsys):
    _, trained, task = models
    code, result = gate(trained, trained, task, tmp_path)
    assert code == 0 and result["passed"]
    (animals,) = result["tasks"]
    assert animals["n"] == len(sentences()) and animals["diff"] == 0
    assert "PASS" in capsys.readouterr().out


def test_a_regression_beyond_the_noise_fails(models, tmp_path, capsys):
    untrained, trained, task = models
    code, result = gate(untrained, trained, task, tmp_path)
    (animals,) = result["tasks"]
    assert animals["old"] >= 0.9, "the trained model should know its sentences"
    assert animals["diff"] < -0.2 and animals["p_value"] < 0.05
    assert code == 1 and not result["passed"] and animals["worse"]
    assert "FAIL" in capsys.readouterr().out
    # The other way round is an improvement, which passes.
    code, result = gate(trained, untrained, task, tmp_path / "reverse")
    assert code == 0 and result["tasks"][0]["diff"] > 0.2


def test_noise_alone_does_not_fail_and_a_tolerance_forgives_a_small_drop():
    rng = random.Random(1)
    old = {i: float(rng.random() < 0.6) for i in range(400)}
    # A coin-flip redraw of a fifth of the items: no true change.
    new = {i: float(rng.random() < 0.6) if rng.random() < 0.2 else s for i, s in old.items()}
    assert not paired_test("t", "acc", new, old, alpha=0.05, tolerance=0.0).worse
    # A real drop of 5 points: 20 items of 400 flipped from right to wrong.
    right = [i for i, s in old.items() if s == 1.0][:20]
    dropped = {i: 0.0 if i in right else s for i, s in old.items()}
    assert paired_test("t", "acc", dropped, old, alpha=0.05, tolerance=0.0).worse
    assert not paired_test("t", "acc", dropped, old, alpha=0.05, tolerance=0.06).worse
