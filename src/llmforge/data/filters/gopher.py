"""Gopher's quality and repetition heuristics (Rae et al. 2021, "Scaling Language Models",
appendix A; https://arxiv.org/abs/2112.11446), with datatrove 0.10's defaults and semantics.

Quality rules catch text that is not prose (tables, link lists, boilerplate); repetition rules
catch pages that say the same thing over and over, which models learn to regurgitate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from llmforge.data.filters.text_stats import NGrams, nonblank_lines, paragraphs, repeats, tokenize
from llmforge.data.records import Document, Drop

# Gopher: a document must contain at least two of these English words.
STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]
# datatrove counts a line starting with either as a bullet line.
BULLETS = ("•", "-")
ELLIPSES = ("...", "…")
_LETTER = re.compile(r"[^\W\d_]")


@dataclass(frozen=True)
class GopherQuality:
    """Keeps documents whose words, symbols and lines look like natural-language prose.

    Word counts and mean word length use words (tokens that are not pure symbols); the hash,
    ellipsis and alphabetic ratios divide by all tokens, punctuation included, as datatrove does.
    Line ratios are over non-blank lines (datatrove also counts blank lines, which would let
    blank-line paragraph breaks dilute the ratios).
    """

    name: ClassVar[str] = "gopher_quality"

    # Gopher: 50 <= words <= 100,000.
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    # Gopher: mean word length in [3, 10] characters.
    min_avg_word_length: float = 3.0
    max_avg_word_length: float = 10.0
    # Gopher: at most 0.1 "#" per token, and at most 0.1 ellipses per token.
    max_symbol_word_ratio: float = 0.1
    # Gopher: at most 90% of lines start with a bullet.
    max_bullet_lines_ratio: float = 0.9
    # Gopher: at most 30% of lines end with an ellipsis.
    max_ellipsis_lines_ratio: float = 0.3
    # Gopher: at least 80% of tokens contain a letter.
    min_alpha_words_ratio: float = 0.8
    # Gopher: at least 2 distinct stop words (case-insensitive).
    min_stop_words: int = 2
    stop_words: list[str] = field(default_factory=lambda: list(STOP_WORDS))

    def __call__(self, doc: Document) -> Document | Drop:
        return self.check(doc.text) or doc

    def check(self, text: str) -> Drop | None:
        """The first rule `text` breaks, in datatrove's order, or None."""
        tokens = tokenize(text)
        words = tokens.words
        n_words = len(words)
        if n_words < self.min_doc_words:
            return Drop("gopher_too_few_words", f"{n_words} words < {self.min_doc_words}")
        if n_words > self.max_doc_words:
            return Drop("gopher_too_many_words", f"{n_words} words > {self.max_doc_words}")

        avg_len = sum(map(len, words)) / n_words if n_words else 0.0
        if avg_len < self.min_avg_word_length:
            return Drop("gopher_words_too_short",
                        f"mean word length {avg_len:.2f} < {self.min_avg_word_length}")
        if avg_len > self.max_avg_word_length:
            return Drop("gopher_words_too_long",
                        f"mean word length {avg_len:.2f} > {self.max_avg_word_length}")

        n_tokens = max(len(tokens.all), 1)
        hashes = text.count("#") / n_tokens
        if hashes > self.max_symbol_word_ratio:
            return Drop("gopher_too_many_hashes",
                        f"{hashes:.3f} '#' per token > {self.max_symbol_word_ratio}")
        ellipses = sum(map(text.count, ELLIPSES)) / n_tokens
        if ellipses > self.max_symbol_word_ratio:
            return Drop("gopher_too_many_ellipses",
                        f"{ellipses:.3f} ellipses per token > {self.max_symbol_word_ratio}")

        lines = nonblank_lines(text)
        n_lines = max(len(lines), 1)
        bullets = sum(line.lstrip().startswith(BULLETS) for line in lines) / n_lines
        if bullets > self.max_bullet_lines_ratio:
            return Drop("gopher_too_many_bullet_lines",
                        f"{bullets:.3f} of lines bulleted > {self.max_bullet_lines_ratio}")
        trailing = sum(line.rstrip().endswith(ELLIPSES) for line in lines) / n_lines
        if trailing > self.max_ellipsis_lines_ratio:
            return Drop("gopher_too_many_ellipsis_lines",
                        f"{trailing:.3f} of lines end in '...' > {self.max_ellipsis_lines_ratio}")

        alpha_ratio = sum(1 for w in words if w.isalpha() or _LETTER.search(w)) / n_tokens
        if alpha_ratio < self.min_alpha_words_ratio:
            return Drop("gopher_too_few_alpha_words",
                        f"{alpha_ratio:.3f} of tokens have a letter < {self.min_alpha_words_ratio}")

        found = {s.lower() for s in self.stop_words}.intersection(map(str.lower, words))
        if len(found) < self.min_stop_words:
            return Drop("gopher_too_few_stop_words",
                        f"{len(found)} distinct stop words < {self.min_stop_words}")
        return None


