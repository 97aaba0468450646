"""Request store: every request `llmforge serve` answers, and the feedback users give on it.

Monitoring must never cost a user their answer, so records are handed to one background writer
thread through a bounded queue and inserted in batches; a slow or broken database only makes
records drop, and every drop is counted in `RequestStore.failures` by reason. Feedback is written
synchronously, since the caller needs to know whether it was stored.

SQLite (the default) runs in WAL mode with a busy timeout, and every write transaction is begun
IMMEDIATE, so many threads and many processes can write one file without losing rows; any other
SQLAlchemy URL (PostgreSQL: `postgresql+psycopg://user@host:port/db`) works too. When asked,
personal data is redacted before it is written, with the data stage's redactor.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    TypeDecorator,
    and_,
    create_engine,
    event,
    func,
    or_,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.sql import Select

from llmforge.data.filters.pii import redact

log = logging.getLogger(__name__)

# Key of the PostgreSQL advisory lock that serialises table creation across processes.
_SCHEMA_LOCK = 0x6C6D66
# How long `add_feedback` waits for queued records before calling a request id unknown.
_FEEDBACK_WAIT_S = 5.0


class _UTCDateTime(TypeDecorator):
    """Timestamps stored as naive UTC on every backend, returned as aware UTC datetimes;
    naive inputs are taken to be UTC already."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None or value.tzinfo is None:
            return value
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


_META = MetaData()

REQUESTS = Table(
    "requests", _META,
    Column("id", String, primary_key=True),
    Column("created_at", _UTCDateTime, nullable=False, index=True),
    Column("model", String, nullable=False),
    Column("model_version", String, nullable=False, index=True),
    Column("client_id", String),
    Column("endpoint", String, nullable=False),
    Column("prompt", Text, nullable=False),
    Column("output", Text, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("finish_reason", String),
    Column("ttft_ms", Float),
    Column("e2e_ms", Float),
    Column("itl_ms", Float),
    Column("sampling", Text, nullable=False),
    Column("status", String, nullable=False),
    Column("error", Text),
    Column("safety_flags", Text, nullable=False),
)

FEEDBACK = Table(
    "feedback", _META,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String, ForeignKey("requests.id", ondelete="CASCADE"), nullable=False,
           index=True),
    Column("created_at", _UTCDateTime, nullable=False),
    Column("thumb", SmallInteger),
    Column("rating", SmallInteger),
    Column("preferred", Text),
    Column("note", Text),
)


@dataclass
class RequestRecord:
    """One served request. `id` is the response id the API returned; `prompt` is the prompt
    text, or the chat messages (stored as JSON); `itl_ms` is the mean inter-token latency."""

    id: str
    model: str
    prompt: str | list[Any]
    output: str
    model_version: str = ""
    client_id: str | None = None
    endpoint: str = "completions"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    itl_ms: float | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"
    error: str | None = None
    safety_flags: list[str] = field(default_factory=list)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def _given(value: object) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


@dataclass(frozen=True)
class Feedback:
    """A user's verdict on a stored response: thumbs (-1, 0, 1), a rating (1-5), the answer they
    would have preferred, a free-text note; any subset, but not none."""

    thumb: int | None = None
    rating: int | None = None
    preferred: str | None = None
    note: str | None = None

    def validate(self) -> None:
        """Raise ValueError, saying what is wrong, unless this feedback can be stored."""
        if not any(_given(v) for v in (self.thumb, self.rating, self.preferred, self.note)):
            raise ValueError("feedback needs at least one of thumb, rating, preferred, note")
        if self.thumb is not None and (type(self.thumb) is not int or self.thumb not in (-1, 0, 1)):
            raise ValueError(f"thumb must be -1, 0 or 1, not {self.thumb!r}")
        if self.rating is not None and (type(self.rating) is not int or not 1 <= self.rating <= 5):
            raise ValueError(f"rating must be an integer from 1 to 5, not {self.rating!r}")
        for name in ("preferred", "note"):
            if not isinstance(getattr(self, name), str | None):
                raise ValueError(f"{name} must be text")

    def kinds(self) -> list[str]:
        """What this feedback holds: thumb_up / thumb_down, rating, preferred, note."""
        thumb = {1: ["thumb_up"], -1: ["thumb_down"]}.get(self.thumb, [])
        return [*thumb, *(name for name in ("rating", "preferred", "note")
                          if _given(getattr(self, name)))]


