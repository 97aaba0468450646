"""Benchmark tasks described by one small YAML file each, and their records.

A task names its data file (relative to the data root, or to the YAML's own folder), the
file's format and how a record becomes a prompt:

    name: my_quiz
    type: multiple_choice        # multiple_choice | generative | code | perplexity
    data: quiz/my_quiz.jsonl
    format: jsonl                # jsonl | jsonl.gz | hellaswag_txt | text
    context: "{query}\\nAnswer:"  # str.format over the record
    choices: choices             # field holding the list of answers
    gold: gold                   # field holding the index of the right one

Records that cannot be scored (bad JSON, a missing field, gold out of range, no choices) are
returned as problems with their line number and reason; a malformed YAML raises ValueError.
"""

from __future__ import annotations

import bz2
import gzip
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

TYPES = ("multiple_choice", "generative", "code", "perplexity")
FORMATS = ("jsonl", "jsonl.gz", "hellaswag_txt", "text")
PREPROCESSORS = ("", "hellaswag")
SPECS_DIR = Path(__file__).parent / "task_specs"
CODE_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
# Keys each type needs in its YAML beyond name/type/data.
REQUIRED = {
    "multiple_choice": ("context", "choices", "gold"),
    "generative": ("prompt", "target"),
    "code": ("prompt", "test", "entry_point"),
    "perplexity": (),
}


def data_root() -> Path:
    """$LLMFORGE_DATA_ROOT, else the shared data folder beside the repository."""
    env = os.environ.get("LLMFORGE_DATA_ROOT")
    if env:
        return Path(env)
    return (Path(__file__).parents[3] / ".." / "shared" / "data").resolve()


