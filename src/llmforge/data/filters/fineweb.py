"""FineWeb's extra quality rules (Penedo et al. 2024, "The FineWeb Datasets", section 3.3;
https://arxiv.org/abs/2406.17557), with datatrove 0.10's defaults and comparisons.

They target what Gopher and C4 let through in modern crawls: lists and navigation (short lines,
many line breaks, little punctuation) and boilerplate lines repeated within a page.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llmforge.data.filters.text_stats import nonblank_lines, repeats, tokenize
from llmforge.data.records import Document, Drop

# datatrove: the characters that end a "punctuated" line.
STOP_CHARS = (".", "'", '"', "!", "?")


@dataclass(frozen=True)
class FineWebQuality:
    """Drops list-like and boilerplate-heavy documents.

    Line ratios are over non-blank lines (datatrove counts blank lines too, which would count
    blank-line paragraph breaks as short, unpunctuated lines). Comparisons follow datatrove:
    a ratio equal to the punctuation, short-line or duplicate threshold drops the document.
    """

    name: ClassVar[str] = "fineweb_quality"

    # FineWeb: drop when at most 12% of lines end in STOP_CHARS.
    line_punct_thr: float = 0.12
    # FineWeb: drop when at least 67% of lines are short...
    short_line_thr: float = 0.67
    # ...where short means at most 30 characters.
    short_line_length: int = 30
    # FineWeb: drop when at least 1% of characters (newlines aside) are in repeated lines.
    char_duplicates_ratio: float = 0.01
    # FineWeb: drop when there are more than 0.3 newlines per token.
    new_line_ratio: float = 0.3

    def __call__(self, doc: Document) -> Document | Drop:
        return self.check(doc.text) or doc

    def check(self, text: str) -> Drop | None:
        """The first rule `text` breaks, in datatrove's order, or None."""
        lines = nonblank_lines(text)
        n_lines = max(len(lines), 1)
        punct = sum(line.rstrip().endswith(STOP_CHARS) for line in lines) / n_lines
        if punct <= self.line_punct_thr:
            return Drop("fineweb_few_punct_lines",
                        f"{punct:.3f} of lines end in punctuation <= {self.line_punct_thr}")
        short = sum(len(line) <= self.short_line_length for line in lines) / n_lines
        if short >= self.short_line_thr:
            return Drop("fineweb_short_lines", f"{short:.3f} of lines <= "
                        f"{self.short_line_length} chars >= {self.short_line_thr}")
        newlines = text.count("\n")
        dup = repeats(lines).chars / max(len(text) - newlines, 1)
        if dup >= self.char_duplicates_ratio:
            return Drop("fineweb_dup_line_chars",
                        f"{dup:.3f} of chars in repeated lines >= {self.char_duplicates_ratio}")
        per_token = newlines / max(len(tokenize(text).all), 1)
        if per_token > self.new_line_ratio:
            return Drop("fineweb_many_newlines",
                        f"{per_token:.3f} newlines per token > {self.new_line_ratio}")
        return None
