"""Readers that turn a source into a stream of documents, setting bad input aside, not failing.

Every input record comes out as exactly one `Document` or one `Rejected`, so the stage can account
for all of it. Reading is lazy: files are opened only when the stream reaches them.

A source is "stdlib", a folder (read recursively), a glob, or `hf://PATH[:CONFIG][@SPLIT]` for a
Hugging Face dataset. File formats are picked by suffix: .txt (one document), .jsonl and .csv
(plain, .gz or .zst; .json.gz/.json.zst are JSON lines too), .parquet, and WARC/WET
(.warc, .warc.gz, .wet, .wet.gz). Ids are stable across runs and unique within a source:

    .txt, stdlib       path relative to the source's root
    .jsonl(.gz/.zst)   path:LINE       (1-based line number)
    .csv(.gz/.zst)     path:ROW        (1-based record number after the header)
    .parquet           path:ROW        (0-based row number)
    WARC / WET         the WARC-Record-ID, else path:OFFSET; the URL goes in meta["url"]
    hf://              PATH:SPLIT:INDEX, or PATH:SPLIT:ID when the dataset has an `id` column

A failure that spoils the rest of a file (unreadable, truncated) is one rejection named after the
file, or `path@INDEX` for a shard that starts at line/row INDEX of it.

`plan_shards` cuts a source into `Shard`s that workers read independently with `read_shard`; read
in plan order they give exactly `read_source`'s stream.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import re
import signal
import sys
import sysconfig
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import IO, Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from llmforge.data.records import Document, Record, Rejected

STDLIB = "stdlib"
# Third-party code and CPython's own test suites (full of deliberately odd files) are not the
# standard library we want to learn from.
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
PARQUET_BATCH_ROWS = 1024
SHARD_BYTES = 64 * 2**20
EXTRACT_TIMEOUT_S = 5.0
HF_PREFIX = "hf://"
HF_DEFAULT_SPLIT = "train"
HF_SOURCE = re.compile(r"hf://(?P<path>[^:@]+)(?::(?P<config>[^:@]+))?(?:@(?P<split>[^:@]+))?")
# csv refuses fields over 128 KiB by default; a long document is the length filter's to judge.
CSV_FIELD_LIMIT = 2**31 - 1
ZSTD_READ_BYTES = 2**20
# The WARC record types that hold a document; warcinfo, request, metadata, revisit and resource
# records describe the crawl and are passed over without being counted.
WARC_DOCUMENT_TYPES = frozenset({"response", "conversion"})
# Formats whose size on disk is the work of reading them, so small files of them share shards
# (as do files no reader takes: one rejection each). Compressed files, Parquet and WARCs expand
# by unknown factors and are shards of their own.
PACKABLE = frozenset({".txt", ".jsonl", ".csv"})


@dataclass(frozen=True, slots=True)
class Shard:
    """A piece of a source that one worker reads alone; plain data, so it pickles to any process.

    `files` (paths under `root`, which ids are relative to) are read whole and in order, unless
    `stop` is set: then the single file is read from `start` to `stop`, byte offsets for .jsonl and
    .csv (the shard owns the lines/rows that START in [start, stop)) or row-group indices for
    .parquet, and `first_index` counts the lines/rows before it so that ids match a whole-file
    read. A Hugging Face source is one shard with no files.
    """

    source: str
    root: str = ""
    files: tuple[str, ...] = ()
    start: int = 0
    stop: int | None = None
    first_index: int = 0


@dataclass(frozen=True, slots=True)
class _Job:
    """One file's part of a shard, with what its reader needs to name and parse the records."""

    rel: str
    source: str
    text_field: str
    extract_timeout_s: float
    start: int = 0
    stop: int | None = None
    first_index: int = 0

    @property
    def label(self) -> str:
        """Id for a failure of this part as a whole, unique even when a file is read in pieces."""
        return f"{self.rel}@{self.first_index}" if self.first_index else self.rel


Reader = Callable[[Path, _Job], Iterator[Record]]
Spans = list[tuple[int, int, int]]  # (start, stop, first_index) of each piece of a file


