"""Turn the data stage's documents into flat token files that pretraining reads through memmaps."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmforge.data.documents import document_batches
from llmforge.tokenizer.bpe import BOS, load_tokenizer

SPLITS = ("train", "val")
META_FILE = "shards.json"


@dataclass
class TokenizeConfig:
    """How to split and batch the corpus."""

    val_fraction: float = 0.02
    batch_docs: int = 256


def is_val(doc_id: object, val_fraction: float) -> bool:
    """Split by a hash of the id, so a document keeps its split when the corpus grows."""
    digest = hashlib.blake2b(str(doc_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id: halves disk and I/O for small vocabs."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class _SplitWriter:
    """Appends documents to one split's .bin file and remembers where each starts."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, vocab_size: int) -> None:
        self.file = open(out_dir / f"{split}.bin", "wb")
        self.idx_path = out_dir / f"{split}.idx.npy"
        self.dtype = dtype
        self.starts: list[int] = []
        self.tokens = 0
        self.text_bytes = 0
        self.counts = np.zeros(vocab_size, dtype=np.int64)

    def add(self, docs: list[list[int]], texts: list[str]) -> None:
        """Append a batch of documents with one write and one bincount."""
        if not docs:
            return
        arr = np.concatenate([np.asarray(d, dtype=self.dtype) for d in docs])
        arr.tofile(self.file)
        for d in docs:
            self.starts.append(self.tokens)
            self.tokens += len(d)
        self.text_bytes += sum(len(t.encode("utf-8")) for t in texts)
        self.counts += np.bincount(arr, minlength=len(self.counts))

    def close(self) -> dict:
        self.file.close()
        np.save(self.idx_path, np.asarray(self.starts, dtype=np.int64))
        return {"tokens": self.tokens, "docs": len(self.starts), "text_bytes": self.text_bytes}


def unigram_baseline(train_counts: np.ndarray, val_counts: np.ndarray) -> float | None:
    """Val cross-entropy (nats/token) of add-one unigram frequencies fitted on train.

    A model whose val loss is not clearly below this has learned nothing beyond token
    frequencies. None when either split is empty.
    """
    n_train, n_val = int(train_counts.sum()), int(val_counts.sum())
    if n_train == 0 or n_val == 0:
        return None
    log_p = np.log(train_counts + 1.0) - math.log(n_train + len(train_counts))
    return float(-(val_counts * log_p).sum() / n_val)


def tokenize_documents(
    cfg: TokenizeConfig,
    documents: Path,
    tokenizer_path: Path,
    out_dir: Path,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Encode every document as <|bos|> + tokens into train/val shards; return the stats.

    ``progress(docs_done, tokens_done)`` is called after each batch.
    """
    tok = load_tokenizer(tokenizer_path)
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    bos = tok.token_to_id(BOS)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {s: _SplitWriter(out_dir, s, dtype, vocab_size) for s in SPLITS}
    docs_done = 0
    try:
        for batch in document_batches(documents, ["id", "text"], cfg.batch_docs):
            ids, texts = batch.column(0).to_pylist(), batch.column(1).to_pylist()
            encodings = tok.encode_batch(texts, add_special_tokens=False)
            parts: dict[str, tuple[list, list]] = {s: ([], []) for s in SPLITS}
            for doc_id, text, enc in zip(ids, texts, encodings, strict=True):
                docs, split_texts = parts["val" if is_val(doc_id, cfg.val_fraction) else "train"]
                docs.append([bos, *enc.ids])
                split_texts.append(text)
            for split, (docs, split_texts) in parts.items():
                writers[split].add(docs, split_texts)
            docs_done += len(texts)
            if progress is not None:
                progress(docs_done, sum(w.tokens for w in writers.values()))
    finally:
        split_stats = {s: w.close() for s, w in writers.items()}

    stats = {
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "val_fraction": cfg.val_fraction,
        **{f"{s}_{k}": v for s, st in split_stats.items() for k, v in st.items()},
        "unigram_nats": unigram_baseline(writers["train"].counts, writers["val"].counts),
    }
    (out_dir / META_FILE).write_text(json.dumps(stats, indent=2))
    return stats


class TokenShard:
    """One split as a read-only memmap of tokens plus the start offset of each document."""

    def __init__(self, path_prefix: Path) -> None:
        prefix = Path(path_prefix)
        meta = json.loads((prefix.parent / META_FILE).read_text())
        dtype = np.dtype(meta["dtype"])
        bin_path = prefix.parent / f"{prefix.name}.bin"
        if bin_path.stat().st_size:
            self.tokens = np.memmap(bin_path, dtype=dtype, mode="r")
        else:  # numpy cannot map an empty file
            self.tokens = np.zeros(0, dtype=dtype)
            self.tokens.flags.writeable = False
        self.doc_starts: np.ndarray = np.load(prefix.parent / f"{prefix.name}.idx.npy")
        self.vocab_size: int = meta["vocab_size"]

    def __len__(self) -> int:
        """Number of tokens (not documents) in the split."""
        return len(self.tokens)

    @property
    def num_docs(self) -> int:
        return len(self.doc_starts)

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document i, its leading <|bos|> included."""
        end = self.doc_starts[i + 1] if i + 1 < self.num_docs else len(self.tokens)
        return self.tokens[self.doc_starts[i] : end]


def open_shard(out_dir: Path, split: str) -> TokenShard:
    """Open the train or val shard written by tokenize_documents."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return TokenShard(Path(out_dir) / split)
