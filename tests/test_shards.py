"""Token shards: exact round trip, dtype, stable split, read-only maps, unigram baseline."""

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmforge.tokenizer import (
    TokenizeConfig,
    TokenizerConfig,
    TokenShard,
    load_tokenizer,
    open_shard,
    tokenize_documents,
    train_tokenizer,
)
from llmforge.tokenizer.shards import is_val, token_dtype

TEXTS = [
    f"def func_{i}(x):\n    return x * {i}  # ü {'🐍' * (i % 3)}\n\tpass\n" * (1 + i % 4)
    for i in range(60)
] + ["", "Größe über naïve façade, 日本語"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("shards")
    ids = [f"doc-{i}" for i in range(len(TEXTS))]
    docs = tmp / "documents.parquet"
    pq.write_table(pa.table({"id": ids, "text": TEXTS, "source": ["t"] * len(TEXTS)}), docs)
    train_tokenizer(TokenizerConfig(vocab_size=400), docs, tmp / "tokenizer.json")
    return docs, tmp / "tokenizer.json", dict(zip(ids, TEXTS, strict=True))


@pytest.fixture(scope="module")
def written(corpus, tmp_path_factory):
    docs, tok_path, _ = corpus
    out = tmp_path_factory.mktemp("out")
    calls: list[tuple[int, int]] = []
    cfg = TokenizeConfig(val_fraction=0.25, batch_docs=7)
    stats = tokenize_documents(cfg, docs, tok_path, out, progress=lambda d, t: calls.append((d, t)))
    return out, stats, calls


def test_shards_round_trip_documents(corpus, written):
    _, tok_path, by_id = corpus
    out, stats, _ = written
    tok = load_tokenizer(tok_path)
    bos = tok.token_to_id("<|bos|>")
    decoded = []
    for split in ("train", "val"):
        shard = open_shard(out, split)
        assert shard.num_docs == stats[f"{split}_docs"]
        assert len(shard) == stats[f"{split}_tokens"]
        for i in range(shard.num_docs):
            doc = shard.doc(i)
            assert doc[0] == bos and bos not in doc[1:]
            decoded.append(tok.decode(doc[1:].tolist(), skip_special_tokens=False))
    expected_val = [t for k, t in by_id.items() if is_val(k, 0.25)]
    expected_train = [t for k, t in by_id.items() if not is_val(k, 0.25)]
    assert decoded == expected_train + expected_val  # file order is preserved per split


def test_stats_and_meta(corpus, written):
    _, _, by_id = corpus
    out, stats, calls = written
    assert json.loads((out / "shards.json").read_text()) == stats
    assert stats["train_docs"] + stats["val_docs"] == len(by_id)
    assert stats["train_docs"] > 0 and stats["val_docs"] > 0
    total_bytes = sum(len(t.encode()) for t in by_id.values())
    assert stats["train_text_bytes"] + stats["val_text_bytes"] == total_bytes
    assert (out / "train.bin").stat().st_size == 2 * stats["train_tokens"]
    assert calls[-1] == (len(by_id), stats["train_tokens"] + stats["val_tokens"])
    assert len(calls) == math.ceil(len(by_id) / 7)


def test_dtype_choice(written):
    out, stats, _ = written
    assert stats["dtype"] == "uint16"
    assert open_shard(out, "train").tokens.dtype == np.uint16
    assert token_dtype(4096) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(100_000) == np.uint32


def test_val_split_is_deterministic_and_id_based():
    ids = [f"doc-{i}" for i in range(5000)]
    picks = [is_val(i, 0.1) for i in ids]
    assert picks == [is_val(i, 0.1) for i in ids]
    assert 0.07 < sum(picks) / len(ids) < 0.13
    # Growing the corpus never moves existing documents between splits.
    assert [is_val(i, 0.1) for i in ids[:100]] == picks[:100]
    assert not any(is_val(i, 0.0) for i in ids)


def test_val_split_stable_across_runs(corpus, written, tmp_path):
    docs, tok_path, _ = corpus
    out, stats, _ = written
    again = tokenize_documents(
        TokenizeConfig(val_fraction=0.25, batch_docs=64), docs, tok_path, tmp_path
    )
    assert again == stats
    for split in ("train", "val"):
        assert (tmp_path / f"{split}.bin").read_bytes() == (out / f"{split}.bin").read_bytes()


def test_memmap_is_read_only(written):
    out, _, _ = written
    shard = TokenShard(out / "train")
    assert isinstance(shard.tokens, np.memmap)
    assert shard.doc_starts.dtype == np.int64 and shard.doc_starts[0] == 0
    with pytest.raises(ValueError):
        shard.tokens[0] = 1


def test_unigram_baseline_positive_finite(written):
    _, stats, _ = written
    baseline = stats["unigram_nats"]
    assert baseline is not None and math.isfinite(baseline) and baseline > 0
    assert baseline < math.log(stats["vocab_size"])  # frequencies beat a uniform guess


def test_empty_val_split(corpus, tmp_path):
    docs, tok_path, _ = corpus
    stats = tokenize_documents(TokenizeConfig(val_fraction=0.0), docs, tok_path, tmp_path)
    assert stats["val_docs"] == 0 and stats["unigram_nats"] is None
    val = open_shard(tmp_path, "val")
    assert len(val) == 0 and val.num_docs == 0


def test_open_shard_rejects_unknown_split(written):
    with pytest.raises(ValueError, match="split"):
        open_shard(written[0], "test")
