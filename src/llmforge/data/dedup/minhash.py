"""MinHash signatures and LSH buckets for near-duplicate detection, with datatrove's defaults.

A document is a set of word 5-grams of its normalised text. Each of 14 buckets holds 8 MinHash
values; two documents are near-duplicates when all 8 values of any one bucket match, which
happens with probability 1 - (1 - J**8)**14 for 5-gram Jaccard similarity J: about 0.56 at
J = 0.7, 0.92 at 0.8 and 0.99 at 0.85 (threshold ~ (1/14)**(1/8) ~ 0.72). As in datatrove there
is no exact Jaccard re-check: matches are unioned into clusters and one document per cluster
survives.
"""

from __future__ import annotations

import functools
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_P = np.uint64((1 << 61) - 1)  # Mersenne prime: reducing mod p is a shift, a mask and an add
_LOW30 = np.uint64((1 << 30) - 1)
_LOW31 = np.uint64((1 << 31) - 1)
_EMPTY = np.iinfo(np.uint64).max  # above every real hash (< p)
_SPACE = 32
_WORD_SEED = 0x5EED  # fixed: shingle hashes must not depend on MinHashConfig.seed
_CHUNK_ROWS = 128  # shingles per block: (permutations, 128) uint64 buffers stay in L2 cache


@dataclass(frozen=True)
class MinHashConfig:
    """Shingle size and LSH shape; an index only matches signatures made with the same config."""

    n_grams: int = 5
    buckets: int = 14
    hashes_per_bucket: int = 8
    seed: int = 1


@functools.cache
def _translation() -> dict[int, str | None]:
    """Digits -> "0", punctuation and symbols (P*, S*) -> space, combining marks (Mn) dropped.

    One str.translate does all three (CPython's ASCII fast path makes it ~1 ns a character);
    built once on first use (~0.1 s over all code points).
    """
    table: dict[int, str | None] = {}
    for cp in range(sys.maxunicode + 1):
        category = unicodedata.category(chr(cp))
        if category == "Nd":
            table[cp] = "0"
        elif category == "Mn":
            table[cp] = None
        elif category[0] in "PS":
            table[cp] = " "
    return table


def normalise_for_minhash(text: str) -> str:
    """Lowercase, accents stripped, digits -> 0, punctuation and symbols -> space, single spaces.

    Copies that differ only in casing, numbers, punctuation or accents then share their shingles.
    Accents go by NFD plus dropping combining marks (category Mn); every decimal digit (Nd)
    becomes "0"; punctuation is every code point in Unicode categories P* and S*.
    """
    text = text.lower()
    if not text.isascii():
        text = unicodedata.normalize("NFD", text)
    return " ".join(text.translate(_translation()).split())


