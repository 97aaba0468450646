"""Drift: the statistics on known cases, and reports on synthetic request logs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from scipy import stats

from llmforge.monitor.drift import (
    chi_square_test,
    drift_report,
    is_refusal,
    jensen_shannon,
    ks_test,
    prompt_language,
    psi,
    split_windows,
    wasserstein_normalised,
)

T0 = datetime(2026, 3, 1, tzinfo=UTC)

ENGLISH = [
    "Can you explain how photosynthesis works in simple terms?",
    "Write a short poem about the sea at night.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the main causes of the French Revolution.",
    "How do I make a good cup of coffee at home?",
    "Give me three ideas for a birthday party for my daughter.",
    "Why is the sky blue during the day and red at sunset?",
    "Translate the following sentence into plain language for a child.",
    "What are the health benefits of walking every day?",
    "Help me write an email asking my manager for a day off.",
    "Explain recursion with an example that a beginner can follow.",
    "Which planets in our solar system have rings around them?",
]
FOREIGN = [
    "Pouvez-vous m'expliquer comment fonctionne la photosynthèse, s'il vous plaît ?",
    "Écris un court poème sur la mer pendant la nuit et les étoiles.",
    "Quelles sont les principales causes de la Révolution française ?",
    "Comment puis-je préparer un bon café à la maison sans machine ?",
    "Kannst du mir erklären, wie die Photosynthese in einfachen Worten funktioniert?",
    "Schreibe ein kurzes Gedicht über das Meer in der Nacht.",
    "Was ist der Unterschied zwischen einer Liste und einem Tupel in Python?",
    "Wie mache ich zu Hause einen guten Kaffee ohne Maschine?",
]
ANSWER = "Sure. Here is a clear answer with the details you asked for."
REFUSAL = "I'm sorry, but I can't help with that request."


def request_log(seed: int, start: datetime, days: float, n: int,
                shift_at: datetime | None = None) -> list[dict]:
    """n request rows spread over `days`; from `shift_at` on, prompts get longer and half are
    French or German, refusals rise from 3% to 25% and 'length' stops from 10% to 40%."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        created_at = start + timedelta(days=days * (i + rng.random()) / n)
        shifted = shift_at is not None and created_at >= shift_at
        pool = FOREIGN if shifted and rng.random() < 0.5 else ENGLISH
        sentences = 4 + rng.poisson(3) if shifted else 1 + rng.poisson(1)
        prompt = " ".join(rng.choice(pool, sentences))
        output = REFUSAL if rng.random() < (0.25 if shifted else 0.03) else ANSWER
        rows.append({
            "created_at": created_at,
            "prompt": prompt,
            "output": output,
            "prompt_tokens": len(prompt.split()),
            "completion_tokens": int(rng.lognormal(4.0, 0.5)),
            "finish_reason": "length" if rng.random() < (0.4 if shifted else 0.1) else "stop",
            "prompt_nll": float(rng.normal(2.0, 0.3)),
        })
    return rows


def test_psi_known_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=2000)
    assert psi(x, x) == pytest.approx(0.0, abs=1e-12)
    assert psi(x, rng.normal(size=2000)) < 0.05
    assert psi(x, x + 1.0) > 0.5  # a one-sigma shift is far past the usual 0.25 alarm
    assert np.isfinite(psi(x, x + 100.0))  # empty bins get an epsilon, not log(0)


def test_ks_known_cases():
    rng = np.random.default_rng(1)
    x = rng.normal(size=500)
    assert ks_test(x, x) == pytest.approx((0.0, 1.0))
    assert ks_test(x, rng.normal(size=500))[1] > 0.05
    statistic, p_value = ks_test(x, x + 1.0)
    assert statistic > 0.3 and p_value < 1e-10


