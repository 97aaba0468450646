"""The data stage: documents stream through steps, shard by shard, in parallel and resumably.

The step list is cut at each dedup step (which must see the whole dataset) into segments.
A segment is a parallel map over shards: each task reads its shard (or the previous segment's
output for it), runs the per-document steps, and writes the survivors, its rejects, the
signatures the next dedup step needs, and finally its stats file, which marks it done. Between
segments one process reads all signatures in input order and decides the duplicates. A killed
run resumes from the tasks and decisions whose files exist; since every task is deterministic
and every tie is broken by input order, the result equals an uninterrupted run's.

    data/documents/part-NNNNN.parquet   what survives (id, text, source, meta as JSON)
    data/rejects/*.parquet               everything set aside, with step, reason and detail
    data/work/                           per-task files while the run is in progress
"""

from __future__ import annotations

import json
import shutil
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmforge.data.config import DataConfig
from llmforge.data.executors import TaskRunner
from llmforge.data.records import Document, Drop, Rejected
from llmforge.data.sources import Shard, plan_shards, read_shard
from llmforge.data.steps import build_steps

DOCUMENT_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()),
                             ("source", pa.string()), ("meta", pa.string())])
REJECT_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("step", pa.string()),
                           ("reason", pa.string()), ("detail", pa.string()),
                           ("chars", pa.int64()), ("text", pa.string())])
LENGTH_BINS = [0, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000]
EXAMPLES_PER_REASON = 3
EXCERPT_CHARS = 300
ROW_GROUP_ROWS = 10_000
KEY_SHIFT = 32  # key = shard << 32 | row: integer order is input order


@dataclass(frozen=True)
class Segment:
    steps: tuple  # per-document steps
    barrier: Any | None  # the dedup step that follows them, if any


@dataclass(frozen=True)
class Task:
    """One shard's work in one segment; picklable, so any executor can run it."""

    shard: int
    segment: int
    inputs: tuple[Shard, ...]  # read in segment 0; later segments read the previous output
    limit: int  # at most this many input records (0 = all), for quick runs
    text_field: str
    steps: tuple
    barrier: Any | None
    work: str
    final: bool
    write_rejects: bool


def segments(steps: list) -> list[Segment]:
    out, run = [], []
    for step in steps:
        if getattr(step, "is_global", False):
            out.append(Segment(tuple(run), step))
            run = []
        else:
            run.append(step)
    return [*out, Segment(tuple(run), None)]


def curate(cfg: DataConfig, out_dir: Path, *,
           progress: Callable[[int, int], None] | None = None) -> dict:
    """Run the data stage into out_dir; returns the summary (read == kept + dropped)."""
    out_dir = Path(out_dir)
    work = out_dir / "work"
    shards = [shard for source in cfg.source.split(",")  # fails here if a source has no input
              for shard in plan_shards(source.strip(), cfg.text_field, cfg.shard_mb * 2**20)]
    groups = [tuple(shards)] if cfg.max_docs else [(s,) for s in shards]
    plan = segments(build_steps(cfg.steps))
    total, finished = len(groups) * len(plan), 0
    stats: list[dict] = []
    barriers: dict[str, dict] = {}
    with TaskRunner(cfg.executor, cfg.workers, len(groups), cfg.ray_address) as runner:
        for k, seg in enumerate(plan):
            tasks = [Task(i, k, group, cfg.max_docs, cfg.text_field, seg.steps, seg.barrier,
                          str(work), k == len(plan) - 1, cfg.write_rejects)
                     for i, group in enumerate(groups)]

            def done(n: int, base: int = finished) -> None:
                if progress:
                    progress(base + n, total)

            stats += runner.map(run_task, tasks, on_done=done)
            finished += len(tasks)
            if seg.barrier is not None:
                barriers[seg.barrier.name] = _decide(seg.barrier, k, len(groups), work, out_dir)
    summary = _summarise(stats, barriers, [s for seg in plan for s in _names(seg)])
    (out_dir / "documents").mkdir(parents=True, exist_ok=True)  # even when nothing survived
    shutil.rmtree(work, ignore_errors=True)
    return summary


def _names(seg: Segment) -> list[str]:
    return [s.name for s in seg.steps] + ([seg.barrier.name] if seg.barrier else [])


# ---- one task ------------------------------------------------------------------------------


