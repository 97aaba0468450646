"""Run directories: dependency order, skipping current stages, reruns, resume after a failure."""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from llmforge.config import to_dict
from llmforge.runs import Runner, Stage, StageContext, fingerprint, read_summary


@dataclass
class Knob:
    value: int = 0


@dataclass
class FakeRecipe:
    run_dir: str
    name: str = "exp"
    a: Knob = field(default_factory=Knob)
    b: Knob = field(default_factory=Knob)
    c: Knob = field(default_factory=Knob)
    side: Knob = field(default_factory=Knob)


class Pipeline:
    """Stages a -> b -> c (plus an independent `side`) that record every call they get."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.contexts: dict[str, StageContext] = {}
        self.fail: set[str] = set()  # stage names that raise (once written a partial file)
        self.seen_partial: dict[str, bool] = {}
        self.stages = {
            "a": Stage("a", "first", (), lambda r: r.a, self._make("a")),
            "b": Stage("b", "second", ("a",), lambda r: r.b, self._make("b")),
            "c": Stage("c", "third", ("b",), lambda r: {"c": r.c, "a": r.a}, self._make("c")),
            "side": Stage("side", "independent", (), lambda r: r.side, self._make("side")),
        }

    def _make(self, name: str):
        def run(ctx: StageContext) -> dict:
            self.calls.append(name)
            self.contexts[name] = ctx
            partial = ctx.dir / "partial.ckpt"
            self.seen_partial[name] = partial.is_file()
            upstream = "".join((ctx.input(d) / "out.txt").read_text() for d in ctx.upstream)
            ctx.metrics(step=1, loss=2.5)
            ctx.metrics(step=2, loss=1.5)
            ctx.log.info(f"running {name}")
            if name in self.fail:
                partial.write_text("half done")
                raise RuntimeError(f"{name} crashed")
            value = getattr(ctx.recipe, name).value
            (ctx.dir / "out.txt").write_text(f"{upstream}{name}{value};")
            return {"value": value}

        return run

    def run(self, recipe: FakeRecipe, targets: list[str], force: tuple[str, ...] = ()) -> dict:
        self.calls.clear()
        return Runner(recipe, self.stages, to_dict).run(targets, force=force)


@pytest.fixture
def pipe() -> Pipeline:
    return Pipeline()


@pytest.fixture
def recipe(tmp_path) -> FakeRecipe:
    return FakeRecipe(run_dir=str(tmp_path / "runs"))


def root(recipe: FakeRecipe) -> Path:
    return Path(recipe.run_dir) / recipe.name


def run_ids(results: dict) -> dict[str, str]:
    return {name: s["run_id"] for name, s in results.items()}


def test_dependencies_run_first_in_order(pipe, recipe):
    results = pipe.run(recipe, ["c"])
    assert pipe.calls == ["a", "b", "c"]
    assert list(results) == ["a", "b", "c"]
    assert (root(recipe) / "c" / "out.txt").read_text() == "a0;b0;c0;"
    assert not (root(recipe) / "side").exists()
    ids = run_ids(results)
    assert len(set(ids.values())) == 3
    summary = read_summary(root(recipe) / "c")
    assert summary == results["c"]
    assert summary["stage"] == "c" and summary["value"] == 0
    assert summary["upstream"] == {"b": ids["b"]}
    assert read_summary(root(recipe) / "a")["upstream"] == {}


def test_plan_orders_and_dedups(pipe, recipe):
    runner = Runner(recipe, pipe.stages, to_dict)
    assert runner.plan(["c", "a", "side", "b"]) == ["a", "b", "c", "side"]
    assert runner.plan(["side", "c"]) == ["side", "a", "b", "c"]


def test_context_points_at_own_and_upstream_dirs(pipe, recipe):
    pipe.run(recipe, ["c"])
    ctx = pipe.contexts["c"]
    assert ctx.name == "c"
    assert ctx.dir == root(recipe) / "c"
    assert ctx.root == root(recipe)
    assert ctx.recipe is recipe
    assert ctx.upstream == {"b": root(recipe) / "b"}
    assert ctx.input("b") == root(recipe) / "b"
    with pytest.raises(KeyError):
        ctx.input("a")  # only declared dependencies are reachable


def test_stage_files_are_written(pipe, recipe):
    pipe.run(recipe, ["b"])
    stage_dir = root(recipe) / "b"
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.5}]
    assert "running b" in (stage_dir / "log.txt").read_text()
    config = yaml.safe_load((stage_dir / "config.yaml").read_text())
    assert config["settings"] == {"value": 0}
    summary = read_summary(stage_dir)
    assert config["fingerprint"] == summary["fingerprint"]
    assert summary["fingerprint"] == fingerprint({"value": 0}, {"a": summary["upstream"]["a"]})
    assert summary["elapsed_s"] >= 0
    assert not (stage_dir / "summary.json.tmp").exists()
    # The stage's logger lets go of its file once the stage is over.
    assert logging.getLogger("llmforge.b").handlers == []


def test_rerun_with_same_settings_skips_everything(pipe, recipe):
    first = run_ids(pipe.run(recipe, ["c"]))
    (root(recipe) / "a" / "marker").write_text("kept")
    again = pipe.run(recipe, ["c"])
    assert pipe.calls == []
    assert run_ids(again) == first
    assert (root(recipe) / "a" / "marker").read_text() == "kept"  # nothing was wiped


def test_changed_setting_reruns_stage_and_downstream_only(pipe, recipe):
    first = run_ids(pipe.run(recipe, ["c", "side"]))
    (root(recipe) / "b" / "stale.txt").write_text("from the old settings")
    recipe.b.value = 7
    second = run_ids(pipe.run(recipe, ["c", "side"]))
    assert pipe.calls == ["b", "c"]
    assert second["a"] == first["a"] and second["side"] == first["side"]
    assert second["b"] != first["b"] and second["c"] != first["c"]
    assert (root(recipe) / "c" / "out.txt").read_text() == "a0;b7;c0;"
    assert not (root(recipe) / "b" / "stale.txt").exists()  # old outputs do not mix with new


def test_only_stages_whose_settings_changed_rerun(pipe, recipe):
    pipe.run(recipe, ["c"])
    recipe.side.value = 3  # nobody in a/b/c depends on it
    pipe.run(recipe, ["c"])
    assert pipe.calls == []
    recipe.a.value = 1  # a and, through its settings and run id, everything after it
    pipe.run(recipe, ["c"])
    assert pipe.calls == ["a", "b", "c"]


def test_force_reruns_stage_and_downstream(pipe, recipe):
    first = run_ids(pipe.run(recipe, ["c"]))
    second = run_ids(pipe.run(recipe, ["c"], force=("b",)))
    assert pipe.calls == ["b", "c"]
    assert second["a"] == first["a"]
    assert second["b"] != first["b"] and second["c"] != first["c"]


def test_force_of_a_stage_not_planned_is_ignored(pipe, recipe):
    pipe.run(recipe, ["b"])
    pipe.run(recipe, ["b"], force=("c",))
    assert pipe.calls == []


def test_failed_stage_leaves_no_summary_and_resumes_in_place(pipe, recipe):
    pipe.fail = {"b"}
    with pytest.raises(RuntimeError, match="b crashed"):
        pipe.run(recipe, ["c"])
    assert pipe.calls == ["a", "b"]
    b_dir = root(recipe) / "b"
    assert read_summary(b_dir) is None
    assert not (b_dir / "summary.json").exists()
    assert (b_dir / "partial.ckpt").is_file()
    assert read_summary(root(recipe) / "a") is not None
    assert logging.getLogger("llmforge.b").handlers == []  # closed even though it raised

    pipe.fail = set()
    a_id = read_summary(root(recipe) / "a")["run_id"]
    results = pipe.run(recipe, ["c"])
    assert pipe.calls == ["b", "c"]  # a finished before and is skipped
    assert results["a"]["run_id"] == a_id
    assert pipe.seen_partial["b"] is True  # same settings: the partial work was kept
    assert (b_dir / "partial.ckpt").read_text() == "half done"
    assert read_summary(b_dir)["run_id"] == results["b"]["run_id"]
    # Both attempts appended to the same metrics file.
    assert len((b_dir / "metrics.jsonl").read_text().splitlines()) == 4


def test_failed_stage_with_changed_settings_starts_clean(pipe, recipe):
    pipe.fail = {"b"}
    with pytest.raises(RuntimeError):
        pipe.run(recipe, ["b"])
    pipe.fail = set()
    recipe.b.value = 1
    pipe.run(recipe, ["b"])
    assert pipe.calls == ["b"]
    assert pipe.seen_partial["b"] is False
    assert not (root(recipe) / "b" / "partial.ckpt").exists()
    assert len((root(recipe) / "b" / "metrics.jsonl").read_text().splitlines()) == 2


def test_failed_stage_forced_starts_clean(pipe, recipe):
    pipe.fail = {"b"}
    with pytest.raises(RuntimeError):
        pipe.run(recipe, ["b"])
    pipe.fail = set()
    pipe.run(recipe, ["b"], force=("b",))
    assert pipe.seen_partial["b"] is False


def test_failed_upstream_stops_the_run(pipe, recipe):
    pipe.fail = {"a"}
    with pytest.raises(RuntimeError, match="a crashed"):
        pipe.run(recipe, ["c"])
    assert pipe.calls == ["a"]
    assert not (root(recipe) / "b").exists()


def test_unknown_stage_name(pipe, recipe):
    runner = Runner(recipe, pipe.stages, to_dict)
    with pytest.raises(ValueError, match=r"unknown stage 'zzz' \(valid: a, b, c, side\)"):
        runner.run(["zzz"])
    stages = {**pipe.stages, "d": Stage("d", "bad dep", ("missing",), lambda r: {}, lambda c: {})}
    with pytest.raises(ValueError, match="unknown stage 'missing'"):
        Runner(recipe, stages, to_dict).plan(["d"])
    assert not root(recipe).exists()  # nothing ran


def test_fingerprint_is_stable_and_sensitive():
    base = fingerprint({"x": 1, "y": [1, 2]}, {"a": "id1"})
    assert base == fingerprint({"y": [1, 2], "x": 1}, {"a": "id1"})  # key order is irrelevant
    assert len(base) == 16
    assert base != fingerprint({"x": 2, "y": [1, 2]}, {"a": "id1"})
    assert base != fingerprint({"x": 1, "y": [1, 2]}, {"a": "id2"})
    assert base != fingerprint({"x": 1, "y": [2, 1]}, {"a": "id1"})
    assert fingerprint({"p": Path("/x")}, {}) == fingerprint({"p": "/x"}, {})
