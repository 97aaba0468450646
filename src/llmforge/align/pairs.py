"""Preference pairs from a file, in either format the preference methods (DPO, reward models)
read:

- Anthropic HH-RLHF `{"chosen", "rejected"}` transcripts (align/hh.py);
- explicit-prompt records, TRL's preference format: `{"prompt", "chosen", "rejected"}` where
  the prompt is a string (one user turn) or a list of messages, and each reply is a string or a
  one-message list `[{"role": "assistant", "content": ...}]`.

Bad records (missing fields, bad roles, empty or identical replies) are counted by reason.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from llmforge.align.hh import PreferencePair, hh_pairs
from llmforge.align.records import read_jsonl
from llmforge.align.sft import is_hh_file
from llmforge.tokenizer.chat import ROLES


def load_pairs(path: Path, max_pairs: int = 0) -> tuple[list[PreferencePair], Counter]:
    """The pairs in `path` (either format), and what was set aside by reason."""
    path = Path(path)
    if is_hh_file(path):
        return hh_pairs(path, max_pairs)
    pairs: list[PreferencePair] = []
    skipped: Counter = Counter()
    for id_, record in read_jsonl(path, skipped):
        try:
            pair = _pair(id_, record)
        except ValueError as e:
            skipped[str(e)] += 1
            continue
        pairs.append(pair)
        if max_pairs and len(pairs) >= max_pairs:
            break
    return pairs, skipped


def _pair(id_: str, record: dict) -> PreferencePair:
    if not {"prompt", "chosen", "rejected"} <= record.keys():
        raise ValueError("missing_fields")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not (isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in prompt)):
        raise ValueError("bad_prompt")
    chosen, rejected = _reply(record["chosen"]), _reply(record["rejected"])
    if not chosen.strip() or not rejected.strip():
        raise ValueError("empty_reply")
    if chosen == rejected:
        raise ValueError("chosen_equals_rejected")
    return PreferencePair(id_, prompt, chosen, rejected)


def _reply(value: object) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant":
        value = value[0].get("content")
    if not isinstance(value, str):
        raise ValueError("bad_reply")
    return value
