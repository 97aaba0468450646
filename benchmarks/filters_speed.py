"""Speed of the quality filters on one core, on wikitext-2 articles.

The filters run over terabytes, so their cost per document decides how many workers a run
needs. Run: `python benchmarks/filters_speed.py [--path wiki.test.raw] [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from llmforge.data.filters.c4 import C4Filter
from llmforge.data.filters.fineweb import FineWebQuality
from llmforge.data.filters.gopher import GopherQuality, GopherRepetition
from llmforge.data.records import Document, Drop

WIKITEXT = Path("/work/shared/data/wikitext-2-raw/wiki.test.raw")
_TITLE = re.compile(r"^ = ([^=\n]+) = \n", re.MULTILINE)  # top-level headings only


def articles(path: Path) -> list[Document]:
    """One document per article: wikitext marks each with a ` = Title = ` line."""
    raw = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    parts = _TITLE.split(raw)
    return [Document(title, body.strip("\n"), "wikitext")
            for title, body in zip(parts[1::2], parts[2::2], strict=True)]


def measure(step, docs: list[Document], repeats: int) -> tuple[float, int]:
    """(best seconds over `repeats` passes, documents kept)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        kept = sum(not isinstance(step(doc), Drop) for doc in docs)
        best = min(best, time.perf_counter() - t0)
    return best, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, default=WIKITEXT)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    docs = articles(args.path)
    mb = sum(len(doc.text) for doc in docs) / 1e6
    print(f"{len(docs)} articles, {mb:.1f} M characters, best of {args.repeats}")
    print(f"{'filter':<20} {'docs/s':>8} {'MB/s':>6} {'kept':>6}")
    for step in (GopherQuality(), GopherRepetition(), C4Filter(), FineWebQuality()):
        seconds, kept = measure(step, docs, args.repeats)
        print(f"{step.name:<20} {len(docs) / seconds:>8.0f} {mb / seconds:>6.2f} "
              f"{kept:>3}/{len(docs)}")


if __name__ == "__main__":
    main()
