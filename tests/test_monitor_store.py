"""Request store on real databases: SQLite always, PostgreSQL on a server started for the tests."""

import multiprocessing
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from llmforge.monitor.store import Feedback, RequestRecord, RequestStore

WRITERS, ROWS_EACH = 16, 250


def _record(request_id, **overrides):
    fields = {"model": "tiny", "model_version": "v1", "prompt": f"prompt of {request_id}",
              "output": f"output of {request_id}", "prompt_tokens": 5, "completion_tokens": 7,
              "ttft_ms": 12.5, "e2e_ms": 80.0, "itl_ms": 9.75,
              "sampling": {"temperature": 0.7, "top_p": 0.9}, "safety_flags": []}
    return RequestRecord(id=request_id, **{**fields, **overrides})


def _write_in_process(url, prefix, n):
    """Child process body: its own store on the shared database."""
    store = RequestStore(url)
    for i in range(n):
        store.log(_record(f"{prefix}-{i}"))
    store.close()
    sys.exit(1 if store.failures else 0)


# PostgreSQL: a throwaway server, run as an unprivileged user when the tests run as root.

def _run_unprivileged(root):
    """A runner for server commands; initdb and postgres refuse to run as root."""
    kwargs = {"check": True, "capture_output": True, "text": True, "cwd": root}
    if os.geteuid() == 0:
        # Not `nobody`: the code sandbox's tests run untrusted programs as nobody and check
        # that no process of that user outlives them.
        owner = next((user for name in ("postgres", "daemon")
                      if (user := _user(name)) is not None), None)
        if owner is None:
            pytest.skip("running as root and there is no 'postgres' or 'daemon' user to run "
                        "PostgreSQL as")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        kwargs |= {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": [],
                   "env": {**os.environ, "HOME": str(root)}}
    return lambda args: subprocess.run(args, **kwargs)


def _user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _pg_binary(name: str) -> str | None:
    """A PostgreSQL program on PATH, or where Debian's postgresql package puts it."""
    found = shutil.which(name)
    debian = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return found or (str(debian[-1]) if debian else None)


@pytest.fixture(scope="module")
def postgres_server():
    """URL template of a PostgreSQL server reachable only through a socket in a private dir."""
    initdb, pg_ctl = (_pg_binary(name) for name in ("initdb", "pg_ctl"))
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found on PATH or in "
                    "/usr/lib/postgresql/*/bin (Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver (psycopg) is not installed")
    # Not under pytest's tmp dir, which only root may enter.
    root = Path(tempfile.mkdtemp(prefix="llmforge-pg-"))
    run, data = _run_unprivileged(root), str(root / "data")
    run([initdb, "-D", data, "-U", "postgres", "--auth=trust", "-N"])
    # No TCP: the port only names the socket file in our own dir, so it cannot clash.
    options = f"-p 5432 -k {root} -c listen_addresses='' -c fsync=off"
    run([pg_ctl, "-D", data, "-o", options, "-l", str(root / "log"), "-w", "start"])
    try:
        yield f"postgresql+psycopg://postgres@/{{db}}?host={root}&port=5432"
    finally:
        run([pg_ctl, "-D", data, "-m", "fast", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh database on the test server."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_server.format(db="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return postgres_server.format(db=name)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'requests.db'}"
    return request.getfixturevalue("postgres_url")


def _assert_exactly(url, expected_ids):
    with RequestStore(url) as store:
        rows = store.requests()
        assert store.count() == len(rows) == len(expected_ids)
        assert {row["id"] for row in rows} == expected_ids


# Concurrency: 16 writers, 4000 rows, nothing lost.

@pytest.mark.parametrize("shared", [True, False], ids=["one-store", "store-each"])
def test_sixteen_threads_write_concurrently(db_url, shared):
    """Sixteen threads log through one shared store, or each through its own store (so sixteen
    engines and writer threads contend for the database)."""
    if shared:
        stores = [RequestStore(db_url)] * WRITERS
    else:
        stores = [RequestStore(db_url) for _ in range(WRITERS)]
    start = threading.Barrier(WRITERS)

    def writer(w):
        start.wait()
        for i in range(ROWS_EACH):
            stores[w].log(_record(f"t{w}-{i}"))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for store in set(stores):
        store.close()
        assert not store.failures
    print(f"{db_url.split(':')[0]}: {WRITERS} threads, {len(set(stores))} store(s): "
          f"{WRITERS * ROWS_EACH} rows logged and written in {time.perf_counter() - began:.2f}s")
    _assert_exactly(db_url, {f"t{w}-{i}" for w in range(WRITERS) for i in range(ROWS_EACH)})


def test_sixteen_processes_write_one_file(tmp_path):
    """Each process creates the tables if missing, all at once, then writes. SQLite only:
    16 interpreter start-ups are the cost, and PostgreSQL takes many clients by design."""
    db_url = f"sqlite:///{tmp_path / 'requests.db'}"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_in_process, args=(db_url, f"p{w}", ROWS_EACH))
             for w in range(WRITERS)]
    began = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    print(f"sqlite: {WRITERS} processes wrote {WRITERS * ROWS_EACH} rows "
          f"in {time.perf_counter() - began:.2f}s (process start-up included)")
    _assert_exactly(db_url, {f"p{w}-{i}" for w in range(WRITERS) for i in range(ROWS_EACH)})


