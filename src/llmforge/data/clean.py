"""Text cleaning, normalisation and the cheap quality filters.

Normalising first makes exact dedup catch copies that differ only in line endings, trailing
spaces or Unicode composition, and makes the filters measure the text the model will see.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, replace
from typing import ClassVar

import ftfy

from llmforge.data.records import Document, Drop

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


@dataclass(frozen=True)
class LengthFilter:
    """Too little text teaches nothing; too much is usually a dump, not a document."""

    name: ClassVar[str] = "length"
    min_chars: int = 200  # stubs and empty __init__ files
    max_chars: int = 200_000  # dumps and generated tables; they also bloat one training window

    def __post_init__(self) -> None:
        if not 0 <= self.min_chars <= self.max_chars:
            raise ValueError(f"need 0 <= min_chars <= max_chars, got {self.min_chars}, "
                             f"{self.max_chars}")

    def __call__(self, doc: Document) -> Document | Drop:
        n = len(doc.text)
        if n < self.min_chars:
            return Drop("too_short", f"{n} < {self.min_chars} chars")
        if n > self.max_chars:
            return Drop("too_long", f"{n} > {self.max_chars} chars")
        return doc


@dataclass(frozen=True)
class LongestLineFilter:
    """A very long line marks minified, encoded or generated content."""

    name: ClassVar[str] = "longest_line"
    max_line_chars: int = 1000

    def __call__(self, doc: Document) -> Document | Drop:
        longest = max(map(len, doc.text.split("\n")))
        if longest > self.max_line_chars:
            return Drop("long_line", f"longest line {longest} > {self.max_line_chars} chars")
        return doc


@dataclass(frozen=True)
class AlphaFilter:
    """Mostly digits, symbols or noise: letters make up too little of the non-space text."""

    name: ClassVar[str] = "alpha"
    min_alpha_frac: float = 0.25  # letters over non-whitespace characters

    def __call__(self, doc: Document) -> Document | Drop:
        visible = len("".join(doc.text.split()))
        frac = sum(map(str.isalpha, doc.text)) / visible if visible else 0.0
        if frac < self.min_alpha_frac:
            return Drop("low_alpha", f"letter fraction {frac:.3f} < {self.min_alpha_frac}")
        return doc


_GENERATED = re.compile(
    r"\bauto-?generated|\bdo not edit\b|\bgencodec\.py|\bth(is|e) (file|module) "
    r"(is|was) (auto-?)?generated",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class GeneratedFilter:
    """Machine-generated files (codec tables, parser tables) announce themselves in their header;
    they are near-copies of one another and would dominate both training and validation."""

    name: ClassVar[str] = "generated"
    header_chars: int = 1000

    def __call__(self, doc: Document) -> Document | Drop:
        found = _GENERATED.search(doc.text, 0, self.header_chars)
        if found:
            return Drop("generated", f"header says {found.group(0)!r}")
        return doc


# ftfy limited to undoing mojibake ("cafÃ©" -> "café", C1 controls read as Windows-1252,
# surrogate pairs from JSON). Everything else it can do would rewrite text that is not broken:
# HTML entities are literal in code and in text about HTML, curly quotes, ligatures and
# full-width forms are real characters, and line breaks, control characters and NFC are
# `normalise`'s job. Terminal colour codes are stripped: they are never text.
_FTFY = ftfy.TextFixerConfig(
    unescape_html=False,
    uncurl_quotes=False,
    fix_latin_ligatures=False,
    fix_character_width=False,
    fix_line_breaks=False,
    remove_control_chars=False,
    normalization=None,
    explain=False,
)

# Site furniture: the policy phrases C4 (Raffel et al., 2020; TFDS c4_utils) drops lines for
# ("terms of use", "privacy policy", "cookie policy", "use(s) cookies", "use of cookies"), plus
# navigation, sharing, newsletter and footer phrases. C4 drops any line containing one; only
# short lines go here, since a sentence about cookies or privacy policies is prose.
_BOILERPLATE = re.compile(
    r"\b(?:click here|all rights reserved|share (?:this|on)|(?:sign up|subscribe) (?:for|to) "
    r"(?:our|the) newsletter|skip to (?:main )?content|back to top|uses? cookies|use of cookies|"
    r"accept (?:all )?cookies|cookie (?:policy|settings|preferences)|privacy policy|"
    r"terms of (?:use|service))\b",
    re.IGNORECASE,
)
# Account links are boilerplate only when a line holds nothing else ("Log in | Register"): a
# heading like "How to sign in to the archive" is content.
_ACCOUNT = r"(?:log ?in|log ?out|sign ?in|sign ?out|sign ?up|register|my account|subscribe)"
_ACCOUNT_LINKS = re.compile(rf"\W*{_ACCOUNT}(?:\W+{_ACCOUNT})*\W*", re.IGNORECASE)
# Menu items, footers and one-line banners are short; a longer line that mentions the same
# phrases is most likely a sentence about them, and stays.
BOILERPLATE_MAX_WORDS = 10


def is_boilerplate(line: str) -> bool:
    """A short line of navigation, sharing, legal or cookie-banner text."""
    if not line or len(line.split()) > BOILERPLATE_MAX_WORDS:
        return False
    return bool(_ACCOUNT_LINKS.fullmatch(line) or _BOILERPLATE.search(line))


def drop_boilerplate(text: str) -> tuple[str, int]:
    """Remove boilerplate lines; returns the text and how many lines went."""
    lines = text.split("\n")
    kept = [line for line in lines if not is_boilerplate(line)]
    removed = len(lines) - len(kept)
    return ("\n".join(kept).strip("\n"), removed) if removed else (text, 0)


@dataclass(frozen=True)
class Clean:
    """Repairs mojibake, normalises, and removes boilerplate lines, so that later filters and
    dedup see the text the model will; a document with nothing left goes."""

    name: ClassVar[str] = "clean"

    fix_unicode: bool = True
    normalise: bool = True
    drop_boilerplate_lines: bool = True

    def __call__(self, doc: Document) -> Document | Drop:
        text, meta = doc.text, doc.meta
        if self.fix_unicode:
            text = ftfy.fix_text(text, _FTFY)
        if self.normalise:
            text = normalise(text)
        if self.drop_boilerplate_lines:
            text, removed = drop_boilerplate(text)
            if removed:
                meta = {**meta, "boilerplate_lines_removed": removed}
        if not text.strip():
            return Drop("empty_after_cleaning", f"{len(doc.text)} chars before cleaning")
        return replace(doc, text=text, meta=meta)