def _redact_text(value: str) -> str:
    return redact(value)[0]


def _redact_json(value: Any) -> Any:
    """Redact every string value inside chat messages (keys are left alone)."""
    if isinstance(value, str):
        return _redact_text(value)
    if isinstance(value, list):
        return [_redact_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _redact_json(v) for k, v in value.items()}
    return value


def _request_row(record: RequestRecord, redact_pii: bool) -> dict[str, Any]:
    """The table row for a record, with personal data redacted when asked."""
    row = {f.name: getattr(record, f.name) for f in fields(RequestRecord)}
    prompt, output = record.prompt, record.output
    if redact_pii:
        prompt, output = _redact_json(prompt), _redact_text(output)
    row["prompt"] = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
    row["output"] = output
    row["sampling"] = json.dumps(record.sampling, ensure_ascii=False)
    row["safety_flags"] = json.dumps(list(record.safety_flags), ensure_ascii=False)
    return row


def _decode_request(row: Any) -> dict[str, Any]:
    out = dict(row._mapping)
    out["sampling"] = json.loads(out["sampling"])
    out["safety_flags"] = json.loads(out["safety_flags"])
    return out


def _selected(query: Select[Any], created_at: Any, since: datetime | None,
              until: datetime | None, model_version: str | None) -> Select[Any]:
    """`query` narrowed to `created_at` in [since, until) and to one model version's requests
    (each bound only when given)."""
    if since is not None:
        query = query.where(created_at >= since)
    if until is not None:
        query = query.where(created_at < until)
    if model_version is not None:
        query = query.where(REQUESTS.c.model_version == model_version)
    return query


