"""The data stage: stream records through small steps, write what survives, account for the rest.

A step takes a `Document` and returns it (possibly changed) or a `Rejected` saying why it goes.
New steps (Gopher/C4 heuristics, near-dup MinHash) slot into `build_steps` without touching
the driver. Nothing is held in memory beyond one Parquet row group and the dedup hashes.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace
from itertools import islice
from pathlib import Path
from types import TracebackType

import pyarrow as pa
import pyarrow.parquet as pq

from llmforge.data.clean import (
    AlphaFilter,
    Filter,
    GeneratedFilter,
    LengthFilter,
    LongestLineFilter,
    normalise,
)
from llmforge.data.config import DataConfig
from llmforge.data.sources import Document, Record, Rejected, read_source

Step = Callable[[Document], Document | Rejected]

DOCUMENTS_FILE = "documents.parquet"
DROPPED_FILE = "dropped.parquet"
DOCUMENT_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string())])
DROPPED_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("reason", pa.string()),
                            ("detail", pa.string()), ("chars", pa.int64())])
# Flush a row group at whichever comes first: bounds memory while keeping groups big enough
# for efficient reads.
ROW_GROUP_CHARS = 32_000_000
ROW_GROUP_ROWS = 50_000


def normalise_step(doc: Document) -> Document:
    return replace(doc, text=normalise(doc.text))


class ExactDedup:
    """Drops a document whose (normalised) text was seen before; the first in input order stays."""

    def __init__(self) -> None:
        self._first_id: dict[bytes, str] = {}

    def __call__(self, doc: Document) -> Document | Rejected:
        key = hashlib.blake2b(doc.text.encode("utf-8"), digest_size=16).digest()
        first = self._first_id.get(key)
        if first is not None:
            return Rejected(doc.id, doc.source, "duplicate", f"same text as {first}", len(doc.text))
        self._first_id[key] = doc.id
        return doc


def filter_step(keep: Filter) -> Step:
    """Adapt a text filter into a step that records its verdict."""

    def step(doc: Document) -> Document | Rejected:
        drop = keep(doc.text)
        if drop is None:
            return doc
        return Rejected(doc.id, doc.source, drop.reason, drop.detail, len(doc.text))

    return step


def build_steps(cfg: DataConfig) -> list[Step]:
    """Normalise before dedup so trivial variants collide; cheapest filters first."""
    return [
        normalise_step,
        ExactDedup(),
        filter_step(LengthFilter(cfg.min_chars, cfg.max_chars)),
        filter_step(LongestLineFilter(cfg.max_line_chars)),
        filter_step(AlphaFilter(cfg.min_alpha_frac)),
        *([filter_step(GeneratedFilter())] if cfg.drop_generated else []),
    ]


def run_steps(record: Record, steps: Iterable[Step]) -> Record:
    """Pass a record through the steps until one rejects it."""
    for step in steps:
        if isinstance(record, Rejected):
            break
        record = step(record)
    return record


def curate(cfg: DataConfig, out_dir: Path, *,
           progress: Callable[[int], None] | None = None) -> dict:
    """Run the data stage into `out_dir`; returns counts where read == kept + sum(dropped)."""
    records: Iterable[Record] = read_source(cfg.source, cfg.text_field)  # fails fast if no files
    if cfg.max_docs:
        records = islice(records, cfg.max_docs)
    steps = build_steps(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    read = read_chars = kept_chars = 0
    dropped: Counter[str] = Counter()
    with (ParquetSink(out_dir / DOCUMENTS_FILE, DOCUMENT_SCHEMA) as kept_sink,
          ParquetSink(out_dir / DROPPED_FILE, DROPPED_SCHEMA) as dropped_sink):
        for read, record in enumerate(records, start=1):
            if isinstance(record, Document):
                read_chars += len(record.text)
            record = run_steps(record, steps)
            if isinstance(record, Rejected):
                dropped[record.reason] += 1
                dropped_sink.add(record, record.chars)
            else:
                kept_chars += len(record.text)
                kept_sink.add(record, len(record.text))
            if progress is not None:
                progress(read)
    return {"read": read, "kept": read - dropped.total(), "dropped": dict(dropped.most_common()),
            "kept_chars": kept_chars, "read_chars": read_chars}


class ParquetSink:
    """Appends records as bounded row groups; the file appears only once complete, so a crashed
    run never leaves a truncated Parquet file that looks finished."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self._tmp = path.with_name(path.name + ".tmp")
        self._schema = schema
        self._writer = pq.ParquetWriter(self._tmp, schema, compression="zstd")
        self._rows: list[dict] = []
        self._chars = 0

    def add(self, record: Document | Rejected, chars: int) -> None:
        self._rows.append({name: getattr(record, name) for name in self._schema.names})
        self._chars += chars
        if self._chars >= ROW_GROUP_CHARS or len(self._rows) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._schema))
        self._rows, self._chars = [], 0

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self._flush()
        self._writer.close()
        if exc_type is None:
            self._tmp.replace(self.path)
        else:
            self._tmp.unlink(missing_ok=True)