@dataclass
class TaskSpec:
    name: str
    type: str
    data: str
    format: str = "jsonl"
    # multiple_choice
    context: str = ""
    choices: str = ""
    gold: str = ""
    target_delimiter: str = " "
    preprocess: str = ""  # "hellaswag": lm-eval's bracket-tag clean-up of context and choices
    # generative (prompt is also the code template)
    prompt: str = ""
    target: str = ""
    answer_regex: str = ""  # applied to model output; the last match is the answer
    target_regex: str = ""  # applied to the target; the first match is the answer
    stop: list[str] = field(default_factory=list)
    max_new_tokens: int = 256
    # code
    test: str = ""
    entry_point: str = ""
    n_samples: int = 1
    k: list[int] = field(default_factory=lambda: [1])
    timeout_s: float = 10.0
    # perplexity ("text" format): a line matching doc_start begins a new document
    doc_start: str = ""
    # shared
    num_fewshot: int = 0
    fewshot_split: str = ""
    fewshot_seed: int = 1234
    fewshot_delimiter: str = "\n\n"
    limit: int = 0  # 0 = every item
    base_dir: str = ""  # folder of the YAML, tried first for relative data paths

    @classmethod
    def from_dict(cls, raw: dict, base_dir: str = "") -> TaskSpec:
        if not isinstance(raw, dict):
            raise ValueError("task spec must be a YAML mapping")
        known = {f.name for f in fields(cls)} - {"base_dir"}
        for key in raw:
            if key not in known:
                raise ValueError(f"unknown task key {key!r}")
        for key in ("name", "type", "data"):
            if not raw.get(key):
                raise ValueError(f"task spec is missing {key!r}")
        if raw["type"] not in TYPES:
            raise ValueError(f"type must be one of {', '.join(TYPES)}, got {raw['type']!r}")
        for key in REQUIRED[raw["type"]]:
            if not raw.get(key):
                raise ValueError(f"{raw['type']} task {raw['name']!r} is missing {key!r}")
        spec = cls(**raw, base_dir=base_dir)
        spec._check()
        return spec

    def _check(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.preprocess not in PREPROCESSORS:
            raise ValueError(f"preprocess must be 'hellaswag' or empty, got {self.preprocess!r}")
        for key in ("max_new_tokens", "n_samples", "num_fewshot", "fewshot_seed", "limit"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be at least 1, got {self.n_samples}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a list of strings, got {self.stop!r}")
        if not isinstance(self.k, list) or not all(isinstance(k, int) and k >= 1 for k in self.k):
            raise ValueError(f"k must be a list of positive integers, got {self.k!r}")
        if self.type == "code" and any(k > self.n_samples for k in self.k):
            raise ValueError(f"k {self.k} cannot exceed n_samples {self.n_samples}")
        if not isinstance(self.timeout_s, (int, float)) or self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be a positive number, got {self.timeout_s!r}")
        for key in ("answer_regex", "target_regex", "doc_start"):
            try:
                re.compile(getattr(self, key))
            except re.error as e:
                raise ValueError(f"{key} is not a valid regex: {e}") from None
        if self.num_fewshot and self.type not in ("multiple_choice", "generative"):
            raise ValueError(f"num_fewshot is only for multiple_choice and generative tasks, "
                             f"not {self.type}")
        if self.type == "perplexity" and self.format != "text":
            raise ValueError("perplexity tasks need format 'text'")

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        if p.is_absolute():
            return p
        if self.base_dir and (Path(self.base_dir) / p).exists():
            return Path(self.base_dir) / p
        return data_root() / p


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


def load_task(path_or_name: str | os.PathLike) -> TaskSpec:
    """A task from a YAML path, or a built-in by name (task_specs/NAME.yaml)."""
    path = Path(path_or_name)
    if not path.suffix and not path.exists():
        path = SPECS_DIR / f"{path_or_name}.yaml"
        if not path.exists():
            raise ValueError(f"no built-in task {str(path_or_name)!r}; "
                             f"built-ins: {', '.join(builtin_tasks())}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    return TaskSpec.from_dict(raw, base_dir=str(path.parent.resolve()))


# -- records -------------------------------------------------------------------------------


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's hellaswag `preprocess`: WikiHow bracket artefacts removed."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _raw_records(spec: TaskSpec, path: Path) -> list[tuple[int, dict | str]]:
    """(line number, record) pairs; a string in place of a record is the reason it failed."""
    if spec.format in ("jsonl", "jsonl.gz"):
        opener = gzip.open if spec.format == "jsonl.gz" else open
        out: list[tuple[int, dict | str]] = []
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    out.append((n, f"bad JSON: {e}"))
                    continue
                out.append((n, rec if isinstance(rec, dict) else "record is not a JSON object"))
        return out
    if spec.format == "hellaswag_txt":
        opener = bz2.open if path.suffix == ".bz2" else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
        out = []
        for start in range(0, len(lines), 6):
            chunk = lines[start : start + 6]
            if len(chunk) < 6:
                out.append((start + 1, f"truncated item: {len(chunk)} of 6 lines"))
                continue
            try:
                label = int(chunk[1])
            except ValueError:
                out.append((start + 2, f"label is not an integer: {chunk[1]!r}"))
                continue
            out.append((start + 1, {"query": chunk[0], "label": label, "endings": chunk[2:]}))
        return out
    # text: whole file, split into documents at lines matching doc_start
    text = path.read_text(encoding="utf-8")
    if not spec.doc_start:
        return [(1, {"text": text})]
    start_re = re.compile(spec.doc_start)
    docs: list[tuple[int, list[str]]] = []
    for n, line in enumerate(text.splitlines(keepends=True), 1):
        if start_re.fullmatch(line.rstrip("\r\n")) or not docs:
            docs.append((n, []))
        docs[-1][1].append(line)
    return [(n, {"text": "".join(lines)}) for n, lines in docs if "".join(lines).strip()]


def _render(template: str, rec: dict) -> str:
    try:
        return template.format(**rec)
    except KeyError as e:
        raise ValueError(f"missing field {e.args[0]!r}") from None
    except (IndexError, ValueError, AttributeError) as e:
        raise ValueError(f"template {template!r} failed: {e}") from None


def _field(rec: dict, name: str):
    if name not in rec:
        raise ValueError(f"missing field {name!r}")
    return rec[name]


def prepare(spec: TaskSpec, rec: dict) -> dict:
    """The scoring view of one record; ValueError says why it cannot be scored."""
    if spec.type == "multiple_choice":
        context = _render(spec.context, rec)
        choices = _field(rec, spec.choices)
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"{spec.choices!r} must be a non-empty list")
        if not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{spec.choices!r} must hold non-empty strings")
        gold = _field(rec, spec.gold)
        if isinstance(gold, str) and gold.strip().lstrip("-").isdigit():
            gold = int(gold)
        if not isinstance(gold, int) or isinstance(gold, bool):
            raise ValueError(f"gold {gold!r} is not an integer")
        if not 0 <= gold < len(choices):
            raise ValueError(f"gold {gold} out of range for {len(choices)} choices")
        if spec.preprocess == "hellaswag":
            context = hellaswag_preprocess(context)
            choices = [hellaswag_preprocess(c) for c in choices]
        return {"context": context, "choices": choices, "gold": gold}
    if spec.type == "generative":
        target = _field(rec, spec.target)
        return {"prompt": _render(spec.prompt, rec), "target": str(target)}
    if spec.type == "code":
        out = {"prompt": _render(spec.prompt, rec)}
        for key in ("test", "entry_point"):
            value = _field(rec, getattr(spec, key))
            if not isinstance(value, str) or not value:
                raise ValueError(f"{getattr(spec, key)!r} must be a non-empty string")
            out[key] = value
        if "task_id" in rec:
            out["task_id"] = rec["task_id"]
        return out
    text = _field(rec, "text")
    if not isinstance(text, str) or not text:
        raise ValueError("'text' must be a non-empty string")
    return {"text": text}


def load_records(spec: TaskSpec, path: str | None = None) -> tuple[list[dict], list[dict]]:
    """(records, problems) from the task's data file (or `path`, e.g. the few-shot split).

    Each record is the scoring view (`prepare`) plus `line`; each problem is
    {"line": n, "reason": "..."}.
    """
    file = spec.resolve(path or spec.data)
    if not file.exists():
        raise FileNotFoundError(f"task {spec.name!r}: data file {file} not found "
                                f"(set LLMFORGE_DATA_ROOT to the data folder)")
    records, problems = [], []
    for line, rec in _raw_records(spec, file):
        if isinstance(rec, str):
            problems.append({"line": line, "reason": rec})
            continue
        try:
            records.append({**prepare(spec, rec), "line": line})
        except ValueError as e:
            problems.append({"line": line, "reason": str(e)})
    return records, problems