def read_source(source: str, text_field: str = "text", *,
                extract_timeout_s: float = EXTRACT_TIMEOUT_S) -> Iterator[Record]:
    """Stream every record of `source` in sorted file order.

    Files are resolved now, so a source that matches nothing fails before any output is made.
    """
    shards = plan_shards(source, text_field, target_bytes=sys.maxsize)  # no file is scanned
    return chain.from_iterable(read_shard(s, text_field, extract_timeout_s=extract_timeout_s)
                               for s in shards)


def source_files(source: str) -> list[Path]:
    """The files a source reads, so a run can tell when its input has changed.

    A Hub dataset has none we can see; a local `hf://` folder has its own.
    """
    if source == STDLIB:
        return stdlib_files()[1]
    if source.startswith(HF_PREFIX):
        path = _hf_spec(source)[0]
        return resolve_files(path)[0] if Path(path).exists() else []
    return resolve_files(source)[0]


def plan_shards(source: str, text_field: str = "text",
                target_bytes: int = SHARD_BYTES) -> list[Shard]:
    """Cut `source` into shards of about `target_bytes`, deterministically, in read order.

    Uncompressed .jsonl and .csv files over `target_bytes` are split into byte ranges that begin at
    a line (CSV: a record) start, and .parquet files into runs of row groups; this scans the file
    once. A .txt file is one document and is never split, nor are compressed files and WARCs (no
    random access): those are a shard each. Smaller uncompressed files (and the stdlib's) are
    packed together in order up to `target_bytes`. A Hugging Face source is a single shard.
    """
    if source.startswith(HF_PREFIX):
        _hf_spec(source)  # a malformed name fails now, not in a worker
        return [Shard(source)]
    if source == STDLIB:
        root, files = stdlib_files()
    else:
        files, root = resolve_files(source)
    return list(_file_shards(source, str(root), files, text_field, target_bytes))


def read_shard(shard: Shard, text_field: str = "text", *,
               extract_timeout_s: float = EXTRACT_TIMEOUT_S) -> Iterator[Record]:
    """Exactly the records of `shard`; `extract_timeout_s` bounds HTML extraction per page.

    A Hugging Face dataset is opened now, so a wrong name raises instead of reading as empty.
    """
    if shard.source.startswith(HF_PREFIX):
        job = _Job(shard.source, shard.source, text_field, extract_timeout_s)
        return _guarded(_read_hf(job), job)
    return _read_files(shard, text_field, extract_timeout_s)


def _read_files(shard: Shard, text_field: str, extract_timeout_s: float) -> Iterator[Record]:
    for name in shard.files:
        path = Path(name)
        job = _Job(_display(path.relative_to(shard.root)), shard.source, text_field,
                   extract_timeout_s, shard.start, shard.stop, shard.first_index)
        reader = _read_txt if shard.source == STDLIB else READERS.get(_format(path))
        if reader is None:
            yield Rejected(job.rel, shard.source, "unsupported_type", f"suffix {path.suffix!r}")
        else:
            yield from _guarded(reader(path, job), job)


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
    return read_source(STDLIB)


def resolve_files(source: str) -> tuple[list[Path], Path]:
    """Files named by a folder or glob (folders expanded recursively) and their common root."""
    matches = [Path(m) for m in glob.glob(source, recursive=True)]
    files = sorted({f for m in matches for f in _expand(m)})
    if not files:
        raise FileNotFoundError(
            f"data source {source!r} matches no files (expected a folder or glob of "
            ".txt/.jsonl/.csv/.parquet/.warc/.wet files, 'stdlib', or hf://owner/name)")
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


def _format(path: Path) -> str:
    """The longest known suffix of the name (".jsonl.gz" before ".gz"), else its last suffix."""
    name = path.name.lower()
    return max((s for s in READERS if name.endswith(s)), key=len, default=path.suffix.lower())


def _guarded(records: Iterator[Record], job: _Job) -> Iterator[Record]:
    """Turn a failure part-way through a file into one rejection instead of a crash."""
    done = 0
    try:
        for record in records:
            done += 1
            yield record
    except EOFError as err:  # a compressed stream that stops before its end marker
        yield Rejected(job.label, job.source, "truncated_file", f"after {done} records: {err}")
    except (OSError, pa.ArrowException, UnicodeDecodeError, zlib.error,
            zstandard.ZstdError) as err:
        where = f"after {done} records: " if done else ""
        yield Rejected(job.label, job.source, "unreadable", f"{where}{err}")


