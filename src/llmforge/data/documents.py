"""Reading the data stage's output: one Parquet file or a folder of `part-*.parquet` files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def document_files(path: Path) -> list[Path]:
    """The Parquet files of a document set, in their fixed order."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet documents in {path}")
    return files


def document_batches(
    path: Path, columns: list[str], batch_size: int = 1024
) -> Iterator[pa.RecordBatch]:
    """Record batches of `columns` over every file, in order, never the whole set in memory."""
    for file in document_files(path):
        yield from pq.ParquetFile(file).iter_batches(batch_size=batch_size, columns=columns)
