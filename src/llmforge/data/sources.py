"""Readers that turn a source into a stream of documents, setting bad input aside, not failing.

Every input record comes out as exactly one `Document` or one `Rejected`, so the stage can account
for all of it. Reading is lazy: files are opened only when the stream reaches them.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from llmforge.data.records import Document, Record, Rejected

STDLIB = "stdlib"
# Third-party code and CPython's own test suites (full of deliberately odd files) are not the
# standard library we want to learn from.
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
PARQUET_BATCH_ROWS = 1024


Reader = Callable[[Path, str, str, str], Iterator[Record]]


def read_source(source: str, text_field: str = "text") -> Iterator[Record]:
    """Stream every record of `source` ("stdlib", a folder, or a glob) in sorted file order.

    Files are resolved now, so a source that matches nothing fails before any output is made.
    """
    if source == STDLIB:
        return stdlib_documents()
    files, root = resolve_files(source)
    return _read_files(files, root, source, text_field)


def source_files(source: str) -> list[Path]:
    """The files a source reads, so a run can tell when its input has changed."""
    return stdlib_files()[1] if source == STDLIB else resolve_files(source)[0]


def _read_files(files: list[Path], root: Path, source: str, text_field: str) -> Iterator[Record]:
    for path in files:
        rel = _display(path.relative_to(root))
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            yield Rejected(rel, source, "unsupported_type", f"suffix {path.suffix!r}")
        else:
            yield from _guarded(reader(path, rel, source, text_field), rel, source)


def stdlib_files() -> tuple[Path, list[Path]]:
    """The interpreter's standard-library `.py` files (sorted) and the folder they live in."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED_DIRS]
        found.extend(Path(folder, n) for n in names if n.endswith(".py"))
    return root, sorted(found)


def stdlib_documents() -> Iterator[Record]:
    """Built-in corpus: one document per standard-library file, id = path relative to the lib."""
    root, files = stdlib_files()
    for path in files:
        rel = path.relative_to(root).as_posix()
        yield from _guarded(_read_txt(path, rel, STDLIB, ""), rel, STDLIB)


def resolve_files(source: str) -> tuple[list[Path], Path]:
    """Files named by a folder or glob (folders expanded recursively) and their common root."""
    matches = [Path(m) for m in glob.glob(source, recursive=True)]
    files = sorted({f for m in matches for f in _expand(m)})
    if not files:
        raise FileNotFoundError(f"data source {source!r} matches no files "
                                "(expected a folder or glob of .txt/.jsonl/.parquet, or 'stdlib')")
    root = Path(os.path.commonpath([m if m.is_dir() else m.parent for m in matches]))
    return files, root


def _expand(path: Path) -> Iterator[Path]:
    """A file itself, or a folder's files; hidden entries are skipped like a shell glob does."""
    if path.is_file():
        yield path
        return
    for folder, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        yield from (Path(folder, n) for n in names if not n.startswith("."))


def _guarded(records: Iterator[Record], rel: str, source: str) -> Iterator[Record]:
    """Turn an I/O failure part-way through a file into one rejection instead of a crash."""
    done = 0
    try:
        for record in records:
            done += 1
            yield record
    except (OSError, pa.ArrowException, UnicodeDecodeError) as err:
        where = f"after {done} records: " if done else ""
        yield Rejected(rel, source, "unreadable", f"{where}{err}")


def _read_txt(path: Path, rel: str, source: str, _text_field: str) -> Iterator[Record]:
    """A whole text file is one document."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        yield Rejected(rel, source, "invalid_utf8", str(err))
        return
    yield Document(rel, text, source)


def _read_jsonl(path: Path, rel: str, source: str, text_field: str) -> Iterator[Record]:
    """One JSON object per line; blank lines are separators, not records."""
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield _parse_json_line(line, f"{rel}:{lineno}", source, text_field)


def _parse_json_line(line: bytes, doc_id: str, source: str, text_field: str) -> Record:
    try:
        obj = json.loads(line.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        return Rejected(doc_id, source, "invalid_utf8", str(err))
    except json.JSONDecodeError as err:
        return Rejected(doc_id, source, "malformed_json", str(err))
    if not isinstance(obj, dict):
        return Rejected(doc_id, source, "malformed_json", f"expected an object, got {type(obj)}")
    return _field_to_record(obj.get(text_field), doc_id, source, text_field)


def _read_parquet(path: Path, rel: str, source: str, text_field: str) -> Iterator[Record]:
    """One row per document, read a record batch at a time so big files stay out of memory."""
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        yield Rejected(rel, source, "missing_column",
                       f"no column {text_field!r} (has {pf.schema_arrow.names})")
        return
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for value in _raw_values(batch.column(0)):
            yield _field_to_record(value, f"{rel}:{row}", source, text_field)
            row += 1


def _raw_values(column: pa.Array) -> list[object]:
    """Column values, with strings as undecoded bytes so one bad row cannot spoil its batch."""
    if pa.types.is_string(column.type):
        column = column.cast(pa.binary())
    elif pa.types.is_large_string(column.type):
        column = column.cast(pa.large_binary())
    return column.to_pylist()


def _field_to_record(value: object, doc_id: str, source: str, text_field: str) -> Record:
    if value is None:
        return Rejected(doc_id, source, "missing_field", f"no {text_field!r} value")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as err:
            return Rejected(doc_id, source, "invalid_utf8", str(err))
    if not isinstance(value, str):
        return Rejected(doc_id, source, "bad_field_type",
                        f"{text_field!r} is {type(value).__name__}, not str")
    return Document(doc_id, value, source)


def _display(path: Path) -> str:
    """A path as clean UTF-8 text, even when the file name's bytes are not valid UTF-8."""
    return os.fsencode(path.as_posix()).decode("utf-8", "backslashreplace")


READERS: dict[str, Reader] = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