# --- planning -------------------------------------------------------------------------------


def _file_shards(source: str, root: str, files: list[Path], text_field: str,
                 target: int) -> Iterator[Shard]:
    """Big splittable files cut into pieces, compressed ones alone, the rest packed in order."""
    group: list[str] = []
    grouped = 0
    for path in files:
        size = _size(path)
        own = _own_shards(source, root, path, size, text_field, target)
        if group and (own or grouped + size > target):
            yield Shard(source, root, tuple(group))
            group, grouped = [], 0
        if own:
            yield from own
        else:
            group.append(str(path))
            grouped += size
    if group:
        yield Shard(source, root, tuple(group))


def _own_shards(source: str, root: str, path: Path, size: int, text_field: str,
                target: int) -> list[Shard]:
    """The shards of a file that is not packed with others: its pieces, or itself whole."""
    if size > target and (pieces := _pieces(path, size, text_field, target)):
        return [Shard(source, root, (str(path),), *piece) for piece in pieces]
    if source == STDLIB or _format(path) in PACKABLE or _format(path) not in READERS:
        return []
    return [Shard(source, root, (str(path),))]


def _size(path: Path) -> int:
    """Bytes on disk; a file that cannot be stat'ed weighs nothing and fails when read."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _pieces(path: Path, size: int, text_field: str, target: int) -> Spans:
    """The pieces to read `path` in, or [] to read it whole (not splittable, or one piece)."""
    splitter = SPLITTERS.get(_format(path))
    if splitter is None:
        return []
    try:
        spans = splitter(path, size, text_field, target)
    except (OSError, pa.ArrowException):  # the reader will report it
        return []
    return spans if len(spans) > 1 else []


def _jsonl_spans(path: Path, size: int, _text_field: str, target: int) -> Spans:
    with path.open("rb") as f:
        return _byte_spans(_line_starts(f), size, target)


def _csv_spans(path: Path, size: int, text_field: str, target: int) -> Spans:
    """Record starts come from parsing, since a quoted field may hold newlines."""
    with path.open("rb") as f:
        rows = _csv_rows(f, 0)
        header = next(rows, (0, None))[1]
        if isinstance(_column(header, text_field), str):  # one rejection for the whole file
            return []
        return _byte_spans((offset for offset, _ in rows), size, target)


def _parquet_spans(path: Path, _size: int, text_field: str, target: int) -> Spans:
    """Runs of row groups of about `target` uncompressed bytes, from the footer alone."""
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:  # one rejection for the whole file
        return []
    spans: Spans = []
    begin = first_row = rows = weight = 0
    for i in range(pf.metadata.num_row_groups):
        if weight >= target:
            spans.append((begin, i, first_row))
            begin, first_row, weight = i, rows, 0
        group = pf.metadata.row_group(i)
        weight += group.total_byte_size
        rows += group.num_rows
    spans.append((begin, pf.metadata.num_row_groups, first_row))
    return spans


def _line_starts(f: IO[bytes]) -> Iterator[int]:
    offset = 0
    for line in f:
        yield offset
        offset += len(line)


def _byte_spans(starts: Iterable[int], size: int, target: int) -> Spans:
    """Ranges of at least `target` bytes (the last may be less), each beginning where a unit (a
    line or a CSV record) begins; `first_index` is the number of units before the range."""
    starts = iter(starts)
    begin = next(starts, None)
    if begin is None:
        return []
    spans: Spans = []
    first = 0
    for index, offset in enumerate(starts, start=1):
        if offset - begin >= target:
            spans.append((begin, offset, first))
            begin, first = offset, index
    spans.append((begin, size, first))
    return spans


# --- plain and compressed files -------------------------------------------------------------


@contextmanager
def _open_binary(path: Path) -> Iterator[IO[bytes]]:
    """The file's bytes, decompressed as its name says (.gz, .zst)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            yield f
    elif name.endswith(".zst"):
        with path.open("rb") as raw:
            yield io.BufferedReader(_ChunkReader(_zstd_chunks(raw)))
    else:
        with path.open("rb") as f:
            yield f


