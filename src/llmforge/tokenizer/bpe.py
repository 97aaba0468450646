"""Train and load the byte-level BPE tokenizer shared by every later stage."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from llmforge.data.documents import document_batches

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
# Order fixes the ids (0..6): the model, chat format and shards all rely on it.
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END]

# GPT-style split, tuned for code: underscores join identifiers (``__init__``, ``snake_case``),
# digits group by three, and a whitespace run keeps its last space for the next word so an
# indentation block becomes one reusable token.
SPLIT_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)"
    r"|[^\r\n\p{L}\p{N}_]?[\p{L}_]+"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

_READ_BATCH = 256
_SAMPLE_CHARS = 1_000_000


@dataclass
class TokenizerConfig:
    """How big a vocabulary to learn and from how much text."""

    vocab_size: int = 4096
    min_frequency: int = 2
    max_train_chars: int = 0  # 0 = the whole corpus


def _iter_texts(documents: Path, max_chars: int = 0) -> Iterator[str]:
    """Stream document texts so the corpus never has to fit in memory."""
    seen = 0
    for batch in document_batches(documents, ["text"], _READ_BATCH):
        for text in batch.column(0).to_pylist():
            if max_chars and seen + len(text) > max_chars:
                remaining = max_chars - seen
                if remaining > 0:
                    yield text[:remaining]
                return
            seen += len(text)
            yield text


def _new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE: any byte sequence is representable, so nothing is unknown."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _bytes_per_token(tok: Tokenizer, documents: Path) -> float:
    """Compression on the first ~1M characters: the figure that sets the cost of training."""
    sample = list(_iter_texts(documents, _SAMPLE_CHARS))
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(sample, add_special_tokens=False))
    n_bytes = sum(len(t.encode("utf-8")) for t in sample)
    return n_bytes / n_tokens if n_tokens else 0.0


def _resolve(path: Path) -> Path:
    """Accept either a tokenizer.json file or the directory that holds it."""
    path = Path(path)
    return path if path.suffix == ".json" else path / "tokenizer.json"


def train_tokenizer(cfg: TokenizerConfig, documents: Path, out_path: Path) -> dict:
    """Learn the vocabulary from the data stage's documents and save tokenizer.json at out_path."""
    start = time.perf_counter()
    out_file = _resolve(out_path)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    n_docs = 0
    n_chars = 0

    def counted() -> Iterator[str]:
        nonlocal n_docs, n_chars
        for text in _iter_texts(documents, cfg.max_train_chars):
            n_docs += 1
            n_chars += len(text)
            yield text

    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(counted(), trainer=trainer)
    tok.save(str(out_file))
    return {
        "path": str(out_file),
        "vocab_size": tok.get_vocab_size(),
        "train_docs": n_docs,
        "train_chars": n_chars,
        "bytes_per_token": _bytes_per_token(tok, documents),
        "seconds": time.perf_counter() - start,
    }


def load_tokenizer(path: Path) -> Tokenizer:
    """Load tokenizer.json (or the directory holding it).

    Special-token strings inside text are encoded as plain text: control tokens enter a
    sequence only by id, so a document or user message cannot forge a turn boundary.
    """
    tok = Tokenizer.from_file(str(_resolve(path)))
    tok.encode_special_tokens = True
    return tok
