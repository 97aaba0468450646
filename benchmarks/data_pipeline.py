"""Documents per second per core of the full curation chain, llmforge vs datatrove, same run.

The chain, in this order on both sides: clean -> Gopher repetition -> Gopher quality -> C4 ->
FineWeb quality -> MinHash dedup (5-grams, 14 buckets x 8 hashes) -> PII, timed end to end
(every stage, dedup included). The input is one JSONL file built deterministically from
shared/data: wikitext-2 test articles, Gutenberg books cut into 2-5k-character paragraph
groups, tinyshakespeare in ~3k-character chunks, plus ~5% verbatim and ~5% lightly edited
copies so that dedup has work. Each system runs in its own child process, with one worker per
core and with one worker; the table shows docs/s, docs/s per core (docs/s / workers), CPU
seconds of the process and all its workers (docs per CPU-second holds up when other work shares
the machine), the llmforge/datatrove ratio (target: >= 1.5x), how far the two kept sets agree,
and each step's documents in and dropped on both sides.

Reference: datatrove 0.10.1 in its own virtual environment, run by benchmarks/datatrove_chain.py
with LocalPipelineExecutor (components and the differences that remain: see that file). The
environment is made on first use, as by hand:

    python -m venv runs/datatrove-venv
    runs/datatrove-venv/bin/pip install "datatrove[processing]==0.10.1" spacy orjson

Run: `.venv/bin/python benchmarks/data_pipeline.py [--docs N] [--json out.json]`
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# spacy: datatrove's English word tokenizer (spacy.blank("en"), no model download); orjson:
# its JsonlReader. Neither comes with the [processing] extra.
DATATROVE = ["datatrove[processing]==0.10.1", "spacy", "orjson"]
STEPS = ["clean", "gopher_repetition", "gopher_quality", "c4", "fineweb_quality",
         "minhash_dedup", "pii"]
SEED = 0
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


# ---- the input mix ---------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def wikitext_articles(path: Path) -> list[str]:
    """wiki.test.raw cut at its top-level headings (` = Title = `, one `=` on each side)."""
    articles, current = [], []
    for line in _read_text(path).splitlines():
        if re.fullmatch(r" = [^=].* = *", line) and current:
            articles.append("\n".join(current).strip("\n"))
            current = []
        current.append(line)
    if current:
        articles.append("\n".join(current).strip("\n"))
    return [a for a in articles if a.strip()]


def paragraph_groups(text: str, rng: random.Random, lo: int = 2000, hi: int = 5000) -> list[str]:
    """Consecutive blank-line-separated paragraphs, grouped to a target of lo..hi characters."""
    text = text.replace("\r\n", "\n")
    paras = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    groups, current, size, target = [], [], 0, rng.randint(lo, hi)
    for para in paras:
        current.append(para)
        size += len(para) + 2
        if size >= target:
            groups.append("\n\n".join(current))
            current, size, target = [], 0, rng.randint(lo, hi)
    if current:
        groups.append("\n\n".join(current))
    return groups


def chunks(text: str, size: int = 3000) -> list[str]:
    """~size-character pieces of text, cut at the first line end after each size characters."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end].strip("\n"))
        start = end
    return [c for c in out if c.strip()]


def edit_words(text: str, rng: random.Random, n: int = 4) -> str:
    """A near copy: n words replaced by other words of the same text."""
    words = text.split(" ")
    for _ in range(n):
        words[rng.randrange(len(words))] = rng.choice(words)
    return " ".join(words)


