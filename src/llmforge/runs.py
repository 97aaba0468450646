"""Run directories: where each stage writes, and when a finished stage may be skipped.

`runs/<name>/<stage>/` holds a stage's outputs next to `config.yaml` (the exact settings it ran
under), `metrics.jsonl`, `log.txt` and, once it has finished, `summary.json`. A stage's
fingerprint hashes its own settings and the run ids of the stages it read from, so changing a
setting, or rerunning an upstream stage, reruns everything downstream and nothing else. A stage
that was interrupted (no summary yet) under the same fingerprint keeps its directory so it can
resume from its own checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from llmforge import distributed

console = Console(stderr=True)


@dataclass
class StageContext:
    """What a running stage may touch: its own directory and its upstream stages' directories."""

    name: str
    dir: Path
    root: Path
    recipe: Any
    log: logging.Logger
    upstream: dict[str, Path] = field(default_factory=dict)
    is_main: bool = True  # False on torchrun ranks > 0: they compute but write nothing shared

    def input(self, stage: str) -> Path:
        return self.upstream[stage]

    def metrics(self, **record: Any) -> None:
        """Append one JSON line to metrics.jsonl (a stage's time series: loss curves and such)."""
        if not self.is_main:
            return
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def rewind_metrics(self, step: int) -> list[dict]:
        """Keep only records up to `step` (where a resumed run picks up); return them."""
        path = self.dir / "metrics.jsonl"
        if not path.is_file():
            return []
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a kill can leave a partial last line
                continue
            if record.get("step", 0) <= step:
                kept.append(record)
        if self.is_main:
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return kept

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        """A rich progress bar; yields `update(completed=..., **fields)`."""
        if not self.is_main:
            yield lambda completed, info="": None
            return
        columns = [
            TextColumn(f"[bold]{self.name}[/] {description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task(description, total=total, info="")

            def update(completed: int, info: str = "") -> None:
                bar.update(task, completed=completed, info=info)

            yield update


@dataclass
class Stage:
    name: str
    help: str
    # The stages whose outputs this one reads, or a function of the recipe giving them (an
    # alignment stage given its own base model needs no upstream training stage).
    needs: tuple[str, ...] | Callable[[Any], tuple[str, ...]]
    settings: Callable[[Any], Any]  # the part of the recipe this stage depends on
    run: Callable[[StageContext], dict]
    distributed: bool = False  # under torchrun every rank runs it; else rank 0 alone does

    def inputs(self, recipe: Any) -> tuple[str, ...]:
        return self.needs(recipe) if callable(self.needs) else self.needs


def fingerprint(settings: Any, upstream_ids: dict[str, str]) -> str:
    blob = json.dumps({"settings": settings, "upstream": upstream_ids}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def files_digest(paths: list[Path]) -> str:
    """Identity of input files outside the run directory (path, size, mtime), so that editing
    them reruns the stage that reads them."""
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def read_summary(stage_dir: Path) -> dict | None:
    path = stage_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


class Runner:
    """Runs stages in dependency order, skipping those whose outputs are current."""

    def __init__(self, recipe: Any, stages: dict[str, Stage], to_dict: Callable[[Any], Any]):
        self.recipe = recipe
        self.stages = stages
        self.to_dict = to_dict
        self.root = Path(recipe.run_dir) / recipe.name
        self.results: dict[str, dict] = {}

    def plan(self, targets: list[str]) -> list[str]:
        order: list[str] = []

        def visit(name: str) -> None:
            if name not in self.stages:
                raise ValueError(f"unknown stage {name!r} (valid: {', '.join(self.stages)})")
            for dep in self.stages[name].inputs(self.recipe):
                visit(dep)
            if name not in order:
                order.append(name)

        for t in targets:
            visit(t)
        return order

    def run(self, targets: list[str], force: tuple[str, ...] = ()) -> dict[str, dict]:
        for name in self.plan(targets):
            self.results[name] = self._run_one(self.stages[name], force=name in force)
        return self.results

    def _run_one(self, stage: Stage, force: bool) -> dict:
        stage_dir = self.root / stage.name
        upstream_ids = {d: self.results[d]["run_id"] for d in stage.inputs(self.recipe)}
        settings = self.to_dict(stage.settings(self.recipe))
        fp = fingerprint(settings, upstream_ids)
        done = read_summary(stage_dir)
        if done and done.get("fingerprint") == fp and not force:
            if distributed.info().is_main:
                console.print(f"[green]✓[/] {stage.name}: up to date, skipped ({stage_dir})")
            return done
        is_main = distributed.info().is_main
        if is_main:
            self._prepare(stage_dir, fp, settings, force, done)
        if stage.distributed:
            distributed.barrier()  # nobody writes into the directory before rank 0 has reset it
        if stage.distributed or is_main:
            summary = self._execute(stage, stage_dir, fp, upstream_ids, is_main)
        distributed.barrier()  # the summary is written: every rank takes rank 0's run id
        return summary if is_main else read_summary(stage_dir)

    @staticmethod
    def _prepare(stage_dir: Path, fp: str, settings: Any, force: bool, done: dict | None) -> None:
        """Start a stage's directory afresh, unless it holds an interrupted run of this very
        configuration that can resume."""
        started = stage_dir / "config.yaml"
        if force or done or not started.is_file() or _stored_fingerprint(started) != fp:
            shutil.rmtree(stage_dir, ignore_errors=True)  # stale outputs must not mix with new
        stage_dir.mkdir(parents=True, exist_ok=True)
        resolved = {"fingerprint": fp, "settings": settings}
        started.write_text(yaml.safe_dump(resolved, sort_keys=False))

    def _execute(self, stage: Stage, stage_dir: Path, fp: str, upstream_ids: dict[str, str],
                 is_main: bool) -> dict:
        log = _stage_logger(stage.name, stage_dir / "log.txt" if is_main else None)
        ctx = StageContext(
            name=stage.name,
            dir=stage_dir,
            root=self.root,
            recipe=self.recipe,
            log=log,
            upstream={d: self.root / d for d in stage.inputs(self.recipe)},
            is_main=is_main,
        )
        if is_main:
            console.rule(f"[bold]{stage.name}[/]")
        t0 = time.perf_counter()
        try:
            summary = stage.run(ctx)
        finally:
            for h in list(log.handlers):
                h.close()
                log.removeHandler(h)
        summary = {
            **summary,
            "stage": stage.name,
            "run_id": uuid.uuid4().hex[:12],
            "fingerprint": fp,
            "upstream": upstream_ids,
            "elapsed_s": round(time.perf_counter() - t0, 2),
        }
        if is_main:
            tmp = stage_dir / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            tmp.replace(stage_dir / "summary.json")  # atomic: only finished work has a summary
            console.print(f"[green]✓[/] {stage.name} done in {summary['elapsed_s']:.1f}s")
        return summary


def _stored_fingerprint(path: Path) -> str | None:
    try:
        return (yaml.safe_load(path.read_text()) or {}).get("fingerprint")
    except yaml.YAMLError:
        return None


def _stage_logger(name: str, path: Path | None) -> logging.Logger:
    """Log to the stage's log.txt and the console; without a path (ranks > 0), warnings only."""
    log = logging.getLogger(f"llmforge.{name}")
    log.setLevel(logging.INFO if path else logging.WARNING)
    log.propagate = False
    if path:
        file_handler = logging.FileHandler(path)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file_handler)
    log.addHandler(RichHandler(console=console, show_path=False, show_time=False))
    return log
