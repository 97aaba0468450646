"""Gopher, C4 and FineWeb quality heuristics: each rule at its threshold (kept exactly at it,
dropped one step past it, for that rule's reason), on real text, and with the same verdicts in
every process."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmforge.data.filters.c4 import C4Filter
from llmforge.data.filters.fineweb import FineWebQuality
from llmforge.data.filters.gopher import (
    DUP_NGRAM_MAX_FRAC,
    TOP_NGRAM_MAX_FRAC,
    GopherQuality,
    GopherRepetition,
)
from llmforge.data.filters.text_stats import NGrams, repeats, tokenize
from llmforge.data.records import Document, Drop
from llmforge.schema import build

WIKITEXT = Path("/work/shared/data/wikitext-2-raw/wiki.test.raw")
needs_wikitext = pytest.mark.skipif(not WIKITEXT.exists(), reason="wikitext-2 not available")
CONSONANTS = "bcdfgjklmnpqrsvwxz"  # no stop word is spelled without a vowel


def words(n: int, length: int = 5, skip: int = 0) -> list[str]:
    """n distinct lowercase words of `length` letters, none a stop word."""
    grams = itertools.islice(itertools.product(CONSONANTS, repeat=length), skip, skip + n)
    return ["".join(g) for g in grams]


def filler(n_chars: int, skip: int = 0) -> str:
    """Distinct words (offset by `skip`), exactly n_chars long."""
    text = " ".join(words(n_chars // 6 + 1, skip=skip))[:n_chars]
    return text[:-1] + "z" if text.endswith(" ") else text


def verdict(step, text: str) -> str | None:
    """The drop reason, or None when the document is kept."""
    out = step(Document("d", text, "test"))
    return out.reason if isinstance(out, Drop) else None


def articles() -> dict[str, str]:
    """wikitext-2 test articles by title (split on top-level ` = Title = ` lines)."""
    raw = WIKITEXT.read_text(encoding="utf-8").replace("\r\n", "\n")
    parts = re.split(r"^ = ([^=\n]+) = \n", raw, flags=re.MULTILINE)
    return {title: body.strip("\n") for title, body in zip(parts[1::2], parts[2::2], strict=True)}


# --- shared measures -------------------------------------------------------------------------


def test_tokens_split_words_from_symbols() -> None:
    tokens = tokenize("Don't stop -- e-mail me at 10:30...")
    assert tokens.all == ["Don't", "stop", "--", "e-mail", "me", "at", "10", ":", "30", "..."]
    assert tokens.words == ["Don't", "stop", "e-mail", "me", "at", "10", "30"]


def test_repeats_count_later_copies_only() -> None:
    got = repeats(["ab", "c", "ab", "ab", "c"])
    assert (got.count, got.chars) == (3, 5)


def _scan_reference(tokens: list[str], n: int) -> int:
    """The left-to-right scan NGrams.duplicate_chars must reproduce, written plainly."""
    seen: set[tuple[str, ...]] = set()
    chars = i = 0
    while i <= len(tokens) - n:
        gram = tuple(tokens[i:i + n])
        if gram in seen:
            chars += sum(map(len, gram))
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


def test_duplicate_ngram_chars_match_the_plain_scan() -> None:
    rng = random.Random(0)
    for _ in range(300):
        tokens = [rng.choice("ab") * rng.randint(1, 2) for _ in range(rng.randint(0, 30))]
        ngrams = NGrams(tokens)
        for n in range(1, 7):
            assert ngrams.duplicate_chars(n) == _scan_reference(tokens, n), (tokens, n)


def test_top_ngram_counts_joining_spaces_and_first_of_ties() -> None:
    # "x y" and "y x" both occur twice; the first to occur, "x y", counts: 2 * len("x y").
    assert NGrams(["x", "y", "x", "y"]).top_chars(2) == 6
    assert NGrams(["x", "yy", "yy", "x", "x", "yy"]).top_chars(2) == 2 * len("x yy")
    assert NGrams(["x"]).top_chars(2) == 0


# --- Gopher quality --------------------------------------------------------------------------


def prose(n_words: int) -> list[str]:
    """n distinct words, two of them stop words: passes every Gopher quality rule."""
    return ["the", "of", *words(n_words - 2)]


def lines_of(ws: list[str], per_line: int = 6) -> list[str]:
    return [" ".join(ws[i:i + per_line]) for i in range(0, len(ws), per_line)]


def bulleted(n: int) -> str:
    lines = lines_of(prose(60))
    return "\n".join(f"{'-' if i % 2 else '•'} {line}" if i < n else line
                     for i, line in enumerate(lines))


def ellipsis_ended(n: int) -> str:
    return "\n".join(f"{line} ..." if i < n else line for i, line in enumerate(lines_of(prose(60))))


def numbers(n_numbers: int) -> str:
    return " ".join(["the", "of", *words(38), *(str(1000 + i) for i in range(n_numbers))])


GOPHER_QUALITY_CASES = {
    # rule: (kept exactly at the threshold, dropped just past it, reason)
    "min words": (" ".join(prose(50)), " ".join(prose(49)), "gopher_too_few_words"),
    "max words": (" ".join(prose(100_000)), " ".join(prose(100_001)), "gopher_too_many_words"),
    # (3 + 2 + 47 * 3 + 4) / 50 = 3.0; (3 + 2 + 48 * 3) / 50 = 2.98
    "min mean length": (" ".join(["the", "of", *words(47, 3), "bbbb"]),
                        " ".join(["the", "of", *words(48, 3)]), "gopher_words_too_short"),
    # (3 + 2 + 47 * 10 + 25) / 50 = 10.0; one letter more is 10.02
    "max mean length": (" ".join(["the", "of", *words(47, 10), "b" * 25]),
                        " ".join(["the", "of", *words(47, 10), "b" * 26]),
                        "gopher_words_too_long"),
    # 6 "#" among 60 tokens = 0.1; 7 among 61
    "hashes": (" ".join(prose(54) + ["#"] * 6), " ".join(prose(54) + ["#"] * 7),
               "gopher_too_many_hashes"),
    "ellipses": (" ".join(["...", "…"] * 3 + prose(54)), " ".join(["...", "…"] * 3 + ["..."]
                                                                 + prose(54)),
                 "gopher_too_many_ellipses"),
    # 9 of 10 lines bulleted = 0.9; 10 of 10
    "bullet lines": (bulleted(9), bulleted(10), "gopher_too_many_bullet_lines"),
    # 3 of 10 lines end in "..." = 0.3; 4 of 10
    "ellipsis lines": (ellipsis_ended(3), ellipsis_ended(4), "gopher_too_many_ellipsis_lines"),
    # 40 of 50 tokens have a letter = 0.8; 40 of 51
    "alpha words": (numbers(10), numbers(11), "gopher_too_few_alpha_words"),
    # two distinct stop words, any case; one stop word twice is not enough
    "stop words": (" ".join(["The", "OF", *words(48)]), " ".join(["the", "the", *words(48)]),
                   "gopher_too_few_stop_words"),
}


@pytest.mark.parametrize("rule", GOPHER_QUALITY_CASES)
def test_gopher_quality_rule_at_threshold(rule: str) -> None:
    kept, dropped, reason = GOPHER_QUALITY_CASES[rule]
    assert verdict(GopherQuality(), kept) is None
    assert verdict(GopherQuality(), dropped) == reason


def test_gopher_quality_keeps_the_document_unchanged() -> None:
    doc = Document("d", " ".join(prose(50)), "test", {"k": 1})
    assert GopherQuality()(doc) is doc


def test_drop_detail_states_value_and_threshold() -> None:
    out = GopherQuality()(Document("d", " ".join(prose(49)), "test"))
    assert isinstance(out, Drop) and out.detail == "49 words < 50"


# --- Gopher repetition -----------------------------------------------------------------------


def padded(body: str, total: int) -> str:
    """`body`, then one unique word that brings the text to exactly `total` characters."""
    width = total - len(body) - 1
    assert width >= 1, "body too long for the target length"
    return f"{body} {'z' * width}"


def phrase_text(phrase: list[str], copies: int, total: int) -> str:
    """`copies` of a phrase, each followed by a unique word, padded to `total` characters."""
    fillers = words(copies, length=6)
    return padded(" ".join(f"{' '.join(phrase)} {f}" for f in fillers), total)


def exact_length(chars_per_copy: int, frac: float, first_copies: int) -> tuple[int, int]:
    """(copies, text length) where chars_per_copy * copies / length is exactly `frac`."""
    for copies in itertools.count(first_copies):
        total = round(chars_per_copy * copies / frac)
        if chars_per_copy * copies / total == frac:
            return copies, total
    raise AssertionError("unreachable")


@pytest.mark.parametrize("n", sorted(TOP_NGRAM_MAX_FRAC))
def test_top_ngram_at_threshold(n: int) -> None:
    phrase = words(n, length=2)
    # Each copy of the top n-gram covers its n two-letter words and n - 1 spaces.
    copies, total = exact_length(3 * n - 1, TOP_NGRAM_MAX_FRAC[n], first_copies=4)
    assert verdict(GopherRepetition(), phrase_text(phrase, copies, total)) is None
    assert verdict(GopherRepetition(), phrase_text(phrase, copies, total - 1)) == \
        f"gopher_top_{n}gram"


@pytest.mark.parametrize("n", sorted(DUP_NGRAM_MAX_FRAC))
def test_duplicate_ngrams_at_threshold(n: int) -> None:
    phrase = words(n)
    # Every copy after the first repeats n five-letter words (spaces not counted).
    repeats_, total = exact_length(5 * n, DUP_NGRAM_MAX_FRAC[n], first_copies=9)
    copies = repeats_ + 1
    assert verdict(GopherRepetition(), phrase_text(phrase, copies, total)) is None
    assert verdict(GopherRepetition(), phrase_text(phrase, copies, total - 1)) == \
        f"gopher_dup_{n}gram"


UNITS = [("\n", "line"), ("\n\n", "paragraph")]


@pytest.mark.parametrize(("sep", "unit"), UNITS)
def test_duplicate_unit_fraction_at_threshold(sep: str, unit: str) -> None:
    def text(unique: int, copies: int) -> str:
        units = [filler(47, skip=10 * i) for i in range(unique)] + ["Thanks"] * copies
        return sep.join(units)

    assert verdict(GopherRepetition(), text(6, 4)) is None  # 3 of 10 repeat = 0.3
    assert verdict(GopherRepetition(), text(5, 5)) == f"gopher_dup_{unit}s"  # 4 of 10


@pytest.mark.parametrize(("sep", "unit"), UNITS)
def test_duplicate_unit_chars_at_threshold(sep: str, unit: str) -> None:
    repeated = "x" * 100  # one token, so no repeated n-grams

    def text(total: int) -> str:
        first = filler(47)
        last = filler(total - len(first) - 2 * len(repeated) - 3 * len(sep), skip=100)
        return sep.join([first, repeated, last, repeated])  # 1 of 4 units repeats

    assert verdict(GopherRepetition(), text(500)) is None  # 100 of 500 chars = 0.2
    assert verdict(GopherRepetition(), text(499)) == f"gopher_dup_{unit}_chars"


def test_gopher_repetition_ignores_blank_lines_and_empty_text() -> None:
    text = "\n\n".join(filler(60, skip=20 * i) for i in range(5))
    assert verdict(GopherRepetition(), text) is None
    assert verdict(GopherRepetition(), "") is None


# --- C4 --------------------------------------------------------------------------------------

FIVE_SENTENCES = [
    "The river rises in the northern hills.",
    "It flows south for two hundred miles.",
    "Towns along its banks grew rich on trade.",
    "Its delta is a protected wetland.",
    "Birds nest there every spring.",
]


def test_c4_removes_non_prose_lines() -> None:
    text = "\n".join([
        "Home | About | Contact",
        "The river rises in the northern hills.[1]",
        "It flows south for two hundred miles [citation needed].",
        "Enable JavaScript to view this page.",
        "This site uses cookies to improve your experience.",
        "Read more and more...",
        "Two words.",
        "",
        "  Towns along its banks grew rich on trade. Ferries crossed it daily.  ",
        "A very long token " + "x" * 1001 + " ends here.",
        "Its delta is a protected wetland. [edit]",
        "Birds nest there every spring! Who could object?",
    ])
    out = C4Filter()(Document("d", text, "test", {"lang": "en"}))
    assert isinstance(out, Document)
    assert out.text == "\n".join([
        "The river rises in the northern hills.",
        "It flows south for two hundred miles.",
        "Towns along its banks grew rich on trade. Ferries crossed it daily.",
        "Its delta is a protected wetland.",
        "Birds nest there every spring! Who could object?",
    ])
    assert out.meta == {"lang": "en", "c4_lines_removed": 6}


def test_c4_line_thresholds() -> None:
    def removed(line: str) -> int:
        out = C4Filter()(Document("d", "\n".join([*FIVE_SENTENCES, line]), "test"))
        assert isinstance(out, Document)
        return out.meta["c4_lines_removed"]

    assert removed("Three words here.") == 0
    assert removed("Two words.") == 1
    assert removed(f"A word of {'x' * 1000} letters.") == 0
    assert removed(f"A word of {'x' * 1001} letters.") == 1
    assert removed('He said "so it goes."') == 0  # a closing quote ends a sentence too


def test_c4_sentences_at_threshold() -> None:
    assert verdict(C4Filter(), "\n".join(FIVE_SENTENCES)) is None
    assert verdict(C4Filter(), "\n".join(FIVE_SENTENCES[:4])) == "c4_too_few_sentences"
    # Sentences are counted within lines too: a boundary is ". ", "! " or "? " before a
    # character that is not a lowercase letter.
    assert verdict(C4Filter(), " ".join(FIVE_SENTENCES)) is None
    assert verdict(C4Filter(), "Call me at 5 p.m. on the day. Or not. Fine. Well then.") == \
        "c4_too_few_sentences"


def test_c4_drops_pages_with_placeholder_text_or_code() -> None:
    lorem = [*FIVE_SENTENCES, "Lorem ipsum dolor sit amet."]
    code = [*FIVE_SENTENCES, "Use the form {name} in templates."]
    assert verdict(C4Filter(), "\n".join(lorem)) == "c4_lorem_ipsum"
    assert verdict(C4Filter(), "\n".join(code)) == "c4_curly_bracket"


def test_c4_page_checks_see_only_lines_that_passed_the_line_rules() -> None:
    # As in tfds: a "{" on a line already removed for lacking punctuation does not drop the page.
    text = "\n".join([*FIVE_SENTENCES, "function render(page) {"])
    assert verdict(C4Filter(), text) is None
    assert verdict(C4Filter(require_terminal_punct=False), text) == "c4_curly_bracket"


def test_c4_without_terminal_punctuation_keeps_unpunctuated_lines() -> None:
    text = "\n".join([*FIVE_SENTENCES, "Photos of the river in winter"])
    out = C4Filter(require_terminal_punct=False)(Document("d", text, "test"))
    assert isinstance(out, Document)
    assert out.text == text and out.meta["c4_lines_removed"] == 0


# --- FineWeb ---------------------------------------------------------------------------------


def test_fineweb_punctuated_lines_at_threshold() -> None:
    def text(punctuated: int) -> str:
        lines = [filler(41, skip=10 * i) for i in range(25)]
        return "\n".join(line + "." if i < punctuated else line for i, line in enumerate(lines))

    assert verdict(FineWebQuality(), text(4)) is None  # 4 of 25 = 0.16
    assert verdict(FineWebQuality(), text(3)) == "fineweb_few_punct_lines"  # 0.12 drops


def test_fineweb_short_lines_at_threshold() -> None:
    def text(short: int) -> str:
        shorts = [" ".join(words(5, skip=5 * i)) + "." for i in range(short)]  # 30 chars
        longs = [" ".join(words(4, skip=1000 + 4 * i) + words(1, 6, skip=i)) + "."
                 for i in range(100 - short)]  # 31 chars
        assert {len(shorts[0]), len(longs[0])} == {30, 31}
        return "\n".join(shorts + longs)

    assert verdict(FineWebQuality(), text(66)) is None
    assert verdict(FineWebQuality(), text(67)) == "fineweb_short_lines"  # 0.67 drops


def test_fineweb_duplicate_line_chars_at_threshold() -> None:
    def text(body_chars: int) -> str:
        body = [filler(47, skip=10 * i) + "." for i in range(19)]
        body.append(filler(body_chars - 19 * 48 - 1, skip=500) + ".")
        return "\n".join(["Read more.", *body, "Read more."])

    assert verdict(FineWebQuality(), text(981)) is None  # 10 of 1001 chars
    assert verdict(FineWebQuality(), text(980)) == "fineweb_dup_line_chars"  # 10 of 1000


def test_fineweb_newlines_per_token_at_threshold() -> None:
    w = words(8, length=15)

    def text(last_words: int) -> str:
        return "\n".join([f"{w[0]} {w[1]}.", f"{w[2]} {w[3]}.", f"{w[4]} {w[5]}",
                          " ".join(w[6:6 + last_words])])

    assert verdict(FineWebQuality(), text(2)) is None  # 3 newlines / 10 tokens = 0.3
    assert verdict(FineWebQuality(), text(1)) == "fineweb_many_newlines"  # 3 / 9


# --- real text, configuration, determinism ---------------------------------------------------

ALL_STEPS = [GopherQuality(), GopherRepetition(), C4Filter(), FineWebQuality()]


@needs_wikitext
def test_wikitext_article_passes_every_filter() -> None:
    article = articles()["Dick Rifenburg"]
    for step in ALL_STEPS:
        assert isinstance(step(Document("d", article, "wikitext")), Document), step.name


@needs_wikitext
def test_repeated_lines_of_real_text_fail_repetition() -> None:
    lines = [line for line in articles()["Dick Rifenburg"].split("\n")
             if len(line) > 200][:5]
    text = "\n".join(line for line in lines for _ in range(3))
    assert verdict(GopherRepetition(), text) == "gopher_dup_lines"
    assert verdict(FineWebQuality(), text) == "fineweb_dup_line_chars"


def test_steps_build_from_yaml_parameters() -> None:
    names = {step.name for step in ALL_STEPS}
    assert names == {"gopher_quality", "gopher_repetition", "c4", "fineweb_quality"}
    step = build(C4Filter, {"require_terminal_punct": False, "min_sentences": 3}, "c4")
    assert step == C4Filter(require_terminal_punct=False, min_sentences=3)
    quality = build(GopherQuality, {"stop_words": ["le", "la"], "min_doc_words": 10}, "g")
    assert verdict(quality, " ".join(["le", "la", *words(8)])) is None


VERDICT_SCRIPT = """
import json, sys
sys.path.insert(0, "tests")
from test_filters_quality import verdicts
print(json.dumps(verdicts()))
"""


def verdicts(steps: list = ALL_STEPS) -> list[list[str]]:
    """Every step's output on varied texts, as strings, for comparing across processes."""
    texts = [" ".join(prose(60)), GOPHER_QUALITY_CASES["bullet lines"][1],
             "\n".join(FIVE_SENTENCES * 2), phrase_text(words(5), 12, 2000)]
    if WIKITEXT.exists():
        texts += list(articles().values())[:8]
    docs = [Document(str(i), t, "test") for i, t in enumerate(texts)]
    return [[repr(step(doc)) for doc in docs] for step in steps]


def test_verdicts_are_deterministic_across_processes() -> None:
    here = verdicts()
    assert verdicts() == here
    assert verdicts([pickle.loads(pickle.dumps(step)) for step in ALL_STEPS]) == here
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", VERDICT_SCRIPT], cwd=root, env=env,
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == here