def test_wasserstein_normalised_is_in_reference_std_units():
    rng = np.random.default_rng(2)
    x = rng.normal(10.0, 3.0, size=1000)
    assert wasserstein_normalised(x, x) == pytest.approx(0.0)
    assert wasserstein_normalised(x, x + np.std(x)) == pytest.approx(1.0)
    assert wasserstein_normalised([5.0] * 10, [5.0] * 10) == 0.0  # zero std does not divide by 0


def test_chi_square_by_hand_and_against_scipy():
    # 2 x 2 table [[10, 20], [20, 10]]: every expected count is 15, so 4 * 5**2 / 15 = 6.667.
    statistic, p_value = chi_square_test({"a": 10, "b": 20}, {"a": 20, "b": 10})
    assert statistic == pytest.approx(20 / 3)
    assert p_value == pytest.approx(stats.chi2.sf(20 / 3, df=1))
    # a category seen only in the current window counts, over the union of categories
    ref, cur = {"en": 50, "fr": 5}, {"en": 30, "fr": 5, "de": 20}
    expected = stats.chi2_contingency([[50, 5, 0], [30, 5, 20]], correction=False)
    assert chi_square_test(ref, cur) == pytest.approx((expected.statistic, expected.pvalue))
    assert chi_square_test({"stop": 9}, {"stop": 4}) == (0.0, 1.0)


def test_jensen_shannon_known_cases():
    assert jensen_shannon({"a": 3, "b": 1}, {"a": 30, "b": 10}) == pytest.approx(0.0, abs=1e-7)
    assert jensen_shannon({"a": 5}, {"b": 7}) == pytest.approx(1.0)
    # half the mass moved to a new category: JSD = 1 - 0.75 * log2(1 / 0.75) - ... by hand
    p, q = np.array([1.0, 0.0]), np.array([0.5, 0.5])
    m = (p + q) / 2
    kl = lambda a, b: sum(x * np.log2(x / y) for x, y in zip(a, b, strict=True) if x > 0)  # noqa: E731
    assert jensen_shannon({"a": 2}, {"a": 1, "b": 1}) == pytest.approx(
        np.sqrt((kl(p, m) + kl(q, m)) / 2))


def test_refusal_and_language_features():
    assert is_refusal("I’m sorry, but I cannot do that.")  # curly apostrophe
    assert is_refusal("as an ai language model, I don't have opinions.")
    assert not is_refusal("Sure! Here is the recipe you asked for.")
    assert not is_refusal("Here is a long answer. " * 20 + "I cannot stress this enough.")
    assert prompt_language(FOREIGN[0]) == "fr"
    assert prompt_language(FOREIGN[4]) == "de"
    assert prompt_language(" ".join(ENGLISH[:2])) == "en"
    assert prompt_language("  ") == "und"


def test_split_windows_cuts_by_created_at():
    rows = [{"created_at": T0 + timedelta(days=d)} for d in (9, 0, 1, 3, 5, 6, 10)]
    reference, current = split_windows(rows, reference_days=5, current_days=4)
    assert [r["created_at"] for r in reference] == [T0 + timedelta(days=d) for d in (1, 3, 5)]
    assert [r["created_at"] for r in current] == [T0 + timedelta(days=d) for d in (6, 9, 10)]
    reference, current = split_windows(rows, 1, 1, now=T0 + timedelta(days=2))
    assert reference == [rows[1]] and current == [rows[2]]
    assert split_windows([], 7, 7) == ([], [])


def test_no_shift_is_not_flagged():
    reference = request_log(seed=10, start=T0, days=7, n=600)
    current = request_log(seed=11, start=T0 + timedelta(days=7), days=7, n=600)
    report = drift_report(reference, current)
    assert report.drifted == [] and report.since is None
    assert all(c.statistic is not None for c in report.columns), report.summary()
    by_name = {c.name: c for c in report.columns}
    assert by_name["prompt_tokens"].test == "ks" and by_name["language"].test == "chi_square"
    assert by_name["language"].current_value["en"] == 1.0