def _splitmix(h: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, in place: makes the linear byte hash non-linear before combining."""
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


def _tile(values: np.ndarray, columns: int) -> np.ndarray:
    """values as a contiguous column repeated `columns` times."""
    return np.ascontiguousarray(np.broadcast_to(values[:, None], (len(values), columns)))


class MinHasher:
    """Turns text into a (buckets, hashes_per_bucket) uint64 MinHash signature.

    Shingles are word n-grams of the normalised text. Each word gets a stable 64-bit hash (unlike
    `hash()`, the same in every process and on every machine): a sum of its UTF-8 bytes times
    fixed random per-offset keys, made non-linear by SplitMix64; a shingle's hash combines its
    words' hashes with odd per-position multipliers. Each of the buckets * hashes_per_bucket
    permutations is (a*x + b) mod (2**61 - 1), computed exactly; a and b come from the raw bit
    stream of `np.random.default_rng(seed)`, which NumPy keeps stable across versions, so saved
    indexes stay valid. A text shorter than n_grams words is one shingle of all its words. An
    empty text (after normalisation) gets all values = uint64 max, so it matches only other empty
    texts. Not thread-safe: it reuses scratch buffers, so use one per thread.
    """

    def __init__(self, cfg: MinHashConfig = MinHashConfig()) -> None:
        self.cfg = cfg
        n_perm = cfg.buckets * cfg.hashes_per_bucket
        raw = np.random.default_rng(cfg.seed).bit_generator.random_raw(2 * n_perm)
        a = raw[:n_perm] % (_P - np.uint64(1)) + np.uint64(1)
        # Tiled to the block shape: ufuncs on two contiguous arrays beat broadcasting a column.
        tile = functools.partial(_tile, columns=_CHUNK_ROWS)
        self._a0, self._a1 = tile(a & _LOW31), tile(a >> np.uint64(31))
        self._a1_twice = self._a1 << np.uint64(1)
        self._b = tile(raw[n_perm:] % _P)
        self._position = np.random.PCG64(_WORD_SEED).random_raw(cfg.n_grams) | np.uint64(1)
        self._byte_keys = np.empty(0, np.uint64)
        self._buffers = np.empty((3, n_perm, _CHUNK_ROWS), np.uint64)

    def __reduce__(self) -> tuple[type[MinHasher], tuple[MinHashConfig]]:
        """Pickles as its config: workers rebuild the ~1 MB of tables instead of receiving them."""
        return MinHasher, (self.cfg,)

    def signature(self, text: str) -> np.ndarray:
        """MinHash signature, shape (buckets, hashes_per_bucket), dtype uint64."""
        x = self.shingle_hashes(text)
        sig = np.full(self._b.shape[0], _EMPTY, np.uint64)
        for start in range(0, len(x), _CHUNK_ROWS):
            np.minimum(sig, self._permute(x[start : start + _CHUNK_ROWS]).min(axis=1), out=sig)
        return sig.reshape(self.cfg.buckets, self.cfg.hashes_per_bucket)

    def shingle_hashes(self, text: str) -> np.ndarray:
        """One hash (< 2**61) per word n-gram of the normalised text; empty for an empty text."""
        text = normalise_for_minhash(text)
        if not text:
            return np.empty(0, np.uint64)
        h = self._word_hashes(text)
        n = min(self.cfg.n_grams, len(h))
        m = len(h) - n + 1
        acc = h[:m] * self._position[0]
        for k in range(1, n):
            acc += h[k : k + m] * self._position[k]
        return acc % _P

    def _word_hashes(self, text: str) -> np.ndarray:
        """Hash of each word of normalised (single-spaced, non-empty) text, all bytes at once."""
        data = np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8)
        spaces = np.flatnonzero(data == _SPACE)
        starts = np.concatenate(([0], spaces + 1))
        lengths = np.diff(np.concatenate((starts, [len(data) + 1]))) - 1
        offsets = np.arange(len(data)) - np.repeat(starts, lengths + 1)[: len(data)]
        keys = self._keys_for(int(lengths.max()) + 2)  # keys[0] weighs the length
        terms = data * keys[offsets + 1]
        terms[spaces] = 0
        h = np.add.reduceat(terms, starts) + lengths.astype(np.uint64) * keys[0]
        return _splitmix(h)

    def _keys_for(self, n: int) -> np.ndarray:
        """At least n per-offset byte keys; a longer stream has the shorter one as its prefix."""
        if len(self._byte_keys) < n:
            size = max(n, 2 * len(self._byte_keys), 64)
            self._byte_keys = np.random.PCG64(_WORD_SEED + 1).random_raw(size)
        return self._byte_keys

    def _permute(self, x: np.ndarray) -> np.ndarray:
        """(a*x + b) mod p for every permutation (row) and shingle (column), exact in uint64.

        With 31-bit halves a = a1*2**31 + a0, x = x1*2**31 + x0 and 2**61 = 1 (mod p):
        a*x = 2*a1*x1 + (a1*x0 + a0*x1)*2**31 + a0*x0 (mod p), each part below 2**62, and
        mid*2**31 = (mid >> 30) + (mid mod 2**30)*2**31 (mod p).
        """
        n = len(x)
        out, mid, tmp = (buffer[:, :n] for buffer in self._buffers)
        a0, a1, a1_twice, b = (c[:, :n] for c in (self._a0, self._a1, self._a1_twice, self._b))
        x0, x1 = x & _LOW31, x >> np.uint64(31)
        np.multiply(a1_twice, x1, out=out)
        np.multiply(a1, x0, out=mid)
        mid += np.multiply(a0, x1, out=tmp)
        out += np.multiply(a0, x0, out=tmp)
        out += np.right_shift(mid, np.uint64(30), out=tmp)
        mid &= _LOW30
        mid <<= np.uint64(31)
        out += mid
        out += b  # < 5 * 2**61 + 2**32: no overflow
        np.right_shift(out, np.uint64(61), out=tmp)
        out &= _P
        out += tmp  # <= p + 5
        return np.minimum(out, np.subtract(out, _P, out=tmp), out=out)  # wraps unless out >= p


class LSHIndex:
    """Bucket tables and union-find clusters over the signatures of one dataset.

    Each (bucket index, the bucket's 8 hash values as bytes) maps to the smallest key seen with
    it; a new signature is unioned with every key it meets. Survivor rule: within a cluster the
    document with the SMALLEST key survives. The pipeline assigns keys in deterministic input
    order (shard index, position), so the first document in input order survives, and clusters,
    survivors and tables do not depend on the order of `add` calls or how the work was split.

    Keys added here must be >= 0. Keys loaded from an earlier index are "previous" and negative
    (see `load`), so they are always their cluster's smallest key: a document colliding with an
    earlier dataset's document is a duplicate, and the earlier one (not in this dataset) survives.
    Memory: ~2.2 KB per added document (14 dict entries with 64-byte keys, plus union-find).
    """

    def __init__(self, cfg: MinHashConfig = MinHashConfig()) -> None:
        self.cfg = cfg
        self._tables: list[dict[bytes, int]] = [{} for _ in range(cfg.buckets)]
        self._parent: dict[int, int] = {}  # every added key, and previous keys that were met

    def add(self, key: int, signature: np.ndarray) -> list[int]:
        """Index a document; returns the keys it collides with, already unioned with it.

        Those are the keys stored for its matching buckets: each the smallest seen so far.
        """
        shape = (self.cfg.buckets, self.cfg.hashes_per_bucket)
        if key < 0 or key in self._parent:
            raise ValueError(f"key {key} is negative or already added")
        if signature.shape != shape:
            raise ValueError(f"signature shape {signature.shape} != {shape}")
        self._parent[key] = key
        hits: list[int] = []
        for table, row in zip(self._tables, np.asarray(signature, np.uint64), strict=True):
            bucket = row.tobytes()
            other = table.setdefault(bucket, key)
            if other == key:
                continue
            if key < other:
                table[bucket] = key
            if other not in hits:
                hits.append(other)
                self._union(key, other)
        return hits

    def clusters(self) -> dict[int, list[int]]:
        """Survivor -> sorted member keys; singletons and the previous keys met are included."""
        out: dict[int, list[int]] = {}
        for key in sorted(self._parent):
            out.setdefault(self._find(key), []).append(key)
        return out

    def duplicates(self) -> set[int]:
        """Keys of this dataset's documents that do not survive their cluster."""
        return {key for key in self._parent if key >= 0 and self._find(key) != key}

    def cluster_sizes(self) -> dict[int, int]:
        """Cluster size -> number of clusters, for the datacard."""
        return dict(sorted(Counter(len(keys) for keys in self.clusters().values()).items()))

    def save(self, path: str | Path) -> None:
        """Write the bucket tables (not the clusters) as .npz, for deduplicating later datasets."""
        width = self.cfg.hashes_per_bucket
        buckets = np.repeat(np.arange(self.cfg.buckets, dtype=np.uint16),
                            [len(t) for t in self._tables])
        hashes = np.frombuffer(b"".join(b"".join(t) for t in self._tables), np.uint64)
        keys = np.fromiter((k for t in self._tables for k in t.values()), np.int64)
        cfg = self.cfg
        config = np.array([cfg.n_grams, cfg.buckets, cfg.hashes_per_bucket, cfg.seed], np.int64)
        with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, config=config, bucket=buckets, hashes=hashes.reshape(-1, width), keys=keys)

    @classmethod
    def load(cls, path: str | Path) -> LSHIndex:
        """An index holding an earlier dataset's tables, its keys turned "previous" (negative).

        The earlier index's key k >= 0 becomes -1 - k; keys that were already previous there (it
        was itself built on an older index) move below those, by -(1 + its largest key), so keys
        of every generation stay distinct. Its `cfg` is the saved one: hash new documents with
        `MinHasher(index.cfg)`, since other settings would never match.
        """
        with np.load(path) as data:
            n_grams, buckets, per_bucket, seed = (int(v) for v in data["config"])
            index = cls(MinHashConfig(n_grams, buckets, per_bucket, seed))
            keys, hashes, bucket = data["keys"], data["hashes"], data["bucket"]
        shift = 1 + int(keys.max(initial=-1))
        previous = np.where(keys >= 0, -1 - keys, keys - shift).tolist()
        blob, width = hashes.astype(np.uint64).tobytes(), 8 * per_bucket
        for row, (b, key) in enumerate(zip(bucket.tolist(), previous, strict=True)):
            index._tables[b][blob[row * width : (row + 1) * width]] = key
        return index

    def _find(self, key: int) -> int:
        parent = self._parent
        while (up := parent[key]) != key:
            parent[key] = parent[up]  # path splitting: point at the grandparent
            key = up
        return key

    def _union(self, key: int, other: int) -> None:
        """Merge two clusters under the smaller root, which is then the survivor."""
        self._parent.setdefault(other, other)
        a, b = self._find(key), self._find(other)
        if a != b:
            self._parent[max(a, b)] = min(a, b)