def test_sqlite_runs_in_wal_mode(tmp_path):
    path = tmp_path / "requests.db"
    RequestStore(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# Storage failures never reach the caller.

def test_database_errors_are_counted_not_raised(tmp_path):
    path = tmp_path / "requests.db"
    store = RequestStore(f"sqlite:///{path}")
    conn = sqlite3.connect(path)
    conn.executescript("DROP TABLE feedback; DROP TABLE requests;")
    conn.close()
    for i in range(5):
        store.log(_record(f"r{i}"))
    assert store.flush(timeout=30)
    assert store.failures == {"db_error": 5}
    store.log(_record("after"))  # the writer survived and keeps counting
    store.close()
    assert store.failures == {"db_error": 6}
    store.log(_record("closed"))
    assert store.failures["closed"] == 1


def test_full_queue_drops_and_counts(tmp_path):
    path = tmp_path / "requests.db"
    store = RequestStore(f"sqlite:///{path}", queue_size=2, batch_size=1, busy_timeout_s=60)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the writer will wait on this lock
    store.log(_record("first"))
    deadline = time.monotonic() + 30
    while store._queue.qsize() and time.monotonic() < deadline:
        time.sleep(0.01)
    for i in range(7):  # two fit in the queue; five do not
        store.log(_record(f"r{i}"))
    assert store.failures == {"queue_full": 5}
    blocker.execute("COMMIT")
    blocker.close()
    assert store.flush(timeout=60)
    assert store.count() == 3
    store.close()
    assert store.failures == {"queue_full": 5}


# PII redaction on write.

_PII_PROMPT = [{"role": "user", "content": "Write to jane.doe@example.com\nor call 202-555-0143"}]


@pytest.mark.parametrize("redact_pii", [True, False])
def test_pii_redacted_on_write_only_when_configured(tmp_path, redact_pii):
    with RequestStore(f"sqlite:///{tmp_path / 'r.db'}", redact_pii=redact_pii) as store:
        store.log(_record("chat", endpoint="chat/completions", prompt=_PII_PROMPT,
                          output="Sure, mailing jane.doe@example.com now."))
        store.log(_record("text", prompt="my number is +44 20 7946 0958", output="noted"))
        store.add_feedback("chat", Feedback(preferred="Call +44 20 7946 0958",
                                            note="from bob@example.org"))
        stored = {row["id"]: row for row in store.requests()}
        (feedback,) = store.feedback_with_requests()
    texts = [stored["chat"]["prompt"], stored["chat"]["output"], stored["text"]["prompt"],
             feedback["preferred"], feedback["note"]]
    personal = ["jane.doe@example.com", "202-555-0143", "+44 20 7946 0958", "bob@example.org"]
    found = [p for p in personal if any(p in t for t in texts)]
    if redact_pii:
        assert found == []
        assert "<EMAIL>" in stored["chat"]["prompt"] and "<PHONE>" in stored["chat"]["prompt"]
        assert stored["chat"]["output"] == "Sure, mailing <EMAIL> now."
        assert stored["text"]["prompt"] == "my number is <PHONE>"
        assert (feedback["preferred"], feedback["note"]) == ("Call <PHONE>", "from <EMAIL>")
    else:
        assert found == personal


# Retention.

def test_retention_by_age_takes_feedback_along(db_url):
    now = datetime.now(UTC)
    with RequestStore(db_url) as store:
        store.log(_record("old", created_at=now - timedelta(days=10)))
        store.log(_record("new", created_at=now))
        store.flush(timeout=30)
        store.add_feedback("old", Feedback(thumb=-1))
        store.add_feedback("new", Feedback(thumb=1))
    with RequestStore(db_url, retention_days=7) as store:
        assert store.apply_retention() == 1
        assert [r["id"] for r in store.requests()] == ["new"]
        assert [f["request_id"] for f in store.feedback_with_requests()] == ["new"]
        store.log(_record("older", created_at=now - timedelta(days=30)))  # the writer prunes
        store.flush(timeout=30)
        assert [r["id"] for r in store.requests()] == ["new"]


def test_retention_by_row_count_keeps_the_newest(db_url):
    start = datetime(2025, 1, 1, tzinfo=UTC)
    with RequestStore(db_url) as store:
        for i in range(10):  # r8 and r9 share a timestamp: id breaks the tie
            store.log(_record(f"r{i}", created_at=start + timedelta(minutes=min(i, 8))))
        store.flush(timeout=30)
        store.add_feedback("r2", Feedback(rating=2))
        store.add_feedback("r9", Feedback(rating=5))
    with RequestStore(db_url, max_rows=3) as store:
        assert store.apply_retention() == 7
        assert [r["id"] for r in store.requests()] == ["r7", "r8", "r9"]
        assert [(f["request_id"], f["rating"]) for f in store.feedback_with_requests()] == [
            ("r9", 5)]


# Feedback.

@pytest.mark.parametrize(("feedback", "message"), [
    (Feedback(), "at least one of"),
    (Feedback(note="   "), "at least one of"),
    (Feedback(thumb=2), "thumb must be -1, 0 or 1"),
    (Feedback(thumb=True), "thumb must be"),
    (Feedback(rating=0), "rating must be an integer from 1 to 5"),
    (Feedback(rating=4.5), "rating must be"),
    (Feedback(note=3), "note must be text"),
])
def test_invalid_feedback_is_rejected(feedback, message):
    with pytest.raises(ValueError, match=message):
        feedback.validate()


def test_feedback_round_trip(db_url):
    when = datetime(2025, 6, 1, 12, tzinfo=UTC)
    with RequestStore(db_url) as store:
        store.log(_record("resp-1", created_at=when, client_id="alice", model_version="v2"))
        # Not flushed: feedback may arrive while the response is still queued.
        first = store.add_feedback("resp-1", Feedback(thumb=1, rating=5))
        second = store.add_feedback("resp-1", Feedback(preferred="A better answer",
                                                       note="too terse"))
        with pytest.raises(KeyError, match="nope"):
            store.add_feedback("nope", Feedback(thumb=1))
        with pytest.raises(ValueError):
            store.add_feedback("resp-1", Feedback(rating=9))
        joined = store.feedback_with_requests()
        (request,) = store.requests(model_version="v2")
        assert store.requests(model_version="v1") == []
        assert store.requests(since=when + timedelta(seconds=1)) == []
        assert store.requests(until=when + timedelta(seconds=1)) == [request]
    assert second > first
    assert [(f["feedback_id"], f["thumb"], f["rating"], f["preferred"], f["note"])
            for f in joined] == [(first, 1, 5, None, None),
                                 (second, None, None, "A better answer", "too terse")]
    assert all(f["prompt"] == "prompt of resp-1" and f["output"] == "output of resp-1"
               and f["client_id"] == "alice" for f in joined)
    assert request["created_at"] == when
    assert request["sampling"] == {"temperature": 0.7, "top_p": 0.9}
    assert (request["ttft_ms"], request["e2e_ms"], request["itl_ms"]) == (12.5, 80.0, 9.75)