def test_no_shift_on_large_windows_uses_distances():
    reference = request_log(seed=20, start=T0, days=7, n=1200)
    current = request_log(seed=21, start=T0 + timedelta(days=7), days=7, n=1200)
    report = drift_report(reference, current)
    assert report.drifted == [], report.summary()
    tests = {c.name: c.test for c in report.columns}
    assert tests["completion_tokens"] == "wasserstein" and tests["refusal"] == "jensen_shannon"
    assert tests["token_distribution"] == "jensen_shannon"


def test_planted_shift_is_detected_on_exactly_those_columns():
    current_start, shift_at = T0 + timedelta(days=7), T0 + timedelta(days=10, hours=12)
    reference = request_log(seed=30, start=T0, days=7, n=600)
    current = request_log(seed=31, start=current_start, days=7, n=600, shift_at=shift_at)
    report = drift_report(reference, current)
    assert set(report.drifted) == {"prompt_tokens", "language", "token_distribution",
                                   "refusal", "finish_reason"}, report.summary()
    chunk = timedelta(days=7 / 5)
    assert report.since is not None and abs(report.since - shift_at) <= chunk
    by_name = {c.name: c for c in report.columns}
    assert by_name["prompt_tokens"].current_value > 2 * by_name["prompt_tokens"].reference_value
    assert by_name["refusal"].current_value["refused"] > 0.08
    assert by_name["language"].current_value["fr"] > 0.1
    assert "prompt_tokens: drifted (KS p=" in report.summary()
    assert "completion_tokens: ok (KS p=" in report.summary()


def test_too_few_rows_are_not_testable():
    reference = request_log(seed=40, start=T0, days=7, n=200)
    current = request_log(seed=41, start=T0 + timedelta(days=7), days=1, n=10)
    report = drift_report(reference, current)
    assert report.drifted == [] and report.since is None
    assert all(c.statistic is None and not c.drifted for c in report.columns)
    assert "10 current rows" in report.columns[0].detail
    # perplexity needs prompt_nll; the other columns are still tested
    bare = [{k: v for k, v in r.items() if k != "prompt_nll"} for r in reference]
    report = drift_report(bare[:100], bare[100:])
    untested = [c.name for c in report.columns if c.statistic is None]
    assert untested == ["prompt_perplexity"]
    assert "prompt_perplexity: not testable (0 reference and 0 current rows with prompt_nll" in (
        report.summary())
    empty = drift_report([], [])
    assert empty.current_window.rows == 0 and empty.drifted == []


def test_token_ids_are_counted_when_every_row_has_them():
    reference = request_log(seed=50, start=T0, days=7, n=100)
    current = request_log(seed=51, start=T0 + timedelta(days=7), days=7, n=100)
    for row in reference:
        row["prompt_token_ids"] = [1, 2, 3]
    for row in current:
        row["prompt_token_ids"] = [7, 8, 9]
    column = drift_report(reference, current).columns[-1]
    assert column.name == "token_distribution"
    assert column.statistic == pytest.approx(1.0) and column.drifted
    current[0].pop("prompt_token_ids")  # one row without ids: whitespace words for all
    column = drift_report(reference, current).columns[-1]
    assert not column.drifted and "1" not in column.reference_value


def test_to_dict_is_json_serialisable():
    reference = request_log(seed=60, start=T0, days=7, n=200)
    current = request_log(seed=61, start=T0 + timedelta(days=7), days=7, n=200,
                          shift_at=T0 + timedelta(days=8))
    report = drift_report(reference, current)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["since"] == report.since.isoformat()
    assert data["current_window"] == {"start": current[0]["created_at"].isoformat(),
                                      "end": current[-1]["created_at"].isoformat(),
                                      "rows": 200}
    assert [c["name"] for c in data["columns"]] == [
        "prompt_tokens", "completion_tokens", "prompt_perplexity", "language", "refusal",
        "finish_reason", "token_distribution"]