def run_task(task: Task) -> dict:
    """Run one shard through one segment, unless a previous run already finished it."""
    work = Path(task.work)
    stats_path = work / f"seg{task.segment}" / f"stats-{task.shard:05d}.json"
    if stats_path.is_file():
        return json.loads(stats_path.read_text())
    tally = Tally()
    kept_path = _part_path(work.parent, task) if task.final else \
        work / f"seg{task.segment}" / f"part-{task.shard:05d}.parquet"
    rejects_path = work.parent / "rejects" / f"seg{task.segment}-part-{task.shard:05d}.parquet"
    signatures = []
    with (_Writer(kept_path, DOCUMENT_SCHEMA) as kept,
          _Writer(rejects_path, REJECT_SCHEMA, enabled=task.write_rejects) as rejects):
        for doc, verdict in _inputs(task, tally):
            if verdict is None:
                doc, verdict = _apply(task.steps, doc, tally)
            if verdict is not None:
                step, reason, detail = verdict
                tally.dropped(step, reason, detail, doc)
                rejects.add({"id": doc.id, "source": doc.source, "step": step, "reason": reason,
                             "detail": detail, "chars": len(doc.text), "text": doc.text})
                continue
            tally.kept(doc, final=task.final)
            kept.add({"id": doc.id, "text": doc.text, "source": doc.source,
                      "meta": json.dumps(doc.meta, sort_keys=True)})
            if task.barrier is not None:
                signatures.append(task.barrier.signature(doc))
    if task.barrier is not None:
        sig_path = work / f"seg{task.segment}" / f"sig-{task.shard:05d}.npy"
        _atomic_save(sig_path, np.stack(signatures) if signatures else np.empty((0,)))
    _atomic_write(stats_path, json.dumps(tally.as_dict()))
    return tally.as_dict()


def _part_path(out_dir: Path, task: Task) -> Path:
    return out_dir / "documents" / f"part-{task.shard:05d}.parquet"


def _inputs(task: Task, tally: Tally) -> Iterator[tuple[Document, tuple | None]]:
    """(document, None) to process, or (document, verdict) already decided by a dedup step."""
    if task.segment == 0:
        yield from _read(task, tally)
        return
    work = Path(task.work)
    previous = work / f"seg{task.segment - 1}" / f"part-{task.shard:05d}.parquet"
    decisions = json.loads(
        (work / f"barrier{task.segment - 1}" / f"drop-{task.shard:05d}.json").read_text())
    barrier_name = decisions.pop("__step__", "dedup")
    row = 0
    for batch in pq.ParquetFile(previous).iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            doc = Document(rec["id"], rec["text"], rec["source"], json.loads(rec["meta"]))
            verdict = decisions.get(str(row))
            tally.entered(barrier_name, doc)
            if verdict is None:
                tally.passed(barrier_name, doc, doc)
            yield doc, (barrier_name, *verdict) if verdict else None
            row += 1


def _read(task: Task, tally: Tally) -> Iterator[tuple[Document, tuple | None]]:
    n = 0
    for shard in task.inputs:
        for record in read_shard(shard, task.text_field):
            if task.limit and n >= task.limit:
                return
            n += 1
            tally.read += 1
            if isinstance(record, Rejected):
                doc = Document(record.id, "", record.source)
                tally.entered("read", doc)
                yield doc, ("read", record.reason, record.detail)
            else:
                tally.read_chars += len(record.text)
                tally.entered("read", record)
                tally.passed("read", record, record)
                yield record, None


def _apply(steps: tuple, doc: Document, tally: Tally) -> tuple[Document, tuple | None]:
    for step in steps:
        tally.entered(step.name, doc)
        out = step(doc)
        if isinstance(out, Drop):
            return doc, (step.name, out.reason, out.detail)
        tally.passed(step.name, doc, out)
        doc = out
    return doc, None


# ---- dedup decisions -----------------------------------------------------------------------


def _decide(barrier: Any, segment: int, n_shards: int, work: Path, out_dir: Path) -> dict:
    """Read every shard's signatures in input order, decide duplicates, write one file a shard."""
    done = work / f"barrier{segment}" / "stats.json"
    if done.is_file():
        return json.loads(done.read_text())
    seg_dir = work / f"seg{segment}"

    def signed() -> Iterator[tuple[int, str, Any]]:
        for i in range(n_shards):
            sigs = np.load(seg_dir / f"sig-{i:05d}.npy")
            ids = pq.read_table(seg_dir / f"part-{i:05d}.parquet", columns=["id"])["id"]
            for row, (doc_id, sig) in enumerate(zip(ids.to_pylist(), sigs, strict=False)):
                yield (i << KEY_SHIFT) | row, doc_id, sig

    dropped, stats = barrier.decide(signed(), out_dir)
    by_shard: dict[int, dict] = {i: {"__step__": barrier.name} for i in range(n_shards)}
    for key, verdict in dropped.items():
        by_shard[key >> KEY_SHIFT][str(key & ((1 << KEY_SHIFT) - 1))] = list(verdict)
    for i, decisions in by_shard.items():
        _atomic_write(done.parent / f"drop-{i:05d}.json", json.dumps(decisions))
    _atomic_write(done, json.dumps(stats))
    return stats


# ---- accounting ----------------------------------------------------------------------------