def build_mix(data: Path, out: Path, max_docs: int = 0) -> dict:
    """Writes the mix to `out` (one {"id", "text"} per line); same bytes on every run."""
    rng = random.Random(SEED)
    docs = [(f"wiki-{i:04d}", t) for i, t in
            enumerate(wikitext_articles(data / "wikitext-2-raw" / "wiki.test.raw"))]
    for book in sorted((data / "gutenberg-nltk").glob("*.txt")):
        docs += [(f"gutenberg-{book.stem}-{i:04d}", t)
                 for i, t in enumerate(paragraph_groups(_read_text(book), rng))]
    docs += [(f"shakespeare-{i:04d}", t) for i, t in
             enumerate(chunks(_read_text(data / "tinyshakespeare" / "input.txt")))]
    originals = list(docs)
    for doc_id, text in rng.sample(originals, len(originals) // 20):
        docs.append((f"{doc_id}-copy", text))
    for doc_id, text in rng.sample(originals, len(originals) // 20):
        docs.append((f"{doc_id}-near", edit_words(text, rng)))
    rng.shuffle(docs)  # sources and copies spread over the whole file, so shards are alike
    if max_docs:
        docs = docs[:max_docs]
    with out.open("w", encoding="utf-8") as f:
        for doc_id, text in docs:
            f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
    return {"docs": len(docs), "bytes": out.stat().st_size,
            "ids": [doc_id for doc_id, _ in docs]}


# ---- the two systems -------------------------------------------------------------------------


def ensure_datatrove(venv: Path) -> Path:
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import datatrove, spacy, orjson"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} with {' '.join(DATATROVE)} (first use only) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *DATATROVE], check=True)
    return python


def _adopt_orphans() -> None:
    """Make this process the reaper of its orphaned descendants (Linux), so that workers a child
    started through a fork server (datatrove's default) still add to RUSAGE_CHILDREN here."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _reap_orphans(timeout: float = 30.0) -> None:
    """Wait for descendants that outlived the child (a fork server exits just after it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # none left
        if pid == 0:
            time.sleep(0.05)


def _run_child(cmd: list[str], log: Path) -> dict:
    """Run one system in its own process; its last stdout line is its JSON result. CPU seconds
    are the process's and all its workers', start-up and imports included."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("w") as stderr:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
    _reap_orphans()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}); log {log}:\n"
                 + log.read_text()[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["cpu_seconds"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["kept"] = Path(result.pop("kept_ids")).read_text().split()
    return result


def run_datatrove(python: Path, source: Path, out: Path, workers: int) -> dict:
    script = Path(__file__).with_name("datatrove_chain.py")
    return _run_child([str(python), str(script), str(source), str(out), "--tasks", str(workers),
                       "--workers", str(workers)], out.with_suffix(".log"))


def run_llmforge(source: Path, out: Path, workers: int, ids: list[str]) -> dict:
    result = _run_child([sys.executable, str(Path(__file__).resolve()), "--llmforge-child",
                         str(source), str(out), str(workers)], out.with_suffix(".log"))
    result["kept"] = _input_ids(result["kept"], ids)
    return result


def llmforge_chain(source: Path, out: Path, workers: int) -> None:
    """The llmforge side, run in a child process like datatrove's; prints one JSON line."""
    from importlib.metadata import version

    import pyarrow.parquet as pq

    from llmforge.data.config import DataConfig
    from llmforge.data.pipeline import curate

    # llmforge cuts a big file into shards of about shard_mb: one per worker here, as datatrove
    # gets one input file per task
    shard_mb = max(1, math.ceil(source.stat().st_size / 2**20 / workers))
    cfg = DataConfig(source=str(source), steps=list(STEPS), workers=workers,
                     write_rejects=False, shard_mb=shard_mb)
    t0 = time.perf_counter()
    summary = curate(cfg, out)
    seconds = time.perf_counter() - t0
    kept = []
    for part in sorted((out / "documents").glob("*.parquet")):
        kept += pq.read_table(part, columns=["id"]).column("id").to_pylist()
    ids_path = out / "kept_ids.txt"
    ids_path.write_text("".join(f"{i}\n" for i in kept))
    funnel = {f["step"]: {"in": f["in"], "dropped": sum(f["dropped"].values())}
              for f in summary["funnel"] if f["step"] != "read"}
    print(json.dumps({"system": "llmforge", "version": version("llmforge"),
                      "docs_in": summary["read"], "docs_kept": len(kept), "seconds": seconds,
                      "funnel": funnel, "workers": workers, "shard_mb": shard_mb,
                      "kept_ids": str(ids_path)}))


def _input_ids(kept: list[str], ids: list[str]) -> list[str]:
    """The mix's own ids: llmforge may name a JSONL record `file:line` rather than by its id."""
    known = set(ids)
    out = []
    for doc_id in kept:
        line = re.search(r":(\d+)$", doc_id)
        out.append(doc_id if doc_id in known or not line else ids[int(line.group(1)) - 1])
    return out


# ---- report ----------------------------------------------------------------------------------


def row(result: dict, workers: int) -> dict:
    docs_s = result["docs_in"] / result["seconds"]
    return {"system": result["system"], "version": result["version"], "workers": workers,
            "docs_in": result["docs_in"], "docs_kept": len(result["kept"]),
            "seconds": round(result["seconds"], 3), "docs_per_s": round(docs_s, 1),
            "docs_per_s_per_core": round(docs_s / workers, 1),
            "cpu_seconds": round(result["cpu_seconds"], 2),
            "docs_per_cpu_s": round(result["docs_in"] / result["cpu_seconds"], 1)}


def agreement(ours: list[str], theirs: list[str]) -> dict:
    a, b = set(ours), set(theirs)
    union = a | b
    return {"jaccard": round(len(a & b) / len(union), 4) if union else 1.0,
            "both": len(a & b), "llmforge_only": len(a - b), "datatrove_only": len(b - a),
            "llmforge_only_examples": sorted(a - b)[:6],
            "datatrove_only_examples": sorted(b - a)[:6]}


def print_report(rows: list[dict], ratios: dict, agree: dict, funnels: dict) -> None:
    head = (f"{'system':<18} {'workers':>7} {'docs in':>7} {'kept':>5} {'seconds':>8} "
            f"{'docs/s':>7} {'docs/s/core':>11} {'cpu s':>7} {'docs/cpu-s':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['system'] + ' ' + r['version']:<18} {r['workers']:>7} {r['docs_in']:>7} "
              f"{r['docs_kept']:>5} {r['seconds']:>8.2f} {r['docs_per_s']:>7.1f} "
              f"{r['docs_per_s_per_core']:>11.1f} {r['cpu_seconds']:>7.1f} "
              f"{r['docs_per_cpu_s']:>10.1f}")
    print()
    for workers, r in ratios.items():
        print(f"llmforge/datatrove at {workers} worker(s): {r['throughput']:.2f}x docs/s, "
              f"{r['per_cpu_second']:.2f}x docs per CPU-second (target >= 1.5x)")
    for workers, a in agree.items():
        print(f"kept sets at {workers} worker(s): Jaccard {a['jaccard']:.4f}; kept by both "
              f"{a['both']}, llmforge only {a['llmforge_only']}, datatrove only "
              f"{a['datatrove_only']}")
    a = next(iter(agree.values()))
    for side in ("llmforge", "datatrove"):
        if a[f"{side}_only_examples"]:
            print(f"  {side} only, e.g. {', '.join(a[f'{side}_only_examples'])}")
    print(f"\n{'step':<18} {'llmforge in':>11} {'dropped':>8} {'datatrove in':>12} "
          f"{'dropped':>8}")
    ours, theirs = funnels["llmforge"], funnels["datatrove"]
    for step in STEPS:
        o, t = ours.get(step, {}), theirs.get(step, {})
        print(f"{step:<18} {o.get('in', '-'):>11} {o.get('dropped', '-'):>8} "
              f"{t.get('in', '-'):>12} {t.get('dropped', '-'):>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=0, help="use at most N documents (0 = all)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="workers for the parallel run (default: one per core)")
    parser.add_argument("--no-single", action="store_true", help="skip the 1-worker runs")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each system and worker count; the fastest counts")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--datatrove-venv", type=Path, default=REPO / "runs" / "datatrove-venv")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--write-mix", type=Path, metavar="PATH",
                        help="only write the input mix (JSONL) to PATH and exit")
    parser.add_argument("--llmforge-child", nargs=3, metavar=("SOURCE", "OUT", "WORKERS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_mix:
        mix = build_mix(args.data, args.write_mix, args.docs)
        print(f"wrote {mix['docs']} documents ({mix['bytes'] / 2**20:.1f} MiB) to {args.write_mix}")
        return
    if args.llmforge_child:
        source, out, workers = args.llmforge_child
        llmforge_chain(Path(source), Path(out), int(workers))
        return

    started = time.perf_counter()
    _adopt_orphans()
    python = ensure_datatrove(args.datatrove_venv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-pipeline-"))
    try:
        source = tmp / "mix.jsonl"
        mix = build_mix(args.data, source, args.docs)
        print(f"input: {mix['docs']} documents, {mix['bytes'] / 2**20:.1f} MiB; chain: "
              f"{' -> '.join(STEPS)}; load average before: {os.getloadavg()[0]:.2f} on "
              f"{os.cpu_count()} CPUs", flush=True)
        counts = [args.workers] + ([] if args.no_single or args.workers == 1 else [1])
        rows, ratios, agree, funnels = [], {}, {}, {}
        for workers in counts:
            best: dict[str, dict] = {}
            for rep in range(args.repeats):
                for name in ("datatrove", "llmforge"):
                    out = tmp / f"{name}-w{workers}-r{rep}"
                    result = (run_datatrove(python, source, out, workers) if name == "datatrove"
                              else run_llmforge(source, out, workers, mix["ids"]))
                    if name not in best or result["seconds"] < best[name]["seconds"]:
                        best[name] = result
            ours, theirs = best["llmforge"], best["datatrove"]
            rows += [row(ours, workers), row(theirs, workers)]
            ratios[workers] = {
                "throughput": round(theirs["seconds"] / ours["seconds"], 3),
                "per_cpu_second": round(theirs["cpu_seconds"] / ours["cpu_seconds"], 3)}
            agree[workers] = agreement(ours["kept"], theirs["kept"])
            funnels = funnels or {"llmforge": ours["funnel"], "datatrove": theirs["funnel"]}
        print_report(rows, ratios, agree, funnels)
        total = time.perf_counter() - started
        print(f"\nbenchmark took {total:.0f} s")
        if args.json:
            args.json.write_text(json.dumps({
                "input": {k: v for k, v in mix.items() if k != "ids"}, "steps": STEPS,
                "rows": rows, "ratio_llmforge_over_datatrove": ratios, "agreement": agree,
                "funnel": funnels, "seconds_total": round(total, 1)}, indent=2) + "\n")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
