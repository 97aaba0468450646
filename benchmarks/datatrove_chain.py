"""The reference side of benchmarks/data_pipeline.py: datatrove runs the same curation chain.

Runs inside datatrove's own virtual environment (data_pipeline.py creates it), never inside
llmforge's, and uses only datatrove's own components (datatrove 0.10.1):

    JsonlReader -> FTFYFormatter(normalization="NFC") -> GopherRepetitionFilter
      -> GopherQualityFilter -> C4QualityFilter -> FineWebQualityFilter
      -> JsonlWriter + MinhashDedupSignature                        (stage 1, `tasks` tasks)
    MinhashDedupBuckets                                              (stage 2, 14 tasks)
    MinhashDedupCluster                                              (stage 3, 1 task)
    JsonlReader -> MinhashDedupFilter -> PIIFormatter -> JsonlWriter (stage 4, `tasks` tasks)

all with their defaults (MinhashConfig: 5-grams, 14 buckets x 8 hashes, seed 1; C4
filter_no_terminal_punct=True), each stage a LocalPipelineExecutor with `workers` processes.
Differences from llmforge's chain that remain:

- clean: datatrove has no step for llmforge's whitespace normalisation (line ends, controls,
  trailing spaces, runs of blank lines) or boilerplate-line removal; FTFYFormatter (ftfy plus
  NFC here) is the part it has.
- words and sentences: datatrove's English tokenizer is spaCy's (spacy.blank("en"), with its
  sentencizer for C4's sentence count), llmforge's a regex; spaCy splits `."` into two tokens,
  so Gopher's alphabetic-word ratio comes out lower and datatrove drops more documents there.
  The same tokenizer differences make the MinHash shingles, and so the signatures, differ.
- PII: PIIFormatter replaces e-mails and public IPs; llmforge's step also looks for phone and
  card numbers (more work). Neither drops documents.
- input: datatrove parallelises over files, not within one, so the one input file is first cut
  into `tasks` files of about equal size at line boundaries (untimed); llmforge reads the
  single file and plans its byte-range shards itself, inside its timed run.
- output: JSONL (gzip for the final output) here, zstd Parquet in llmforge.

The timed part is the four stages end to end. Prints one JSON line: seconds, documents in and
kept, per-step counts (from datatrove's stats.json), and the file of kept ids (one per line).

    python benchmarks/datatrove_chain.py INPUT.jsonl OUT_DIR --tasks 2 --workers 2
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

# datatrove's block names (as in its stats.json) -> the llmforge step each stands for
STEP_NAMES = {"FTFY": "clean", "Gopher Repetition": "gopher_repetition",
              "Gopher Quality": "gopher_quality", "C4 Quality": "c4",
              "FineWeb Quality": "fineweb_quality", "MinHash stage 4": "minhash_dedup",
              "PII": "pii"}


def _count(stat: int | dict) -> int:
    return stat["total"] if isinstance(stat, dict) else stat


def split_input(src: Path, dst: Path, parts: int) -> int:
    """Cut src into `parts` files of about equal bytes at line boundaries; returns the lines."""
    lines = [line for line in src.read_bytes().splitlines(keepends=True) if line.strip()]
    total = sum(map(len, lines))
    dst.mkdir(parents=True)
    part, size = 0, 0
    files = [[] for _ in range(parts)]
    for line in lines:
        if size >= total * (part + 1) / parts and part < parts - 1:
            part += 1
        files[part].append(line)
        size += len(line)
    for i, chunk in enumerate(files):
        out = dst / f"{i:05d}.jsonl"
        out.write_bytes(b"".join(chunk))
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tasks", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    from importlib.metadata import version

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.formatters import FTFYFormatter, PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    out = args.out
    shards, filtered, sigs, buckets, clusters, final = (
        out / name for name in ("input", "filtered", "sigs", "buckets", "clusters", "final"))
    docs_in = split_input(args.input, shards, args.tasks)
    cfg = MinhashConfig()  # 14 buckets x 8 hashes, 5-grams, seed 1, 64-bit hashes

    def executor(name: str, pipeline: list, tasks: int) -> LocalPipelineExecutor:
        return LocalPipelineExecutor(pipeline=pipeline, tasks=tasks,
                                     workers=min(args.workers, tasks),
                                     logging_dir=str(out / "logs" / name))

    stages = [
        ("1 filters+signatures", executor("1", [
            JsonlReader(str(shards)),
            FTFYFormatter(normalization="NFC"),
            GopherRepetitionFilter(),
            GopherQualityFilter(),
            C4QualityFilter(filter_no_terminal_punct=True),
            FineWebQualityFilter(),
            # uncompressed, named by rank, so stage 4 reads each rank's documents back in order
            JsonlWriter(str(filtered), output_filename="${rank}.jsonl", compression=None),
            MinhashDedupSignature(output_folder=str(sigs), config=cfg),
        ], args.tasks)),
        ("2 buckets", executor("2", [
            MinhashDedupBuckets(input_folder=str(sigs), output_folder=str(buckets), config=cfg),
        ], cfg.num_buckets)),
        ("3 cluster", executor("3", [
            MinhashDedupCluster(input_folder=str(buckets), output_folder=str(clusters),
                                config=cfg),
        ], 1)),
        ("4 dedup filter+pii", executor("4", [
            JsonlReader(str(filtered)),
            MinhashDedupFilter(input_folder=str(clusters)),
            PIIFormatter(),
            JsonlWriter(str(final), output_filename="${rank}.jsonl.gz"),
        ], args.tasks)),
    ]

    stage_seconds = {}
    t0 = time.perf_counter()
    for name, ex in stages:
        t = time.perf_counter()
        if name.startswith("4"):
            # a rank whose documents were all filtered out wrote no file; stage 4 maps files to
            # ranks by sorted position, so every rank needs one
            filtered.mkdir(parents=True, exist_ok=True)
            for rank in range(args.tasks):
                (filtered / f"{rank:05d}.jsonl").touch()
        ex.run()
        stage_seconds[name] = round(time.perf_counter() - t, 3)
    seconds = time.perf_counter() - t0

    kept_ids = []
    for path in sorted(final.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            kept_ids += [json.loads(line)["id"] for line in f if line.strip()]
    funnel = {}  # our step name -> documents in, dropped
    for stage in ("1", "4"):
        for block in json.loads((out / "logs" / stage / "stats.json").read_text()):
            step = next((ours for theirs, ours in STEP_NAMES.items() if theirs in block["name"]),
                        None)
            if step:
                stats = block["stats"]
                funnel[step] = {"in": _count(stats.get("total", 0)),
                                "dropped": _count(stats.get("dropped", 0))}
    ids_path = out / "kept_ids.txt"
    ids_path.write_text("".join(f"{i}\n" for i in kept_ids))
    print(json.dumps({"system": "datatrove", "version": version("datatrove"),
                      "docs_in": docs_in, "docs_kept": len(kept_ids), "seconds": seconds,
                      "stage_seconds": stage_seconds, "funnel": funnel, "tasks": args.tasks,
                      "workers": args.workers, "kept_ids": str(ids_path)}))


if __name__ == "__main__":
    main()
