"""Text measures shared by the quality heuristics (Gopher, C4, FineWeb).

One definition of "word", "line" and "repeat" keeps the filters consistent with each other and
makes a threshold mean the same thing wherever it appears.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

# datatrove tokenizes with NLTK's Treebank tokenizer, which needs model files; this regex is its
# cheap stand-in. A word is a run of letters/digits, joined across inner apostrophes and hyphens
# ("don't", "e-mail"); any other run of visible characters ("," "..." "@-@") is a symbol token,
# which NLTK also emits as a token of its own.
_TOKEN = re.compile(r"(\w+(?:['’-]\w+)*)|([^\w\s]+)")
_PARAGRAPH_BREAK = re.compile(r"\n{2,}")


@dataclass(frozen=True, slots=True)
class Tokens:
    """A text's tokens in order (`all`) and the ones that are words, not pure symbols."""

    all: list[str]
    words: list[str]


def tokenize(text: str) -> Tokens:
    """Words and symbol runs of `text`, in order."""
    pairs = _TOKEN.findall(text)
    return Tokens([word or symbols for word, symbols in pairs], [word for word, _ in pairs if word])


def nonblank_lines(text: str) -> list[str]:
    """Lines with visible content; blank lines only separate paragraphs, so no ratio counts them."""
    return [line for line in text.split("\n") if line.strip()]


def paragraphs(text: str) -> list[str]:
    """Blocks separated by one or more blank lines (Gopher's paragraph definition)."""
    return _PARAGRAPH_BREAK.split(text.strip())


@dataclass(frozen=True, slots=True)
class Repeats:
    """Items equal to an earlier item: how many, and how many characters they hold."""

    count: int
    chars: int


def repeats(items: list[str]) -> Repeats:
    """The first occurrence of each item is original; every later copy is a repeat."""
    counts = Counter(items)
    chars = sum(len(item) * (n - 1) for item, n in counts.items() if n > 1)
    return Repeats(len(items) - len(counts), chars)


@dataclass(frozen=True, slots=True)
class _Level:
    """The n-grams of one size: an exact id per position, and per id its first position and
    count."""

    ids: np.ndarray
    first: np.ndarray
    counts: np.ndarray


class NGrams:
    """Gopher's n-gram repetition measures over one token sequence.

    N-grams become integer ids (those of size n from those of size n - 1, so ids are exact, not
    hashes), which turns the counting into a few array sorts instead of hashing a tuple per
    position in Python. Sizes are built on demand, so a document dropped early pays for few.
    """

    def __init__(self, tokens: list[str]) -> None:
        self._size = len(tokens)
        lengths = np.fromiter(map(len, tokens), np.int64, self._size)
        self._ends = np.concatenate(([0], np.cumsum(lengths)))  # _ends[i]: chars in tokens[:i]
        # A token's id is its first position: filling from the end leaves the smallest index.
        first = dict(zip(reversed(tokens), range(self._size - 1, -1, -1), strict=True))
        self._token_ids = np.fromiter(map(first.__getitem__, tokens), np.int64, self._size)
        self._levels: dict[int, _Level] = {}

    def _level(self, n: int) -> _Level | None:
        """The n-grams of size n, or None when the text has fewer than n tokens."""
        if n > self._size:
            return None
        while len(self._levels) < n:
            # Extend the k-gram ids to (k+1)-grams (k == 0: unigrams). Both ids are below the
            # token count, so the key stays below its square: exact in int64 up to 3e9 tokens.
            k = len(self._levels)
            key = (self._levels[k].ids[:-1] * self._size + self._token_ids[k:] if k
                   else self._token_ids)
            _, first, ids, counts = np.unique(
                key, return_index=True, return_inverse=True, return_counts=True)
            self._levels[k + 1] = _Level(ids, first, counts)
        return self._levels[n]

    def _chars(self, start: int, n: int) -> int:
        """Characters of the n tokens from `start`, without separators."""
        return int(self._ends[start + n] - self._ends[start])

    def top_chars(self, n: int) -> int:
        """Characters covered by every occurrence of the most frequent n-gram.

        As datatrove measures it, an n-gram's length includes the n - 1 spaces joining its
        tokens; among equally frequent n-grams the first to occur counts.
        """
        level = self._level(n)
        if level is None:
            return 0
        top = int(level.counts.max())
        start = int(level.first[level.counts == top].min())
        return top * (self._chars(start, n) + n - 1)

    def duplicate_chars(self, n: int) -> int:
        """Characters in n-grams that repeat an earlier n-gram, each character counted once.

        datatrove's scan: walking left to right, a repeated n-gram adds its characters (without
        joining spaces) and the walk jumps past it, so overlapping repeats are not counted
        twice; n-grams jumped over are not remembered. Only positions that repeat an earlier
        n-gram can add characters, so the walk here visits just those (few, in real text).
        """
        level = self._level(n)
        if level is None or len(level.counts) == len(level.ids):
            return 0
        firsts = level.first[level.ids]  # per position: where its n-gram first occurs
        later = np.flatnonzero(firsts != np.arange(len(firsts))).tolist()
        unvisited: set[int] = set()  # n-grams whose every occurrence so far was jumped over
        chars = resume = 0
        for i in later:
            if i < resume:
                continue
            gram = int(level.ids[i])
            if gram in unvisited:  # its first visit: remembered, not counted
                unvisited.discard(gram)
                continue
            chars += self._chars(i, n)
            resume = i + n
            unvisited.update(int(level.ids[j]) for j in range(i + 1, min(resume, len(firsts)))
                             if firsts[j] == j)
        return chars
