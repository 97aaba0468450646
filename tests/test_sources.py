"""Sources: every format read, bad input set aside (never raised), shards that add up exactly."""

import gzip
import io
import json
import pickle
import signal
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from llmforge.data.records import Document, Record, Rejected
from llmforge.data.sources import (
    STDLIB,
    Shard,
    plan_shards,
    read_shard,
    read_source,
    source_files,
    stdlib_files,
)

ARTICLE = ("The river town kept its old stone bridge, and every spring the council argued about "
           "repairing it before the floods came down from the hills. ")


def texts(n: int) -> list[str]:
    return [f"document {i}: " + ARTICLE * (1 + i % 3) for i in range(n)]


def jsonl(rows: list[object]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def outcome(records: list[Record]) -> list[tuple[str, str]]:
    """(id, reason) of each record, "doc" for a document: what a test needs to compare."""
    return [(r.id, r.reason if isinstance(r, Rejected) else "doc") for r in records]


def read_all(path: Path, **options) -> list[Record]:
    return list(read_source(str(path), **options))


def read_sharded(source: Path | str, target_bytes: int) -> list[Record]:
    return [r for s in plan_shards(str(source), "text", target_bytes) for r in read_shard(s)]


# --- compressed JSON lines ------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "compress"), [
    (".jsonl.gz", gzip.compress),
    (".json.gz", gzip.compress),
    (".jsonl.zst", zstd),
    (".jsonl.zst", lambda d: zstd(d[:100]) + zstd(d[100:])),  # two frames
])
def test_compressed_jsonl_reads_like_plain(tmp_path: Path, suffix: str, compress) -> None:
    data = jsonl([{"text": t} for t in texts(3)]) + b'{bad\n\n{"text": "caf\xff"}\n{"no": 1}\n'
    (tmp_path / "plain.jsonl").write_bytes(data)
    (tmp_path / f"packed{suffix}").write_bytes(compress(data))
    plain = read_all(tmp_path / "plain.jsonl")
    packed = read_all(tmp_path / f"packed{suffix}")
    assert [(i.replace("packed" + suffix, "plain.jsonl"), why) for i, why in outcome(packed)] \
        == outcome(plain)
    assert [r.reason for r in plain if isinstance(r, Rejected)] == \
        ["malformed_json", "invalid_utf8", "missing_field"]
    assert [r.text for r in packed if isinstance(r, Document)] == texts(3)


@pytest.mark.parametrize(("suffix", "compress"), [(".jsonl.gz", gzip.compress),
                                                  (".jsonl.zst", zstd)])
