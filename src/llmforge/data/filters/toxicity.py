"""Toxicity filtering: set aside documents dense in obscenities and slurs.

The default scorer counts words from a list, which is fast and transparent; anything with a
`Scorer`'s shape (a classifier, say) can replace it by overriding `ToxicityFilter.scorer`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import ClassVar, Protocol

from llmforge.data.records import Document, Drop

BUILTIN_WORDLIST = "wordlists/toxic_en.txt"
# Words are letter/digit runs, joined across apostrophes (don't, y'all); case is folded.
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


class Scorer(Protocol):
    """Maps a text to a toxicity score in [0, 1]; higher is more toxic."""

    def __call__(self, text: str) -> float: ...


@dataclass(frozen=True)
class WordListScorer:
    """Fraction of a text's words that belong to listed terms; a matched phrase counts all of
    its words, so "go fuck yourself" weighs three."""

    singles: frozenset[str]
    # First word -> the phrases starting with it, longest first so the longest match wins.
    phrases: dict[str, tuple[tuple[str, ...], ...]]

    @classmethod
    def from_terms(cls, terms: list[str]) -> WordListScorer:
        singles: set[str] = set()
        by_first: dict[str, list[tuple[str, ...]]] = {}
        for term in terms:
            parts = tuple(words(term))
            if len(parts) == 1:
                singles.add(parts[0])
            elif parts:
                by_first.setdefault(parts[0], []).append(parts)
        phrases = {first: tuple(sorted(group, key=len, reverse=True))
                   for first, group in by_first.items()}
        return cls(frozenset(singles), phrases)

    def __call__(self, text: str) -> float:
        tokens = words(text)
        hits = i = 0
        while i < len(tokens):
            span = self._match_at(tokens, i)
            hits += span
            i += span or 1
        return hits / len(tokens) if tokens else 0.0

    def _match_at(self, tokens: list[str], i: int) -> int:
        """How many words a listed term covers starting at `i` (0 if none)."""
        for phrase in self.phrases.get(tokens[i], ()):
            if tuple(tokens[i:i + len(phrase)]) == phrase:
                return len(phrase)
        return 1 if tokens[i] in self.singles else 0


@cache
def load_wordlist(path: str = "") -> WordListScorer:
    """Read a list once per process: one term per line, blank and "#" lines skipped;
    "" is the built-in English list."""
    if path:
        text = Path(path).read_text(encoding="utf-8")
    else:
        text = resources.files(__package__).joinpath(BUILTIN_WORDLIST).read_text("utf-8")
    terms = [line.strip() for line in text.splitlines()]
    return WordListScorer.from_terms([t for t in terms if t and not t.startswith("#")])


@dataclass(frozen=True)
class ToxicityFilter:
    """Drops documents whose toxicity score exceeds `threshold`; notes the score in meta."""

    name: ClassVar[str] = "toxicity"

    # C4 dropped a page for any listed word (threshold 0); Dodge et al. (2021, "Documenting
    # Large Webtext Corpora") found that removes disproportionately much medical text and text
    # by and about minorities. At 1 word in 100, an incidental curse in an article survives,
    # while abuse and porn spam, where such words are dense, do not.
    threshold: float = 0.01
    wordlist: str = ""  # "" = built-in list; otherwise a path to a file, one term per line

    @property
    def scorer(self) -> Scorer:
        return load_wordlist(self.wordlist)

    def __call__(self, doc: Document) -> Document | Drop:
        score = self.scorer(doc.text)
        if score > self.threshold:
            return Drop("toxic", f"score {score:.3f} > {self.threshold}")
        return replace(doc, meta={**doc.meta, "toxicity": round(score, 4)})
