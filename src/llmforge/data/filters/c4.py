"""C4's line-level cleaning (Raffel et al. 2020, section 2.2; https://arxiv.org/abs/1910.10683),
as tfds' c4_utils and datatrove 0.10 apply it.

Web pages mix prose with menus, buttons, cookie banners and code; C4 keeps only the lines that
read like sentences and drops pages where little prose is left or that are code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import ClassVar

from llmforge.data.records import Document, Drop

# Wikipedia-style markers: [1], [23], [edit], [citation needed] (and any space before them).
_CITATION = re.compile(r"\s*(?:\[\d*]|\[edit]|\[citation needed])")
# C4 keeps lines ending in . ? ! or a closing quote, but not in an ellipsis.
TERMINAL_PUNCT = (".", "?", "!", '"', "'")
ELLIPSIS = "..."
# tfds c4_utils: lines about site policies, never content.
_POLICY = re.compile("terms of use|privacy policy|cookie policy|uses cookies|use of cookies"
                     "|use cookies")
# A sentence boundary inside a line: . ! or ? (possibly closed by a quote or bracket), then
# whitespace, then anything but a lowercase ASCII letter. A rough stand-in for NLTK's punkt,
# which datatrove uses; it also splits after abbreviations such as "Mr. Smith".
_SENTENCE_BREAK = re.compile(r"[.!?]+[\"'”’)\]]*\s+(?=[^a-z\s])")


@dataclass(frozen=True)
class C4Filter:
    """Keeps a page's sentence-like lines; drops the page if it is code, filler or too short.

    Line rules run in tfds' order, and the page-level checks (lorem ipsum, "{") look only at lines
    that passed the punctuation and length rules, as in tfds. Kept lines are stripped, cleared of
    citation markers and joined with single newlines. meta["c4_lines_removed"] counts the
    non-blank lines that went.
    """

    name: ClassVar[str] = "c4"

    # C4: only lines ending in terminal punctuation. FineWeb sets this to False.
    require_terminal_punct: bool = True
    # C4: lines with fewer than 3 words go.
    min_words_per_line: int = 3
    # tfds c4_utils: a line with a word over 1,000 characters goes.
    max_word_length: int = 1000
    # C4: pages with fewer than 5 sentences go.
    min_sentences: int = 5

    def __call__(self, doc: Document) -> Document | Drop:
        kept: list[str] = []
        removed = sentences = 0
        for raw in doc.text.split("\n"):
            line = _CITATION.sub("", raw).strip()
            if not line:
                removed += bool(raw.strip())
                continue
            if not self._line_is_prose(line):
                removed += 1
                continue
            lower = line.lower()
            if "lorem ipsum" in lower:
                return Drop("c4_lorem_ipsum", "page contains 'lorem ipsum'")
            if "javascript" in lower:
                removed += 1
                continue
            if "{" in line:
                return Drop("c4_curly_bracket", "page contains '{' (likely code)")
            if _POLICY.search(lower):
                removed += 1
                continue
            kept.append(line)
            sentences += 1 + len(_SENTENCE_BREAK.findall(line))
        if sentences < self.min_sentences:
            return Drop("c4_too_few_sentences", f"{sentences} sentences < {self.min_sentences} "
                        f"after removing {removed} lines")
        return replace(doc, text="\n".join(kept), meta={**doc.meta, "c4_lines_removed": removed})

    def _line_is_prose(self, line: str) -> bool:
        words = line.split()
        if len(words) < self.min_words_per_line:
            return False
        if self.require_terminal_punct and (
            not line.endswith(TERMINAL_PUNCT) or line.endswith(ELLIPSIS)
        ):
            return False
        return max(map(len, words)) <= self.max_word_length
