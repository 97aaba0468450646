"""JSONL records for alignment data, read so that no bad line can stop a run: a line that is not
UTF-8, not JSON or not an object is counted by reason and skipped. Files may be gzipped."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path


def read_jsonl(path: Path, skipped: Counter) -> Iterator[tuple[str, dict]]:
    """(id "file:line", record) of each well-formed line; the rest are counted in `skipped`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                skipped["invalid_utf8"] += 1
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped["unparsable_json"] += 1
                continue
            if not isinstance(record, dict):
                skipped["not_an_object"] += 1
                continue
            yield f"{path.name}:{lineno}", record


def first_record(path: Path) -> object:
    """The first non-blank line of a (possibly gzipped) JSONL file, parsed; None when there is
    none or it is not JSON. For telling file formats apart by their records."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        line = next((line for line in f if line.strip()), "")
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None