def _zstd_chunks(raw: IO[bytes]) -> Iterator[bytes]:
    """Decompressed bytes of every frame; EOFError if the last frame is cut short, which the
    zstandard stream reader would pass over in silence."""
    decompressor = zstandard.ZstdDecompressor()
    frame, in_frame = decompressor.decompressobj(), False
    while data := raw.read(ZSTD_READ_BYTES):
        while data:
            in_frame = True
            if out := frame.decompress(data):
                yield out
            data = b""
            if frame.eof:
                data, frame, in_frame = frame.unused_data, decompressor.decompressobj(), False
    if in_frame:
        raise EOFError("zstd stream ended before the end of its last frame")


class _ChunkReader(io.RawIOBase):
    """A readable file over a stream of byte chunks, so buffered line reading works on it."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._rest = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._rest:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._rest = memoryview(chunk)
        n = min(len(buffer), len(self._rest))
        buffer[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n


def _lines(f: IO[bytes], start: int, stop: int | None) -> Iterator[bytes]:
    """The lines that start in [start, stop), `start` being a line start."""
    if start:
        f.seek(start)
    offset = start
    for line in f:
        if stop is not None and offset >= stop:
            return
        offset += len(line)
        yield line


def _read_txt(path: Path, job: _Job) -> Iterator[Record]:
    """A whole text file is one document."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        yield Rejected(job.rel, job.source, "invalid_utf8", str(err))
        return
    yield Document(job.rel, text, job.source)


def _read_jsonl(path: Path, job: _Job) -> Iterator[Record]:
    """One JSON object per line; blank lines are separators, not records."""
    with _open_binary(path) as f:
        lines = _lines(f, job.start, job.stop)
        for lineno, line in enumerate(lines, start=job.first_index + 1):
            if line.strip():
                yield _parse_json_line(line, f"{job.rel}:{lineno}", job.source, job.text_field)


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


# --- CSV ------------------------------------------------------------------------------------


def _read_csv(path: Path, job: _Job) -> Iterator[Record]:
    """A header row naming the columns, then one document per record; blank lines are
    separators that still take a record number."""
    with _open_binary(path) as f:
        rows = _csv_rows(f, 0)
        column = _column(next(rows, (0, None))[1], job.text_field)
        if isinstance(column, str):
            yield Rejected(job.label, job.source, "missing_column", column)
            return
        if job.start:
            rows = _csv_rows(f, job.start)
        for index, (offset, row) in enumerate(rows, start=job.first_index + 1):
            if job.stop is not None and offset >= job.stop:
                return
            if row != []:
                yield _csv_record(row, column, f"{job.rel}:{index}", job)


def _column(header: list[str] | csv.Error | None, text_field: str) -> int | str:
    """Index of the text column, or why there is none."""
    if header is None:
        return "empty file: no header row"
    if isinstance(header, csv.Error):
        return f"unreadable header row: {header}"
    names = [header[0].removeprefix("\ufeff"), *header[1:]] if header else []
    if text_field not in names:
        return f"no column {text_field!r} (has {names})"
    return names.index(text_field)


def _csv_record(row: list[str] | csv.Error, column: int, doc_id: str, job: _Job) -> Record:
    if isinstance(row, csv.Error):
        return Rejected(doc_id, job.source, "malformed_csv", str(row))
    if len(row) <= column:
        return Rejected(doc_id, job.source, "missing_field", f"no {job.text_field!r} value")
    # Back to the file's bytes, so undecodable ones are judged like in every other format.
    raw = row[column].encode("utf-8", "surrogateescape")
    return _field_to_record(raw, doc_id, job.source, job.text_field)


class _TrackedLines:
    """Lines of a binary file as text, counting the bytes handed out; csv pulls lines only as it
    needs them, so the count before each row is where that row starts."""

    def __init__(self, f: IO[bytes], offset: int) -> None:
        self.offset = offset
        self._lines = iter(f)

    def __iter__(self) -> _TrackedLines:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self.offset += len(line)
        return line.decode("utf-8", "surrogateescape")