def test_truncated_stream_keeps_the_good_prefix(tmp_path: Path, suffix: str, compress) -> None:
    rows = texts(3000)
    packed = compress(jsonl([{"text": t} for t in rows]))
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(packed[: len(packed) // 2])
    *good, damage = read_all(path)
    assert isinstance(damage, Rejected) and damage.reason == "truncated_file"
    assert damage.id == path.name and "after" in damage.detail
    assert 0 < len(good) < len(rows)
    assert [r.id for r in good] == [f"{path.name}:{i}" for i in range(1, len(good) + 1)]
    assert [r.text for r in good] == rows[: len(good)]


@pytest.mark.parametrize("name", ["junk.jsonl.gz", "junk.jsonl.zst", "junk.csv.gz"])
def test_corrupt_compressed_file_is_one_rejection(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"this is not compressed data at all" * 10)
    assert [why for _, why in outcome(read_all(tmp_path / name))] == ["unreadable"]


# --- CSV ------------------------------------------------------------------------------------


CSV = ("\ufeffid,text\n"
       "1,hello world\n"
       "2\n"
       "\n"
       '3,"multi\nline, ""quoted"""\n'
       "4,bad \udcff byte\n"
       "5,cr\rinside\n"
       f"6,{'x' * 200_000}\n").encode("utf-8", "surrogateescape")


@pytest.mark.parametrize(("name", "pack"), [("t.csv", bytes), ("t.csv.gz", gzip.compress)])
def test_csv_rows(tmp_path: Path, name: str, pack) -> None:
    (tmp_path / name).write_bytes(pack(CSV))
    records = read_all(tmp_path / name)
    assert outcome(records) == [(f"{name}:1", "doc"), (f"{name}:2", "missing_field"),
                                (f"{name}:4", "doc"), (f"{name}:5", "invalid_utf8"),
                                (f"{name}:6", "malformed_csv"), (f"{name}:7", "doc")]
    assert records[0].text == "hello world"
    assert records[2].text == 'multi\nline, "quoted"'
    assert len(records[-1].text) == 200_000  # longer than csv's default field limit


@pytest.mark.parametrize(("content", "detail"), [(b"", "empty file"),
                                                 (b"id,body\n1,text\n", "no column 'text'")])
def test_csv_without_the_text_column_is_one_rejection(tmp_path: Path, content: bytes,
                                                      detail: str) -> None:
    (tmp_path / "t.csv").write_bytes(content)
    (record,) = read_all(tmp_path / "t.csv")
    assert (record.id, record.reason) == ("t.csv", "missing_column") and detail in record.detail


# --- WARC / WET -----------------------------------------------------------------------------


def html_page(body: str) -> bytes:
    return f"<html><head><title>t</title></head><body>{body}</body></html>".encode()


GOOD_PAGE = html_page("<article>" + "".join(f"<p>{t}</p>" for t in texts(4)) + "</article>")
EMPTY_PAGE = html_page("<script>var x = 1;</script><div></div>")


def write_warc(path: Path, records: list[tuple[str, str, bytes, str]]) -> list[str]:
    """Write (type, url, payload, content type) records after a warcinfo; returns their ids."""
    ids = []
    with path.open("wb") as f:
        writer = WARCWriter(f, gzip=path.name.endswith(".gz"))
        writer.write_record(writer.create_warcinfo_record(path.name, {"software": "test"}))
        for kind, url, payload, content_type in records:
            if kind == "response":
                http = StatusAndHeaders("200 OK", [("Content-Type", content_type)],
                                        protocol="HTTP/1.1")
                record = writer.create_warc_record(url, kind, payload=io.BytesIO(payload),
                                                   length=len(payload), http_headers=http)
            else:
                record = writer.create_warc_record(url, kind, payload=io.BytesIO(payload),
                                                   length=len(payload),
                                                   warc_content_type=content_type)
            writer.write_record(record)
            ids.append(record.rec_headers.get_header("WARC-Record-ID"))
    return ids


@pytest.mark.parametrize("name", ["crawl.warc", "crawl.warc.gz"])
def test_warc_html_is_extracted(tmp_path: Path, name: str) -> None:
    ids = write_warc(tmp_path / name, [
        ("response", "http://a.example/good", GOOD_PAGE, "text/html; charset=utf-8"),
        ("request", "http://a.example/good", b"GET /good HTTP/1.1\r\n\r\n",
         "application/http; msgtype=request"),
        ("response", "http://a.example/empty", EMPTY_PAGE, "text/html"),
        ("response", "http://a.example/logo.png", b"\x89PNG\r\n", "image/png"),
    ])
    records = read_all(tmp_path / name)
    assert outcome(records) == [(ids[0], "doc"), (ids[2], "no_text_extracted"),
                                (ids[3], "unsupported_type")]
    assert records[0].meta == {"url": "http://a.example/good"}
    assert "stone bridge" in records[0].text and "<p>" not in records[0].text


@pytest.mark.parametrize("name", ["crawl.wet", "crawl.wet.gz"])
def test_wet_conversions_are_text(tmp_path: Path, name: str) -> None:
    ids = write_warc(tmp_path / name, [
        ("conversion", "http://b.example/1", texts(1)[0].encode(), "text/plain"),
        ("conversion", "http://b.example/2", b"caf\xe9 latin-1", "text/plain"),
        ("conversion", "http://b.example/3", b"  \n", "text/plain"),
    ])
    records = read_all(tmp_path / name)
    assert outcome(records) == [(ids[0], "doc"), (ids[1], "invalid_utf8"),
                                (ids[2], "no_text_extracted")]
    assert records[0].text == texts(1)[0] and records[0].meta == {"url": "http://b.example/1"}


@pytest.mark.parametrize("name", ["cut.warc", "cut.warc.gz"])
def test_truncated_warc_keeps_whole_records(tmp_path: Path, name: str) -> None:
    pages = [("response", f"http://c.example/{i}", GOOD_PAGE, "text/html") for i in range(3)]
    ids = write_warc(tmp_path / name, pages)
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[:-100])  # inside the last record's payload
    assert outcome(read_all(tmp_path / name)) == [(ids[0], "doc"), (ids[1], "doc"),
                                                  (ids[2], "truncated_file")]


def test_extraction_is_timed_out_and_failures_contained(tmp_path: Path, monkeypatch) -> None:
    import trafilatura

    ids = write_warc(tmp_path / "slow.warc", [("response", "http://d.example/", GOOD_PAGE,
                                               "text/html")])
    handler = signal.getsignal(signal.SIGALRM)
    monkeypatch.setattr(trafilatura, "extract", lambda *a, **k: time.sleep(5))
    started = time.monotonic()
    assert outcome(read_all(tmp_path / "slow.warc", extract_timeout_s=0.05)) == \
        [(ids[0], "extraction_timeout")]
    assert time.monotonic() - started < 2
    assert signal.getsignal(signal.SIGALRM) == handler
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0

    def broken(*_a, **_k) -> None:
        raise ValueError("parser bug")

    monkeypatch.setattr(trafilatura, "extract", broken)
    assert outcome(read_all(tmp_path / "slow.warc")) == [(ids[0], "extraction_failed")]


# --- Hugging Face datasets ------------------------------------------------------------------


def test_hf_local_dataset_streams_like_the_hub(tmp_path: Path) -> None:
    data = tmp_path / "ds" / "data"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_bytes(jsonl([{"text": "first"}, {"text": None},
                                              {"text": "third"}]))
    (data / "test.jsonl").write_bytes(jsonl([{"text": "held out"}]))
    path = tmp_path / "ds"
    source = f"hf://{path}"  # hf:// + /abs/path
    assert plan_shards(source) == [Shard(source)]
    assert outcome(read_all(source)) == [(f"{path}:train:0", "doc"),
                                         (f"{path}:train:1", "missing_field"),
                                         (f"{path}:train:2", "doc")]
    (record,) = read_all(f"{source}@test")
    assert (record.id, record.text, record.source) == (f"{path}:test:0", "held out",
                                                       f"{source}@test")
    assert sorted(source_files(source)) == sorted(data.iterdir())
    (tmp_path / "keyed").mkdir()
    (tmp_path / "keyed" / "rows.jsonl").write_bytes(jsonl([{"id": "q-7", "text": "keyed"}]))
    assert outcome(read_all(f"hf://{tmp_path / 'keyed'}")) == [(f"{tmp_path}/keyed:train:q-7",
                                                                "doc")]
    assert source_files("hf://owner/name:config@validation") == []
    with pytest.raises(ValueError, match="hf://owner/name"):
        plan_shards("hf://owner/name@a@b")


# --- bad input in every format --------------------------------------------------------------


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("e.txt", b"", ["doc"]),  # an empty document: the length filter's to drop
    ("e.jsonl", b"", []),
    ("e.jsonl.gz", b"", []),
    ("e.jsonl.gz", gzip.compress(b""), []),
    ("e.jsonl.zst", b"", []),
    ("e.csv", b"", ["missing_column"]),
    ("e.parquet", b"", ["unreadable"]),
    ("e.warc", b"", []),
    ("e.wet.gz", b"", []),
    ("e.gz", b"", ["unsupported_type"]),
])
def test_empty_files(tmp_path: Path, name: str, content: bytes, expected: list[str]) -> None:
    (tmp_path / name).write_bytes(content)
    records = read_all(tmp_path / name)
    assert [why for _, why in outcome(records)] == expected
    assert all(r.id == name for r in records)


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("u.txt", b"caf\xe9", [("u.txt", "invalid_utf8")]),
    ("u.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n\xff\xfe\n',
     [("u.jsonl:1", "doc"), ("u.jsonl:2", "invalid_utf8"), ("u.jsonl:3", "invalid_utf8")]),
    ("u.jsonl.gz", gzip.compress(b'{"text": "caf\xe9"}\n'), [("u.jsonl.gz:1", "invalid_utf8")]),
    ("u.csv", b"text\nok\ncaf\xe9\n", [("u.csv:1", "doc"), ("u.csv:2", "invalid_utf8")]),
])
def test_undecodable_bytes_are_set_aside(tmp_path: Path, name: str, content: bytes,
                                         expected: list[tuple[str, str]]) -> None:
    (tmp_path / name).write_bytes(content)
    assert outcome(read_all(tmp_path / name)) == expected