class Tally:
    """What one task saw: per-step funnel, drop reasons with examples, lengths, languages."""

    def __init__(self) -> None:
        self.read = self.read_chars = 0
        self.steps: dict[str, dict] = {}
        self.examples: dict[str, list] = {}
        self.kept_lengths = [0] * len(LENGTH_BINS)
        self.dropped_lengths = [0] * len(LENGTH_BINS)
        self.languages: Counter = Counter()
        self.words = 0

    def _step(self, name: str) -> dict:
        return self.steps.setdefault(name, _empty_step())

    def entered(self, name: str, doc: Document) -> None:
        s = self._step(name)
        s["in"] += 1
        s["in_chars"] += len(doc.text)

    def passed(self, name: str, before: Document, after: Document) -> None:
        s = self._step(name)
        s["kept"] += 1
        s["kept_chars"] += len(after.text)
        s["modified"] += after.text != before.text

    def dropped(self, step: str, reason: str, detail: str, doc: Document) -> None:
        self._step(step)["dropped"][reason] += 1
        self.dropped_lengths[_bin(len(doc.text))] += 1
        examples = self.examples.setdefault(f"{step}/{reason}", [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append({"id": doc.id, "detail": detail, "text": doc.text[:EXCERPT_CHARS]})

    def kept(self, doc: Document, final: bool) -> None:
        if final:
            self.kept_lengths[_bin(len(doc.text))] += 1
            self.languages[doc.meta.get("language", "unknown")] += 1
            self.words += len(doc.text.split())

    def as_dict(self) -> dict:
        return {"read": self.read, "read_chars": self.read_chars,
                "steps": {n: {**s, "dropped": dict(s["dropped"])} for n, s in self.steps.items()},
                "examples": self.examples, "kept_lengths": self.kept_lengths,
                "dropped_lengths": self.dropped_lengths, "languages": dict(self.languages),
                "kept_words": self.words}


COUNTS = ("in", "in_chars", "kept", "kept_chars", "modified")


def _empty_step() -> dict:
    return {**dict.fromkeys(COUNTS, 0), "dropped": Counter()}


def _bin(n: int) -> int:
    return bisect_right(LENGTH_BINS, n) - 1


def _summarise(stats: list[dict], barriers: dict[str, dict], order: list[str]) -> dict:
    """Add up the tasks' tallies into the stage summary (the datacard's input)."""
    steps: dict[str, dict] = {}
    examples: dict[str, list] = {}
    dropped: Counter = Counter()
    languages: Counter = Counter()
    kept_lengths = np.zeros(len(LENGTH_BINS), dtype=np.int64)
    dropped_lengths = np.zeros(len(LENGTH_BINS), dtype=np.int64)
    read = read_chars = words = 0
    for t in stats:
        read += t["read"]
        read_chars += t["read_chars"]
        words += t["kept_words"]
        languages.update(t["languages"])
        kept_lengths += t["kept_lengths"]
        dropped_lengths += t["dropped_lengths"]
        for name, s in t["steps"].items():
            agg = steps.setdefault(name, _empty_step())
            for key in COUNTS:
                agg[key] += s[key]
            agg["dropped"].update(s["dropped"])
            dropped.update(s["dropped"])
        for reason, items in t["examples"].items():
            have = examples.setdefault(reason, [])
            have.extend(items[: EXAMPLES_PER_REASON - len(have)])
    funnel = [{"step": name, **{k: v for k, v in steps[name].items() if k != "dropped"},
               "dropped": dict(steps[name]["dropped"].most_common())}
              for name in ["read", *order] if name in steps]
    kept = int(kept_lengths.sum())
    return {
        "read": read, "kept": kept, "dropped": dict(dropped.most_common()),
        "read_chars": read_chars, "kept_chars": funnel[-1]["kept_chars"] if funnel else 0,
        "kept_words": words, "funnel": funnel, "dedup": barriers,
        "languages": dict(languages.most_common()), "length_bins": LENGTH_BINS,
        "kept_lengths": kept_lengths.tolist(), "dropped_lengths": dropped_lengths.tolist(),
        "examples": examples,
    }


# ---- files ---------------------------------------------------------------------------------


class _Writer:
    """Parquet rows in bounded row groups, visible under their name only once complete."""

    def __init__(self, path: Path, schema: pa.Schema, enabled: bool = True) -> None:
        self.path, self.schema, self.enabled = path, schema, enabled
        self.tmp = path.with_name(path.name + ".tmp")
        self.rows: list[dict] = []
        self.writer: pq.ParquetWriter | None = None

    def __enter__(self) -> _Writer:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        return self

    def add(self, row: dict) -> None:
        if self.writer is not None:
            self.rows.append(row)
            if len(self.rows) >= ROW_GROUP_ROWS:
                self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.writer is None:
            return
        if exc_type is None:
            self._flush()
        self.writer.close()
        if exc_type is None:
            self.tmp.replace(self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)

