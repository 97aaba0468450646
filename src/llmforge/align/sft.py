"""Supervised fine-tuning on chat-formatted examples, with loss on assistant tokens only.

Examples come from a JSONL file of conversations (OpenAI `{"messages": [...]}` lines,
`{"prompt", "completion"}` or GSM8K's `{"question", "answer"}` pairs, or Anthropic HH-RLHF
`{"chosen", "rejected"}` transcripts, of which the chosen one is used; see align/hh.py) or, by
default, from the corpus itself: each
documented Python function becomes a request (its docstring) and an answer (its code without the
docstring), so the demo's SFT needs no download.
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmforge.align.finetune import FinetuneConfig
from llmforge.align.records import first_record
from llmforge.data.documents import document_batches
from llmforge.tokenizer.chat_format import ChatFormat
from llmforge.train.data import draw_indices
from llmforge.train.loop import TrainConfig


def _sft_train_defaults() -> TrainConfig:
    return TrainConfig(
        max_steps=200, lr=1e-3, warmup_steps=20, batch_size=16, eval_every=50, ckpt_every=100
    )


@dataclass
class SFTConfig(FinetuneConfig):
    # "docstrings" (documented functions of a Python corpus) or a .jsonl file of conversations.
    data: str = "docstrings"
    max_examples: int = 0  # 0 = all
    val_fraction: float = 0.05  # held out by a hash of the example's id
    min_request_chars: int = 20  # docstrings shorter than this say too little to be a request
    max_answer_chars: int = 1500  # long functions would be truncated at seq_len anyway
    # Pack whole conversations into full seq_len rows (attention kept inside each one) instead
    # of padding one per row; conversations longer than a row are set aside, not truncated.
    packing: bool = False
    train: TrainConfig = field(default_factory=_sft_train_defaults)


@dataclass
class Example:
    id: str
    messages: list[dict]


def load_examples(cfg: SFTConfig, documents: Path | None) -> tuple[list[Example], Counter]:
    """The examples `cfg.data` names (`documents` is the corpus, for "docstrings"), and what was
    set aside by reason."""
    if cfg.data == "docstrings":
        examples, unparsable = docstring_examples(documents, cfg)
        skipped = Counter({"unparsable_python": unparsable} if unparsable else {})
    elif is_hh_file(Path(cfg.data)):
        from llmforge.align.hh import hh_conversations  # hh builds on Example: import late

        examples, skipped = hh_conversations(Path(cfg.data), cfg.max_examples)
    else:
        examples, skipped = jsonl_examples(Path(cfg.data), cfg.max_examples)
    if not examples:
        source = "no documented Python functions in the corpus" if cfg.data == "docstrings" \
            else f"no usable conversations in {cfg.data}"
        raise ValueError(f"sft: {source}; set sft.data to a .jsonl file of conversations")
    return examples, skipped


def is_hh_file(path: Path) -> bool:
    """True when the first record of a (possibly gzipped) JSONL file is an HH-RLHF transcript
    pair: chosen and rejected with no separate prompt."""
    if not path.is_file():
        return False
    record = first_record(path)
    return isinstance(record, dict) and {"chosen", "rejected"} <= record.keys() \
        and "prompt" not in record


def jsonl_examples(path: Path, max_examples: int = 0) -> tuple[list[Example], Counter]:
    """Conversations from JSONL: `{"messages"}`, `{"prompt", "completion"}` or
    `{"question", "answer"}` (GSM8K's own records); malformed lines are counted by reason,
    never fatal."""
    if not path.is_file():
        raise FileNotFoundError(f"sft.data: no such file: {path}")
    examples: list[Example] = []
    skipped: Counter = Counter()
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                ask, answer = ("question", "answer") if "question" in record \
                    else ("prompt", "completion")
                messages = record["messages"] if "messages" in record else [
                    {"role": "user", "content": record[ask]},
                    {"role": "assistant", "content": record[answer]},
                ]
            except (json.JSONDecodeError, KeyError, TypeError):
                skipped["malformed_record"] += 1
                continue
            replies = [m.get("content") for m in messages
                       if isinstance(m, dict) and m.get("role") == "assistant"]
            if not replies:
                skipped["no_assistant_turn"] += 1
                continue
            if not all(isinstance(r, str) and r.strip() for r in replies):
                skipped["empty_answer"] += 1
                continue
            examples.append(Example(f"{path.name}:{lineno}", messages))
            if max_examples and len(examples) >= max_examples:
                break
    return examples, skipped


def docstring_examples(documents: Path, cfg: SFTConfig) -> tuple[list[Example], int]:
    """Every function with a docstring, as (docstring -> code); also returns files that failed
    to parse (counted, not fatal: the corpus may hold Python 2 or templated files)."""
    examples: list[Example] = []
    unparsable = 0
    for batch in document_batches(documents, ["id", "text"]):
        for doc_id, text in zip(*batch.to_pydict().values(), strict=True):
            try:
                tree = ast.parse(text)
            except (SyntaxError, ValueError):
                unparsable += 1
                continue
            examples.extend(_functions(doc_id, text, tree, cfg))
            if cfg.max_examples and len(examples) >= cfg.max_examples:
                return examples[: cfg.max_examples], unparsable
    return examples, unparsable


def _functions(doc_id: str, text: str, tree: ast.AST, cfg: SFTConfig) -> Iterator[Example]:
    lines = text.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < cfg.min_request_chars:
            continue
        doc_node = node.body[0]
        start = (node.decorator_list[0] if node.decorator_list else node).lineno
        kept = lines[start - 1 : doc_node.lineno - 1] + lines[doc_node.end_lineno : node.end_lineno]
        if len(kept) < 2:  # a one-line function, or a body that is only the docstring
            continue
        indent = min(len(s) - len(s.lstrip()) for s in kept if s.strip())
        answer = "\n".join(s[indent:] for s in kept).strip("\n")
        if len(answer) <= cfg.max_answer_chars:
            request = doc.split("\n\n")[0].strip()
            yield Example(f"{doc_id}:{node.lineno}", [{"role": "user", "content": request},
                                                      {"role": "assistant", "content": answer}])


def is_validation(example_id: str, fraction: float) -> bool:
    digest = hashlib.blake2b(example_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest) / 2**64 < fraction


def encode_examples(
    chat: ChatFormat, examples: list[Example], seq_len: int
) -> tuple[list[tuple], Counter]:
    """Chat-render each example; targets are -100 outside assistant tokens. Examples with a bad
    role or content, or whose assistant tokens all fall past seq_len, are counted and skipped."""
    encoded = []
    skipped: Counter = Counter()
    for ids, mask in _rendered(chat, examples, skipped):
        ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
        targets = [t if m else -100 for t, m in zip(ids[1:], mask[1:], strict=True)]
        if any(t != -100 for t in targets):
            encoded.append((ids[:-1], targets))
        else:
            skipped["no_assistant_tokens_within_seq_len"] += 1
    return encoded, skipped


def _rendered(chat: ChatFormat, examples: list[Example],
              skipped: Counter) -> Iterator[tuple[list[int], list[bool]]]:
    """(ids, assistant mask) of each example that renders; the others count as bad_message."""
    for ex in examples:
        try:
            yield chat.conversation(ex.messages)
        except ValueError:
            skipped["bad_message"] += 1


class ExampleBatches:
    """Micro-batch (step, micro): examples drawn by a seeded RNG, right-padded to the longest."""

    def __init__(self, encoded: list[tuple], batch_size: int, pad_id: int, seed: int, *,
                 rank: int = 0, world_size: int = 1):
        if not encoded:
            raise ValueError("no SFT examples to train on")
        self.encoded, self.batch_size, self.pad_id, self.seed = encoded, batch_size, pad_id, seed
        self.rank, self.world_size = rank, world_size

    def __call__(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        picked = draw_indices(self.seed, step, micro, len(self.encoded), self.batch_size,
                              self.rank, self.world_size)
        return pad_batch([self.encoded[i] for i in picked], self.pad_id)


def pack_examples(
    chat: ChatFormat, examples: list[Example], seq_len: int, pad_id: int
) -> tuple[list[tuple[list[int], list[int], list[int]]], Counter]:
    """Whole conversations packed greedily, in order, into rows of seq_len + 1 tokens.

    Each row gives (inputs, targets, doc_ids), each seq_len long. Targets are -100 outside
    assistant tokens, at padding and where the next token opens another conversation, so
    nothing is learned across a boundary; doc_ids number the conversations of a row (padding
    keeps the last one's) so attention stays inside each. A conversation longer than a row is
    set aside, never truncated.
    """
    rows: list[tuple[list[int], list[int], list[int]]] = []
    skipped: Counter = Counter()
    ids: list[int] = []
    mask: list[bool] = []
    docs: list[int] = []

    def close_row() -> None:
        fill = seq_len + 1 - len(ids)
        row, learn, doc = ids + [pad_id] * fill, mask + [False] * fill, docs + [docs[-1]] * fill
        targets = [t if m else -100 for t, m in zip(row[1:], learn[1:], strict=True)]
        rows.append((row[:-1], targets, doc[:-1]))

    for conv_ids, conv_mask in _rendered(chat, examples, skipped):
        if not any(conv_mask[1:]):
            skipped["no_assistant_tokens"] += 1
            continue
        if len(conv_ids) > seq_len + 1:
            skipped["longer_than_seq_len"] += 1
            continue
        if len(ids) + len(conv_ids) > seq_len + 1:
            close_row()
            ids, mask, docs = [], [], []
        doc = docs[-1] + 1 if docs else 0
        ids += conv_ids
        mask += [False, *conv_mask[1:]]  # the first token is never a target of the one before
        docs += [doc] * len(conv_ids)
    if ids:
        close_row()
    return rows, skipped


class PackedBatches:
    """Micro-batch (step, micro): packed rows drawn by a seeded RNG, as (x, y, doc_ids)."""

    def __init__(self, rows: list[tuple], batch_size: int, seed: int, *,
                 rank: int = 0, world_size: int = 1):
        if not rows:
            raise ValueError("no SFT examples to train on")
        x, y, doc_ids = zip(*rows, strict=True)
        self.x, self.y, self.doc_ids = (torch.tensor(t, dtype=torch.long) for t in (x, y, doc_ids))
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size

    def __call__(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        picked = torch.as_tensor(draw_indices(self.seed, step, micro, len(self.x),
                                              self.batch_size, self.rank, self.world_size))
        return self.x[picked], self.y[picked], self.doc_ids[picked]


def pad_batch(rows: list[tuple], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, targets) in enumerate(rows):
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, : len(targets)] = torch.tensor(targets)
    return x, y