def test_malformed_json_lines(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_bytes(b'{"text": "ok"}\n{"text": \n[1, 2]\n"just a string"\n'
                                       b'{"text": ["a"]}\n{"text": "no newline at the end"}')
    assert [why for _, why in outcome(read_all(tmp_path / "m.jsonl"))] == [
        "doc", "malformed_json", "malformed_json", "malformed_json", "bad_field_type", "doc"]


def test_huge_single_line_text_is_read_quickly(tmp_path: Path) -> None:
    path = tmp_path / "huge.txt"
    path.write_bytes(b"a" * 100_000_000)
    assert len(plan_shards(str(path), "text", 2**20)) == 1  # one document is never split
    started = time.monotonic()
    (record,) = read_all(path)
    assert len(record.text) == 100_000_000 and time.monotonic() - started < 3


# --- shards ---------------------------------------------------------------------------------


def jsonl_with_noise(n: int) -> bytes:
    lines = [json.dumps({"text": t}).encode() for t in texts(n)]
    lines[5], lines[17] = b"{broken", b""
    lines[30] = b'{"text": "caf\xe9"}'
    return b"\n".join(lines) + b"\n"


def test_jsonl_ranges_start_at_lines_and_add_up(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_bytes(jsonl_with_noise(200))
    shards = plan_shards(str(path), "text", target_bytes=4000)
    assert len(shards) > 5 and shards == plan_shards(str(path), "text", target_bytes=4000)
    data = path.read_bytes()
    assert [s.start for s in shards[1:]] == [s.stop for s in shards[:-1]]
    assert shards[0].start == 0 and shards[-1].stop == len(data)
    assert all(data[s.start - 1:s.start] == b"\n" for s in shards[1:])
    assert all(s.first_index == data[:s.start].count(b"\n") for s in shards)
    assert read_sharded(path, 4000) == read_all(path)


def test_csv_ranges_respect_quoted_newlines(tmp_path: Path) -> None:
    rows = "".join(f'{i},"{t}\nsecond line, ""{i}"""\n' for i, t in enumerate(texts(120)))
    path = tmp_path / "big.csv"
    path.write_text("id,text\n" + rows + "120\n")
    shards = plan_shards(str(path), "text", target_bytes=3000)
    assert len(shards) > 5
    whole = read_all(path)
    assert len(whole) == 121 and whole[-1].reason == "missing_field"
    assert read_sharded(path, 3000) == whole


def test_parquet_is_split_by_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "big.parquet"
    values = [None if i % 17 == 0 else t for i, t in enumerate(texts(100))]
    pq.write_table(pa.table({"text": values}), path, row_group_size=10)
    shards = plan_shards(str(path), "text", target_bytes=path.stat().st_size // 4)
    assert len(shards) > 2
    assert [(s.start, s.first_index) for s in shards][:2] == [(0, 0), (shards[0].stop,
                                                                      shards[0].stop * 10)]
    assert read_sharded(path, path.stat().st_size // 4) == read_all(path)
    # A file without the text column is not split: it is one rejection.
    assert len(plan_shards(str(path), "body", target_bytes=1)) == 1


def mixed_folder(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.jsonl").write_bytes(jsonl_with_noise(150))
    (root / "b.txt").write_text(ARTICLE * 200)
    (root / "c.jsonl.gz").write_bytes(gzip.compress(jsonl_with_noise(40)))
    (root / "sub" / "d.csv").write_text("text\n" + "".join(f'"{t}"\n' for t in texts(80)))
    (root / "sub" / "e.md").write_text("unsupported")
    pq.write_table(pa.table({"text": texts(50)}), root / "sub" / "f.parquet", row_group_size=7)
    write_warc(root / "sub" / "g.warc.gz", [("response", "http://e.example/", GOOD_PAGE,
                                             "text/html")])
    for i in range(5):
        (root / "sub" / f"small{i}.txt").write_text(texts(i + 1)[-1])


def test_every_record_is_in_exactly_one_shard(tmp_path: Path) -> None:
    mixed_folder(tmp_path / "data")
    whole = read_all(tmp_path / "data")
    ids = [r.id for r in whole]
    assert len(ids) == len(set(ids)) > 300
    for target in (2000, 20_000, 10**9):
        shards = plan_shards(str(tmp_path / "data"), "text", target)
        assert shards == plan_shards(str(tmp_path / "data"), "text", target)
        assert pickle.loads(pickle.dumps(shards)) == shards
        assert read_sharded(tmp_path / "data", target) == whole
        per_shard = [[r.id for r in read_shard(s)] for s in shards]
        assert Counter(i for part in per_shard for i in part) == Counter(ids)
    packed = [[Path(f).name for f in s.files] for s in plan_shards(str(tmp_path / "data"), "text",
                                                                  10**9)]
    assert packed == [["a.jsonl", "b.txt"], ["c.jsonl.gz"], ["d.csv", "e.md"], ["f.parquet"],
                      ["g.warc.gz"], [f"small{i}.txt" for i in range(5)]]
    assert len(plan_shards(str(tmp_path / "data"), "text", 2000)) > 20


def test_stdlib_is_grouped_into_shards() -> None:
    root, files = stdlib_files()
    shards = plan_shards(STDLIB, "text", target_bytes=2**20)
    assert len(shards) > 3 and {s.root for s in shards} == {str(root)}
    assert [Path(f) for s in shards for f in s.files] == files
    assert all(s.stop is None for s in shards)
    assert all(sum(Path(f).stat().st_size for f in s.files) <= 2**20
               for s in shards if len(s.files) > 1)
    first = next(read_shard(shards[0]))
    assert first.source == STDLIB and first.id == Path(shards[0].files[0]).relative_to(
        root).as_posix()