def _csv_rows(f: IO[bytes], offset: int) -> Iterator[tuple[int, list[str] | csv.Error]]:
    """(start offset, fields) of each CSV record from `offset` (a record start); a record csv
    cannot parse comes as its error, and reading goes on after it."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    if offset:
        f.seek(offset)
    lines = _TrackedLines(f, offset)
    reader = csv.reader(lines)
    while True:
        start = lines.offset
        try:
            row: list[str] | csv.Error = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            row = err
        yield start, row


# --- Parquet --------------------------------------------------------------------------------


def _read_parquet(path: Path, job: _Job) -> Iterator[Record]:
    """One row per document, read a record batch at a time so big files stay out of memory."""
    pf = pq.ParquetFile(path)
    if job.text_field not in pf.schema_arrow.names:
        yield Rejected(job.label, job.source, "missing_column",
                       f"no column {job.text_field!r} (has {pf.schema_arrow.names})")
        return
    groups = None if job.stop is None else range(job.start, job.stop)
    batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups,
                              columns=[job.text_field])
    row = job.first_index
    for batch in batches:
        for value in _raw_values(batch.column(0)):
            yield _field_to_record(value, f"{job.rel}:{row}", job.source, job.text_field)
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


# --- WARC / WET -----------------------------------------------------------------------------


class _WarcEntry(NamedTuple):
    doc_id: str
    url: str
    rec_type: str
    content_type: str
    payload: bytes | None  # None: not a type we extract text from, so left unread


class _ExtractionTimeout(BaseException):
    """Raised by SIGALRM; not an Exception, so the extractor's own `except Exception` blocks
    cannot swallow it and carry on."""


def _read_warc(path: Path, job: _Job) -> Iterator[Record]:
    """WET `conversion` records are text already; HTML `response` records go through
    trafilatura; other responses are set aside as `unsupported_type`."""
    with path.open("rb") as f:
        for entry in _warc_entries(f, job):
            yield entry if isinstance(entry, Rejected) else _warc_document(entry, job)


def _warc_entries(f: IO[bytes], job: _Job) -> Iterator[_WarcEntry | Rejected]:
    """The document records of a WARC; damage (a record or file cut short, bytes warcio cannot
    parse) ends the file with one rejection, since warcio stops silently or raises anything."""
    from warcio.archiveiterator import ArchiveIterator

    records = ArchiveIterator(f)
    try:
        for record in records:
            if record.rec_type not in WARC_DOCUMENT_TYPES:
                continue
            payload = _warc_payload(record)
            cut = payload is not None and getattr(record.raw_stream, "limit", 0) > 0
            # Only now: asking for the offset reads the record to its end.
            entry = _warc_entry(record, payload, records.get_record_offset(), job)
            if cut:
                yield Rejected(entry.doc_id, job.source, "truncated_file",
                               "record cut off by the end of the file")
                return
            yield entry
    except Exception as err:  # warcio raises anything, even AttributeError, on bad input
        yield Rejected(job.label, job.source, "unreadable",
                       f"after offset {records.offset}: {type(err).__name__}: {err}")
        return
    size = os.fstat(f.fileno()).st_size
    if records.offset < size:
        yield Rejected(job.label, job.source, "truncated_file",
                       f"{size - records.offset} bytes after the last whole record")


def _warc_payload(record: Any) -> bytes | None:
    """The decoded payload of a record we take text from; None (unread) for any other."""
    wanted = record.rec_type == "conversion" or "html" in _content_type(record).lower()
    return record.content_stream().read() if wanted else None


def _content_type(record: Any) -> str:
    return (record.http_headers or record.rec_headers).get_header("Content-Type") or ""


def _warc_entry(record: Any, payload: bytes | None, offset: int, job: _Job) -> _WarcEntry:
    headers = record.rec_headers
    doc_id = headers.get_header("WARC-Record-ID") or f"{job.rel}:{offset}"
    url = headers.get_header("WARC-Target-URI") or ""
    return _WarcEntry(doc_id, url, record.rec_type, _content_type(record), payload)


def _warc_document(entry: _WarcEntry, job: _Job) -> Record:
    if entry.payload is None:
        return Rejected(entry.doc_id, job.source, "unsupported_type",
                        f"{entry.rec_type} of type {entry.content_type!r}")
    if entry.rec_type == "conversion":
        try:
            text: str | None = entry.payload.decode("utf-8")
        except UnicodeDecodeError as err:
            return Rejected(entry.doc_id, job.source, "invalid_utf8", str(err))
    else:
        try:
            text = _extract_html(entry.payload, entry.url, job.extract_timeout_s)
        except _ExtractionTimeout:
            return Rejected(entry.doc_id, job.source, "extraction_timeout",
                            f"over {job.extract_timeout_s}s")
        except Exception as err:  # one odd page must not end the file
            return Rejected(entry.doc_id, job.source, "extraction_failed", repr(err))
    if not text or not text.strip():
        return Rejected(entry.doc_id, job.source, "no_text_extracted",
                        f"{len(entry.payload)} bytes gave no text")
    return Document(entry.doc_id, text, job.source, {"url": entry.url})


def _extract_html(html: bytes, url: str, timeout_s: float) -> str | None:
    """Main text of a page, favouring precision (boilerplate and comments left out); offline."""
    import trafilatura

    with _time_limit(timeout_s):
        return trafilatura.extract(html, url=url or None, favor_precision=True,
                                   include_comments=False)


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise _ExtractionTimeout in the block after `seconds` (0: no limit).

    Uses SIGALRM, so it only applies in the main thread, where setitimer exists (not Windows), and
    when no other alarm is pending (we do not steal it); elsewhere the block runs unbounded. A
    long call inside C code is interrupted when it returns to Python.
    """
    usable = (seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread()
              and signal.getitimer(signal.ITIMER_REAL)[0] == 0)
    if not usable:
        yield
        return

    def expire(_signum: int, _frame: object) -> None:
        raise _ExtractionTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- Hugging Face ---------------------------------------------------------------------------


