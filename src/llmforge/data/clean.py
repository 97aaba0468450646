"""Text normalisation and the cheap quality filters.

Normalising first makes exact dedup catch copies that differ only in line endings, trailing
spaces or Unicode composition, and makes the filters measure the text the model will see.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Protocol

from llmforge.data.records import Drop

# C0/C1 control characters except \t (0x09) and \n (0x0a), plus lone surrogates, which can come
# from JSON escapes and cannot be written as UTF-8.
_UNWANTED = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_TRAILING_SPACE = re.compile(r"[^\S\n]+$", re.MULTILINE)
_MANY_BLANK_LINES = re.compile(r"\n{4,}")  # 3+ blank lines = 4+ newlines in a row


def normalise(text: str) -> str:
    """Canonical form: NFC, `\\n` line ends, no controls or trailing spaces, <= 2 blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _UNWANTED.sub("", text)
    text = unicodedata.normalize("NFC", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _MANY_BLANK_LINES.sub("\n\n\n", text)
    return text.strip("\n")


class Filter(Protocol):
    """Looks at normalised text and says why to drop it, or None to keep it."""

    def __call__(self, text: str) -> Drop | None: ...


@dataclass(frozen=True)
class LengthFilter:
    """Too little text teaches nothing; too much is usually a dump, not a document."""

    min_chars: int
    max_chars: int

    def __call__(self, text: str) -> Drop | None:
        n = len(text)
        if n < self.min_chars:
            return Drop("too_short", f"{n} < {self.min_chars} chars")
        if n > self.max_chars:
            return Drop("too_long", f"{n} > {self.max_chars} chars")
        return None


@dataclass(frozen=True)
class LongestLineFilter:
    """A very long line marks minified, encoded or generated content."""

    max_line_chars: int

    def __call__(self, text: str) -> Drop | None:
        longest = max(map(len, text.split("\n")))
        if longest > self.max_line_chars:
            return Drop("long_line", f"longest line {longest} > {self.max_line_chars} chars")
        return None


@dataclass(frozen=True)
class AlphaFilter:
    """Mostly digits, symbols or noise: letters make up too little of the non-space text."""

    min_alpha_frac: float

    def __call__(self, text: str) -> Drop | None:
        visible = len("".join(text.split()))
        frac = sum(map(str.isalpha, text)) / visible if visible else 0.0
        if frac < self.min_alpha_frac:
            return Drop("low_alpha", f"letter fraction {frac:.3f} < {self.min_alpha_frac}")
        return None


@dataclass(frozen=True)
class GeneratedFilter:
    """Machine-generated files (codec tables, parser tables) announce themselves in their header;
    they are near-copies of one another and would dominate both training and validation."""

    header_chars: int = 1000
    pattern: re.Pattern = re.compile(
        r"\bauto-?generated|\bdo not edit\b|\bgencodec\.py|\bth(is|e) (file|module) "
        r"(is|was) (auto-?)?generated",
        re.IGNORECASE,
    )

    def __call__(self, text: str) -> Drop | None:
        found = self.pattern.search(text, 0, self.header_chars)
        if found:
            return Drop("generated", f"header says {found.group(0)!r}")
        return None
