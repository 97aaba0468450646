"""Dedup steps: the only steps that see the whole dataset at once.

A dedup step works in two parts. In the parallel pass each kept document gets a `signature`;
then one process reads every signature in input order (keys are (shard, row) packed into an int,
so input order is key order) and `decide`s which documents are duplicates. Survivor rule: in a
group of duplicates the document that comes first in input order stays, so the result does not
depend on how many workers or shards the run used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from llmforge.data.dedup.minhash import LSHIndex, MinHashConfig, MinHasher
from llmforge.data.records import Document

# A signature tagged with the key and id of its document.
Signed = tuple[int, str, object]


@dataclass(frozen=True)
class ExactDedup:
    """Identical text (after the steps before it) keeps only its first occurrence."""

    name: ClassVar[str] = "exact_dedup"
    is_global: ClassVar[bool] = True

    def signature(self, doc: Document) -> np.ndarray:
        digest = hashlib.blake2b(doc.text.encode("utf-8"), digest_size=16).digest()
        return np.frombuffer(digest, dtype=np.uint8)

    def decide(self, signed: Iterable[Signed], out_dir: Path) -> tuple[dict[int, tuple], dict]:
        first: dict[bytes, str] = {}
        dropped = {}
        for key, doc_id, sig in signed:
            digest = sig.tobytes()
            if digest in first:
                dropped[key] = ("duplicate", f"same text as {first[digest]}")
            else:
                first[digest] = doc_id
        return dropped, {"unique": len(first), "duplicates": len(dropped)}


@dataclass(frozen=True)
class MinHashDedup:
    """Near-duplicates by MinHash LSH with datatrove's defaults (5-grams, 14 buckets x 8 hashes:
    duplicates above Jaccard ~0.72). `against` names an earlier run's `minhash_index.npz`:
    documents that collide with it are dropped too, and the earlier documents always win."""

    name: ClassVar[str] = "minhash_dedup"
    is_global: ClassVar[bool] = True
    INDEX_FILE: ClassVar[str] = "minhash_index.npz"

    n_grams: int = 5
    buckets: int = 14
    hashes_per_bucket: int = 8
    seed: int = 1
    against: str = ""
    _hasher: MinHasher = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cfg = MinHashConfig(self.n_grams, self.buckets, self.hashes_per_bucket, self.seed)
        object.__setattr__(self, "_hasher", MinHasher(cfg))
        if self.against and not Path(self.against).is_file():
            raise ValueError(f"minhash_dedup.against: no such index file: {self.against}")

    def signature(self, doc: Document) -> np.ndarray:
        return self._hasher.signature(doc.text)

    def decide(self, signed: Iterable[Signed], out_dir: Path) -> tuple[dict[int, tuple], dict]:
        index = LSHIndex.load(Path(self.against)) if self.against else LSHIndex()
        ids: dict[int, str] = {}
        for key, doc_id, sig in signed:
            ids[key] = doc_id
            index.add(key, sig)
        dropped = {}
        for root, members in index.clusters().items():
            survivor = ids.get(root, "an earlier dataset's document")
            for key in members:
                if key != root and key in ids:
                    dropped[key] = ("near_duplicate", f"near-duplicate of {survivor}")
        index.save(out_dir / self.INDEX_FILE)
        sizes = index.cluster_sizes()
        return dropped, {"near_duplicates": len(dropped),
                         "cluster_sizes": {str(k): v for k, v in sorted(sizes.items())}}