def _hf_spec(source: str) -> tuple[str, str | None, str]:
    """(path, config, split) of `hf://PATH[:CONFIG][@SPLIT]`, split "train" by default.

    PATH is a Hub name (`owner/name`) or, as `datasets.load_dataset` decides, a local dataset
    folder when one exists there: `hf:///abs/path` or `hf://./relative/path`. None of the parts
    may contain ':' or '@'.
    """
    match = HF_SOURCE.fullmatch(source)
    if match is None:
        raise ValueError(f"bad Hugging Face source {source!r}: "
                         "expected hf://owner/name[:config][@split]")
    return match["path"], match["config"], match["split"] or HF_DEFAULT_SPLIT


def _read_hf(job: _Job) -> Iterator[Record]:
    """Rows streamed from the dataset, never downloaded whole; opened at call time."""
    from datasets import load_dataset  # the optional `hf` extra

    path, config, split = _hf_spec(job.source)
    rows = load_dataset(path, name=config, split=split, streaming=True)
    return _hf_records(rows, f"{path}:{split}", job)


def _hf_records(rows: Iterable[dict], prefix: str, job: _Job) -> Iterator[Record]:
    for index, row in enumerate(rows):
        key = row.get("id")
        doc_id = f"{prefix}:{index if key is None else key}"
        yield _field_to_record(row.get(job.text_field), doc_id, job.source, job.text_field)


def _display(path: Path) -> str:
    """A path as clean UTF-8 text, even when the file name's bytes are not valid UTF-8."""
    return os.fsencode(path.as_posix()).decode("utf-8", "backslashreplace")


READERS: dict[str, Reader] = {
    ".txt": _read_txt,
    **dict.fromkeys([".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst"], _read_jsonl),
    **dict.fromkeys([".csv", ".csv.gz", ".csv.zst"], _read_csv),
    ".parquet": _read_parquet,
    **dict.fromkeys([".warc", ".warc.gz", ".wet", ".wet.gz"], _read_warc),
}
SPLITTERS: dict[str, Callable[[Path, int, str, int], Spans]] = {
    ".jsonl": _jsonl_spans, ".csv": _csv_spans, ".parquet": _parquet_spans,
}