def _configure_sqlite(engine: Engine, busy_timeout_s: float) -> None:
    """WAL and a busy timeout on every connection; write transactions begin IMMEDIATE, so a
    writer waits for the lock up front instead of failing when it upgrades a read lock."""
    pragmas = (f"busy_timeout = {int(busy_timeout_s * 1000)}", "journal_mode = WAL",
               "synchronous = NORMAL", "foreign_keys = ON")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # the driver begins nothing; `_on_begin` does
        cursor = dbapi_conn.cursor()
        for pragma in pragmas:
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if not conn.get_execution_options().get("llmforge_read"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def _make_engine(url: str, busy_timeout_s: float) -> Engine:
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        if engine.url.database in (None, "", ":memory:"):
            raise ValueError(f"the request store needs a SQLite file, not {url!r}")
        _configure_sqlite(engine, busy_timeout_s)
    return engine


def _create_tables(engine: Engine) -> None:
    """Create missing tables; safe when several processes start at once."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
        _META.create_all(conn)


class RequestStore:
    """Stores served requests (asynchronously, never failing the caller) and their feedback.

    `retention_days` and `max_rows` bound what is kept; the writer applies them every
    `retention_interval_s`. Safe to share between threads; each process opens its own store.
    """

    def __init__(self, url: str = "sqlite:///llmforge-requests.db", *, redact_pii: bool = False,
                 retention_days: float | None = None, max_rows: int | None = None,
                 queue_size: int = 10_000, batch_size: int = 256,
                 retention_interval_s: float = 60.0, busy_timeout_s: float = 30.0) -> None:
        if retention_days is not None and retention_days <= 0:
            raise ValueError(f"retention_days must be positive, not {retention_days}")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, not {max_rows}")
        self.redact_pii = redact_pii
        self.retention_days = retention_days
        self.max_rows = max_rows
        self.failures: Counter[str] = Counter()
        self._batch_size = batch_size
        self._retention_interval_s = retention_interval_s
        self._last_retention = -math.inf
        self._engine = _make_engine(url, busy_timeout_s)
        self._reader = self._engine.execution_options(llmforge_read=True)
        _create_tables(self._engine)
        self._queue: queue.Queue[RequestRecord] = queue.Queue(queue_size)
        self._closing = threading.Event()
        self._put_lock = threading.Lock()
        self._failures_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="llmforge-request-store",
                                        daemon=True)
        self._thread.start()

    # Writing requests: the caller only queues.

    def log(self, record: RequestRecord) -> None:
        """Queue a record for writing. Never blocks or raises; a record that cannot be queued
        is counted in `failures` ("queue_full", "closed")."""
        with self._put_lock:
            if self._closing.is_set():
                self._fail("closed")
                return
            try:
                self._queue.put_nowait(record)
            except queue.Full:
                self._fail("queue_full")

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued record has been written (or counted as failed); False if
        `timeout` seconds passed first."""
        done = self._queue.all_tasks_done
        with done:
            return done.wait_for(lambda: not self._queue.unfinished_tasks, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, stop the writer and release the database."""
        with self._put_lock:
            self._closing.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._fail("unwritten_at_close", self._queue.unfinished_tasks)
        self._engine.dispose()

    def __enter__(self) -> RequestStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def failure_counts(self) -> dict[str, int]:
        """A snapshot of `failures`, safe to take while the writer counts."""
        with self._failures_lock:
            return dict(self.failures)

    def _fail(self, reason: str, n: int = 1, exc: BaseException | None = None) -> None:
        """Count `n` lost records; the first failure of each kind is logged, later ones only
        counted."""
        with self._failures_lock:
            first = reason not in self.failures
            self.failures[reason] += n
        if first:
            log.warning("request store: %s (%s); further ones are only counted", reason,
                        exc or "no detail")

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._write(batch)
                self._retain_if_due()
            except Exception as exc:  # the writer must outlive anything
                self._fail("writer_error", len(batch), exc)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _next_batch(self) -> list[RequestRecord] | None:
        """Up to `batch_size` queued records, waiting for the first; None once closed and
        drained."""
        batch: list[RequestRecord] = []
        while not batch:
            try:
                batch.append(self._queue.get(timeout=0.2))
            except queue.Empty:
                if self._closing.is_set():
                    return None
        while len(batch) < self._batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _write(self, batch: list[RequestRecord]) -> None:
        rows = []
        for record in batch:
            try:
                rows.append(_request_row(record, self.redact_pii))
            except Exception as exc:  # whatever a caller put in a record
                self._fail("bad_record", exc=exc)
        if not rows:
            return
        try:
            self._insert(rows)
        except IntegrityError:  # one bad row (a repeated id) must not sink the batch
            self._insert_each(rows)
        except SQLAlchemyError as exc:
            self._fail("db_error", len(rows), exc)

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        with self._engine.begin() as conn:
            conn.execute(REQUESTS.insert(), rows)

    def _insert_each(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            try:
                self._insert([row])
            except SQLAlchemyError as exc:
                self._fail("integrity" if isinstance(exc, IntegrityError) else "db_error", exc=exc)

    # Retention.

    def _retain_if_due(self) -> None:
        if self.retention_days is None and self.max_rows is None:
            return
        now = time.monotonic()
        if now - self._last_retention < self._retention_interval_s:
            return
        self._last_retention = now
        try:
            self.apply_retention()
        except SQLAlchemyError as exc:
            self._fail("retention_error", exc=exc)

    def apply_retention(self) -> int:
        """Delete requests older than `retention_days` and all but the newest `max_rows`, with
        their feedback; returns how many requests were deleted."""
        deleted = 0
        with self._engine.begin() as conn:
            if self.retention_days is not None:
                cutoff = datetime.now(UTC) - timedelta(days=self.retention_days)
                deleted += conn.execute(
                    REQUESTS.delete().where(REQUESTS.c.created_at < cutoff)).rowcount
            if self.max_rows is not None:
                deleted += self._trim(conn, self.max_rows)
        return deleted

    @staticmethod
    def _trim(conn: Connection, keep: int) -> int:
        """Delete all but the newest `keep` requests (newest by created_at, then id)."""
        c = REQUESTS.c
        boundary = conn.execute(select(c.created_at, c.id)
                                .order_by(c.created_at.desc(), c.id.desc())
                                .offset(keep).limit(1)).first()
        if boundary is None:
            return 0
        at, request_id = boundary
        older = or_(c.created_at < at, and_(c.created_at == at, c.id <= request_id))
        return conn.execute(REQUESTS.delete().where(older)).rowcount

    # Feedback.

    def add_feedback(self, request_id: str, feedback: Feedback) -> int:
        """Store feedback on a stored response and return its id. Raises ValueError for invalid
        feedback and KeyError for a request id the store does not hold."""
        feedback.validate()
        preferred, note = feedback.preferred, feedback.note
        if self.redact_pii:
            preferred = None if preferred is None else _redact_text(preferred)
            note = None if note is None else _redact_text(note)
        row = {"request_id": request_id, "created_at": datetime.now(UTC),
               "thumb": feedback.thumb, "rating": feedback.rating, "preferred": preferred,
               "note": note}
        feedback_id = self._insert_feedback(row)
        if feedback_id is None and self.flush(_FEEDBACK_WAIT_S):  # the request may be queued
            feedback_id = self._insert_feedback(row)
        if feedback_id is None:
            raise KeyError(f"no stored request with id {request_id!r}")
        return feedback_id

    def _insert_feedback(self, row: dict[str, Any]) -> int | None:
        """The new feedback id, or None when the request id is unknown."""
        try:
            with self._engine.begin() as conn:
                return conn.execute(FEEDBACK.insert().values(row)).inserted_primary_key[0]
        except IntegrityError:
            return None

    # Reading.

    def _read(self, query: Select[Any]) -> list[Any]:
        with self._reader.connect() as conn:
            return list(conn.execute(query))

    def count(self) -> int:
        """How many requests are stored."""
        return self._read(select(func.count()).select_from(REQUESTS))[0][0]

    def requests(self, since: datetime | None = None, until: datetime | None = None,
                 model_version: str | None = None, limit: int | None = None
                 ) -> list[dict[str, Any]]:
        """Stored requests, oldest first, created in [since, until), optionally of one model
        version; `sampling` and `safety_flags` come back decoded, `prompt` as stored text."""
        c = REQUESTS.c
        query = _selected(select(REQUESTS).order_by(c.created_at, c.id).limit(limit),
                          c.created_at, since, until, model_version)
        return [_decode_request(row) for row in self._read(query)]

    def feedback_with_requests(self, since: datetime | None = None,
                               until: datetime | None = None,
                               model_version: str | None = None) -> list[dict[str, Any]]:
        """Feedback entries given in [since, until), oldest first, optionally on one model
        version's answers, with the prompt and output each is about."""
        f, r = FEEDBACK.c, REQUESTS.c
        query = (select(f.id.label("feedback_id"), f.request_id, f.created_at, f.thumb, f.rating,
                        f.preferred, f.note, r.model, r.model_version, r.client_id, r.endpoint,
                        r.prompt, r.output, r.sampling)
                 .join_from(FEEDBACK, REQUESTS).order_by(f.id))
        query = _selected(query, f.created_at, since, until, model_version)
        return [{**row._mapping, "sampling": json.loads(row.sampling)}
                for row in self._read(query)]
