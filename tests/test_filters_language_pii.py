"""Content steps: language identification, PII redaction, toxicity, and cleaning."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from llmforge.data.clean import Clean
from llmforge.data.filters.language import LanguageFilter
from llmforge.data.filters.pii import PIIRedactor, redact
from llmforge.data.filters.toxicity import ToxicityFilter, WordListScorer, load_wordlist
from llmforge.data.records import Document, Drop

ENGLISH = ("The committee met on Tuesday to discuss the new budget for the public library, and "
           "most members agreed that the reading rooms should stay open later in the evening.")
FRENCH = ("Le comité s'est réuni mardi pour discuter du nouveau budget de la bibliothèque "
          "municipale, et la plupart des membres ont convenu que les salles devaient rester "
          "ouvertes plus tard le soir.")
GERMAN = ("Der Ausschuss traf sich am Dienstag, um über den neuen Haushalt der Stadtbibliothek "
          "zu beraten, und die meisten Mitglieder waren sich einig, dass die Lesesäle abends "
          "länger geöffnet bleiben sollten.")


def doc(text: str, **meta: object) -> Document:
    return Document(id="d1", text=text, source="test", meta=dict(meta))


# --- language ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, lang", [(ENGLISH, "en"), (FRENCH, "fr"), (GERMAN, "de")])
def test_language_detected_with_score(text: str, lang: str) -> None:
    out = LanguageFilter(languages=[])(doc(text, kept="yes"))
    assert isinstance(out, Document)
    assert out.meta["language"] == lang
    assert 0.9 < out.meta["language_score"] <= 1.0
    assert out.meta["kept"] == "yes"  # earlier annotations survive


def test_language_keeps_listed_and_drops_others() -> None:
    step = LanguageFilter()  # English only, by default
    assert isinstance(step(doc(ENGLISH)), Document)
    dropped = step(doc(FRENCH))
    assert isinstance(dropped, Drop) and dropped.reason == "language_not_kept"
    assert dropped.detail.startswith("fr ")
    assert isinstance(LanguageFilter(languages=["en", "fr"])(doc(FRENCH)), Document)


def test_language_empty_list_keeps_everything() -> None:
    step = LanguageFilter(languages=[], min_score=0.99)
    for text in (FRENCH, GERMAN, "?!", ""):
        out = step(doc(text))
        assert isinstance(out, Document) and "language" in out.meta


def test_language_min_score() -> None:
    mixed = "Hello there. Bonjour à tous. Guten Tag."
    seen = LanguageFilter(languages=[])(doc(mixed)).meta
    lang, score = seen["language"], seen["language_score"]
    assert score < 0.9  # a mixture is not confidently one language
    low = LanguageFilter(languages=[lang], min_score=min(score + 0.01, 1.0))(doc(mixed))
    assert isinstance(low, Drop) and low.reason == "language_low_score"
    kept = LanguageFilter(languages=[lang], min_score=score - 0.01)(doc(mixed))
    assert isinstance(kept, Document)


def test_language_reads_only_the_start() -> None:
    out = LanguageFilter()(doc(ENGLISH * 20 + "\n" + FRENCH * 200))
    assert isinstance(out, Document) and out.meta["language"] == "en"


# --- PII --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected, kind", [
    ("Write to jane.doe+news@mail.example.co.uk today.", "Write to <EMAIL> today.", "email"),
    ("Call +44 20 7946 0958.", "Call <PHONE>.", "phone"),
    ("Call +1 (202) 555-0143 now", "Call <PHONE> now", "phone"),
    ("Call +14155552671", "Call <PHONE>", "phone"),
    ("Office: (202) 555-0143", "Office: <PHONE>", "phone"),
    ("Office: 202-555-0143", "Office: <PHONE>", "phone"),
    ("Free: 1-800-555-0199", "Free: <PHONE>", "phone"),
    ("London 020 7946 0958", "London <PHONE>", "phone"),
    ("Paris 01 23 45 67 89", "Paris <PHONE>", "phone"),
    ("Berlin 030/1234567", "Berlin <PHONE>", "phone"),
    ("server at 8.8.8.8, see", "server at <IP_ADDRESS>, see", "ip_address"),
    ("host 2a00:1450:4001:82b::200e up", "host <IP_ADDRESS> up", "ip_address"),
    ("card 4111 1111 1111 1111.", "card <CARD>.", "card"),
    ("card 5500-0000-0000-0004", "card <CARD>", "card"),
    ("card 378282246310005 ok", "card <CARD> ok", "card"),
    ("card 3782 822463 10005 ok", "card <CARD> ok", "card"),
])
def test_pii_each_kind_redacted(text: str, expected: str, kind: str) -> None:
    assert redact(text) == (expected, {kind: 1})


@pytest.mark.parametrize("text", [
    "Founded in 1999, it grew between 2003 and 2019 to 1,234,567 members.",
    "Requires Python 3.11.7 or 2.7.18; OID 1.3.6.1.4.1.311.",
    "Released 2023-05-12, 12.05.2023, 01/02/2023 and 05.12.2023 14:30, at 12:30:45.",
    "Costs $1,299.99, EUR 19.99 or 0.5 0.25 0.125 of a share.",
    "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "commit 9fceb02d0ae598e95dc970b74767f19372d61af8, id 31415926535897932384626",
    "ISBN 978-3-16-148410-0, page 123-456-7890, order 1234567890123456789012.",
    "Use std::vector and a::b; the time is 12:30.",
    "Private 192.168.1.1, 10.0.0.1, 127.0.0.1, ::1, fe80::1, 2001:db8::1, 224.0.0.1.",
    "Not a card: 4111 1111 1111 1112 (bad checksum) or 1234 5678 9012 3452 (no issuer).",
    "Not a card: 4111 1111 1111 1111 1111 (too long), 4-1-1-1-1-1-1-1-1-1-1-1-1-1-1-1.",
    "Stamp 20170809091249, ISSN 0378-8733, arXiv 0906.0612, value +3523645.6.",
])
def test_pii_leaves_non_personal_numbers(text: str) -> None:
    assert redact(text) == (text, {})


def test_pii_step_counts_and_options() -> None:
    text = "a@b.org, c@d.org, 8.8.4.4 and +33 1 23 45 67 89"
    out = PIIRedactor()(doc(text))
    assert out.text == "<EMAIL>, <EMAIL>, <IP_ADDRESS> and <PHONE>"
    assert out.meta["pii"] == {"email": 2, "ip_address": 1, "phone": 1}
    partial = PIIRedactor(emails=False, ips=False)(doc(text))
    assert partial.text == "a@b.org, c@d.org, 8.8.4.4 and <PHONE>"
    assert redact(text, emails=False, ips=False, phones=False, cards=False) == (text, {})


def test_pii_step_without_findings_returns_the_document() -> None:
    original = doc(ENGLISH)
    assert PIIRedactor()(original) is original


# --- toxicity ---------------------------------------------------------------------------------


def test_toxicity_clean_text_kept_with_score() -> None:
    out = ToxicityFilter()(doc(ENGLISH))
    assert isinstance(out, Document) and out.meta["toxicity"] == 0.0


def test_toxicity_dense_text_dropped_and_incidental_kept() -> None:
    rant = "You are a fucking idiot and this is bullshit."
    dropped = ToxicityFilter()(doc(rant))
    assert isinstance(dropped, Drop) and dropped.reason == "toxic"
    long_with_one = ENGLISH * 5 + " What a shit day."  # 1 word in ~150
    kept = ToxicityFilter()(doc(long_with_one))
    assert isinstance(kept, Document) and 0 < kept.meta["toxicity"] < 0.01
    assert isinstance(ToxicityFilter(threshold=0.0)(doc(long_with_one)), Drop)


def test_toxicity_whole_words_case_insensitive_and_phrases() -> None:
    scorer = WordListScorer.from_terms(["darn", "go away now", "go away"])
    assert scorer("Darn DARN") == 1.0
    assert scorer("darned undarn") == 0.0  # whole words only
    assert scorer("please go away now") == 0.75  # longest phrase counts all its words
    assert scorer("go away") == 1.0
    assert scorer("go home") == 0.0
    assert scorer("") == 0.0


def test_toxicity_custom_wordlist(tmp_path: Path) -> None:
    path = tmp_path / "words.txt"
    path.write_text("# my list\n\nBroccoli\nbrussels sprouts\n", encoding="utf-8")
    step = ToxicityFilter(wordlist=str(path), threshold=0.2)
    assert isinstance(step(doc("I ate broccoli and brussels sprouts.")), Drop)
    assert isinstance(step(doc("You are a fucking idiot.")), Document)  # not in this list


def test_toxicity_builtin_list_is_packaged() -> None:
    scorer = load_wordlist()
    assert 100 <= len(scorer.singles) + sum(map(len, scorer.phrases.values())) <= 200
    assert scorer("go fuck yourself") == 1.0


# --- clean ------------------------------------------------------------------------------------


def test_clean_repairs_mojibake_and_normalises() -> None:
    out = Clean()(doc("Le cafÃ© est naÃ¯ve.  \r\nSecond line.\r\n"))
    assert out.text == "Le café est naïve.\nSecond line."


def test_clean_keeps_typography_and_entities() -> None:
    text = "He said “fine” — the ﬁle uses &amp; in ＡＢＣ."
    assert Clean()(doc(text)).text == text


def test_clean_removes_boilerplate_lines_only() -> None:
    prose = ("Our privacy policy explains how the museum stores the names of visitors who "
             "buy tickets online, and why it deletes them after a year.")
    page = "\n".join([
        "Skip to content", "Log in | Register", "Title of the article", "", prose,
        "How to sign in to the archive", "Click here to subscribe!", "Share this article",
        "We use cookies to improve your experience.", "Back to top",
        "© 2024 Example Ltd. All rights reserved.",
    ])
    out = Clean()(doc(page))
    assert out.text == "\n".join(["Title of the article", "", prose,
                                  "How to sign in to the archive"])
    assert out.meta["boilerplate_lines_removed"] == 7
    assert "boilerplate_lines_removed" not in Clean()(doc(prose)).meta
    assert Clean(drop_boilerplate_lines=False)(doc(page)).text == page


def test_clean_options_off_leave_text_alone() -> None:
    text = "cafÃ©  \r\n"
    assert Clean(fix_unicode=False, normalise=False)(doc(text)).text == text


def test_clean_empty_result_dropped() -> None:
    for text in ("Skip to content\nBack to top\n", " \n\n"):
        out = Clean()(doc(text))
        assert isinstance(out, Drop) and out.reason == "empty_after_cleaning"


# --- all steps --------------------------------------------------------------------------------

STEPS = [LanguageFilter(), PIIRedactor(), ToxicityFilter(), Clean()]


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.name)
def test_steps_are_picklable_and_deterministic(step: object) -> None:
    clone = pickle.loads(pickle.dumps(step))
    assert clone == step
    sample = doc("Skip to content\nMail me at a@b.org about the cafÃ©. " + ENGLISH)
    assert step(sample) == clone(sample) == step(sample)


def test_step_names() -> None:
    assert [s.name for s in STEPS] == ["language", "pii", "toxicity", "clean"]