# Gopher table A1 (datatrove's defaults): the most frequent n-gram may cover at most this
# fraction of the characters, for short n-grams...
TOP_NGRAM_MAX_FRAC = {2: 0.20, 3: 0.18, 4: 0.16}
# ...and repeated n-grams together at most this fraction, for longer ones.
DUP_NGRAM_MAX_FRAC = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


@dataclass(frozen=True)
class GopherRepetition:
    """Drops documents that repeat paragraphs, lines or n-grams (Gopher table A1 thresholds).

    Character fractions are of len(text). Lines are non-blank lines; paragraphs are split on
    blank lines. The n-gram tables are fixed (TOP_NGRAM_MAX_FRAC, DUP_NGRAM_MAX_FRAC).
    """

    name: ClassVar[str] = "gopher_repetition"

    # Gopher table A1: at most 30% of paragraphs / lines may repeat an earlier one...
    max_dup_para_frac: float = 0.3
    max_dup_line_frac: float = 0.3
    # ...and those repeats may hold at most 20% of the characters.
    max_dup_para_char_frac: float = 0.2
    max_dup_line_char_frac: float = 0.2

    def __call__(self, doc: Document) -> Document | Drop:
        return self.check(doc.text) or doc

    def check(self, text: str) -> Drop | None:
        """The first rule `text` breaks, in datatrove's order, or None."""
        if not text:
            return None
        n_chars = len(text)
        for unit, items, max_frac, max_char_frac in (
            ("paragraph", paragraphs(text), self.max_dup_para_frac, self.max_dup_para_char_frac),
            ("line", nonblank_lines(text), self.max_dup_line_frac, self.max_dup_line_char_frac),
        ):
            dup = repeats(items)
            frac = dup.count / max(len(items), 1)
            if frac > max_frac:
                return Drop(f"gopher_dup_{unit}s", f"{frac:.3f} of {unit}s repeated > {max_frac}")
            char_frac = dup.chars / n_chars
            if char_frac > max_char_frac:
                return Drop(f"gopher_dup_{unit}_chars",
                            f"{char_frac:.3f} of chars in repeated {unit}s > {max_char_frac}")

        ngrams = NGrams(tokenize(text).all)
        for n, max_frac in TOP_NGRAM_MAX_FRAC.items():
            frac = ngrams.top_chars(n) / n_chars
            if frac > max_frac:
                return Drop(f"gopher_top_{n}gram",
                            f"{frac:.3f} of chars in the top {n}-gram > {max_frac}")
        for n, max_frac in DUP_NGRAM_MAX_FRAC.items():
            frac = ngrams.duplicate_chars(n) / n_chars
            if frac > max_frac:
                return Drop(f"gopher_dup_{n}gram",
                            f"{frac:.3f} of chars in repeated {n}-grams > {max_frac}")
        return None
