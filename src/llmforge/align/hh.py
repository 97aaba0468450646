"""Anthropic HH-RLHF: `{"chosen", "rejected"}` transcripts as OpenAI-style messages.

Each transcript is a run of "\\n\\nHuman: ..." and "\\n\\nAssistant: ..." turns; chosen and rejected
share everything up to their final Assistant turn. `hh_conversations` gives the chosen
transcripts for SFT, `hh_pairs` the (shared prompt, chosen reply, rejected reply) triples for
preference training. Bad records are counted by reason and skipped, never fatal. Files may be
gzipped (the released `*.jsonl.gz`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmforge.align.records import read_jsonl
from llmforge.align.sft import Example

TURN = re.compile(r"\n\n(Human|Assistant):")
ROLES = {"Human": "user", "Assistant": "assistant"}


class BadRecord(ValueError):
    """A record that cannot be used; its message is the reason it is counted under."""


@dataclass
class PreferencePair:
    id: str
    prompt: list[dict]  # every message before the final assistant reply, shared by both
    chosen: str
    rejected: str


def parse_transcript(text: str) -> list[dict]:
    """Messages of one transcript: alternating user/assistant turns ending with the assistant."""
    parts = TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise BadRecord("missing_roles")
    messages = [{"role": ROLES[role], "content": content.strip()}
                for role, content in zip(parts[1::2], parts[2::2], strict=True)]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(messages))]
    if [m["role"] for m in messages] != expected or expected[-1] != "assistant":
        raise BadRecord("turns_out_of_order")
    if not messages[-1]["content"]:
        raise BadRecord("empty_answer")
    if any(not m["content"] for m in messages):
        raise BadRecord("empty_turn")
    return messages


def _records(path: Path, skipped: Counter) -> Iterator[tuple[str, str, str]]:
    """(id, chosen, rejected) of each well-formed record; the rest are counted in `skipped`."""
    for id_, record in read_jsonl(path, skipped):
        if not (isinstance(record.get("chosen"), str) and isinstance(record.get("rejected"), str)):
            skipped["missing_fields"] += 1
            continue
        yield id_, record["chosen"], record["rejected"]


def hh_conversations(path: Path, max_examples: int = 0) -> tuple[list[Example], Counter]:
    """The chosen transcripts as SFT examples, and what was set aside by reason."""
    examples: list[Example] = []
    skipped: Counter = Counter()
    for id_, chosen, _ in _records(Path(path), skipped):
        try:
            examples.append(Example(id_, parse_transcript(chosen)))
        except BadRecord as e:
            skipped[str(e)] += 1
            continue
        if max_examples and len(examples) >= max_examples:
            break
    return examples, skipped


def hh_pairs(path: Path, max_pairs: int = 0) -> tuple[list[PreferencePair], Counter]:
    """Preference pairs (shared prompt, chosen reply, rejected reply), and what was set aside."""
    pairs: list[PreferencePair] = []
    skipped: Counter = Counter()
    for id_, chosen_text, rejected_text in _records(Path(path), skipped):
        try:
            chosen, rejected = parse_transcript(chosen_text), parse_transcript(rejected_text)
        except BadRecord as e:
            skipped[str(e)] += 1
            continue
        if chosen[:-1] != rejected[:-1]:
            skipped["prompts_differ"] += 1
        elif chosen[-1] == rejected[-1]:
            skipped["chosen_equals_rejected"] += 1
        else:
            pairs.append(PreferencePair(id_, chosen[:-1], chosen[-1]["content"],
                                        rejected[-1]["content"]))
            if max_pairs and len(pairs) >= max_pairs:
                break
    return pairs, skipped
