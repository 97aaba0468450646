"""Drift: has what the served model is asked, and what it answers, moved away from a reference?

A recent (current) window of request rows is compared with an earlier (reference) window on
seven columns: prompt and output length in tokens, prompt language, the prompt token
distribution, the model's perplexity on prompts (when the caller logged `prompt_nll`), refusals
and stop reasons. Each column gets one statistical test and one threshold, chosen as Evidently
does by default, so the numbers read the way practitioners expect:

- numeric: two-sample Kolmogorov-Smirnov, drifted at p < 0.05, for up to 1,000 rows; above that
  p-values flag differences too small to matter, so the Wasserstein distance divided by the
  reference standard deviation is used instead, drifted above 0.1. PSI is reported alongside.
- categorical: chi-square test of homogeneity, drifted at p < 0.05, for up to 1,000 rows;
  Jensen-Shannon distance (base 2), drifted above 0.1, for more.
- token distribution: Jensen-Shannon distance, drifted above 0.1. Tokens within a prompt are not
  independent draws, so a chi-square test over token counts would flag noise at any size.

Evidently chooses the test by the reference size alone; here the smaller window decides, because
both the over-sensitivity of p-values and the sampling noise of distances are set by the smaller
sample, and `since` tests small chunks of the current window against the whole reference.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from scipy import stats
from scipy.spatial.distance import jensenshannon

from llmforge.data.filters.language import LanguageFilter, identify

LARGE_SAMPLE = 1000  # above this many rows (in the smaller window), distances replace p-values
MIN_ROWS = 30  # fewer rows than this in either window: the column is reported as not testable
CHUNKS = 5  # `since` splits the current window into this many time-ordered chunks
DEFAULT_THRESHOLDS = {"ks": 0.05, "chi_square": 0.05, "wasserstein": 0.1, "jensen_shannon": 0.1}
P_VALUE_TESTS = frozenset({"ks", "chi_square"})  # drifted below the threshold; others above it
TEST_LABELS = {"ks": "KS", "chi_square": "chi-square", "wasserstein": "Wasserstein",
               "jensen_shannon": "JS"}

# The token distribution keeps the reference's most frequent tokens and lumps the rest into one
# bucket: the JS distance between two samples of the same text has a noise floor that grows with
# the number of buckets (about sqrt(k / 8N) for k buckets and N tokens), and new vocabulary, a
# new language above all, still shows as mass moving into the lumped bucket.
TOP_TOKENS = 20
OTHER = "<other>"
PSI_EPSILON = 1e-4  # share given to an empty PSI bin, so its log stays finite
MIN_EXPECTED = 5  # chi-square pools categories expected fewer times than this into OTHER

# Leading phrases of a refusal, matched case-insensitively in the first REFUSAL_CHARS characters
# of the output (curly apostrophes read as straight). A heuristic: it undercounts refusals
# phrased otherwise and may catch "I can't stress enough...", but its rate still moves when the
# model's refusal behaviour does.
REFUSAL_PHRASES = (
    "I can't", "I cannot", "I can not", "I won't", "I will not", "I'm sorry, but",
    "I am sorry, but", "I apologize, but", "As an AI", "I'm not able to", "I am not able to",
    "I'm unable to", "I am unable to",
)
REFUSAL_CHARS = 200
_REFUSAL = re.compile("|".join(re.escape(p) for p in REFUSAL_PHRASES), re.IGNORECASE)
UNDETERMINED = "und"  # ISO 639 code for a language not identified with confidence

NUMERIC = ("prompt_tokens", "completion_tokens", "prompt_perplexity")
CATEGORICAL = ("language", "refusal", "finish_reason")
DISTRIBUTION = ("token_distribution",)


# --- statistics ------------------------------------------------------------------------------

def psi(reference: Sequence[float], current: Sequence[float], bins: int = 10) -> float:
    """Population stability index over `bins` quantile bins of the reference (0: identical).

    Repeated quantiles (discrete values) merge into one bin; an empty bin counts as PSI_EPSILON.
    """
    ref, cur = np.asarray(reference, float), np.asarray(current, float)
    inner = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    edges = np.concatenate(([-np.inf], inner, [np.inf]))
    ref_share = np.maximum(np.histogram(ref, edges)[0] / len(ref), PSI_EPSILON)
    cur_share = np.maximum(np.histogram(cur, edges)[0] / len(cur), PSI_EPSILON)
    return float(np.sum((cur_share - ref_share) * np.log(cur_share / ref_share)))


def ks_test(reference: Sequence[float], current: Sequence[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test: (largest CDF gap, p-value)."""
    result = stats.ks_2samp(reference, current)
    return float(result.statistic), float(result.pvalue)


def wasserstein_normalised(reference: Sequence[float], current: Sequence[float]) -> float:
    """Earth mover's distance in units of the reference standard deviation (floored at 0.001)."""
    scale = max(float(np.std(reference)), 0.001)
    return float(stats.wasserstein_distance(reference, current)) / scale


def chi_square_test(ref_counts: Mapping[Any, int],
                    cur_counts: Mapping[Any, int]) -> tuple[float, float]:
    """Chi-square test that two windows share one category mix: (statistic, p-value).

    A 2 x k contingency table over the union of categories, so a category seen in only one
    window counts; a single category in all is no evidence of change (0.0, 1.0).
    """
    keys = sorted(set(ref_counts) | set(cur_counts), key=str)
    table = np.array([[ref_counts.get(k, 0) for k in keys], [cur_counts.get(k, 0) for k in keys]])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 0.0, 1.0
    result = stats.chi2_contingency(table, correction=False)
    return float(result.statistic), float(result.pvalue)


def jensen_shannon(p_counts: Mapping[Any, int], q_counts: Mapping[Any, int]) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two count tables."""
    keys = list(set(p_counts) | set(q_counts))
    p = np.array([p_counts.get(k, 0) for k in keys], float)
    q = np.array([q_counts.get(k, 0) for k in keys], float)
    return float(jensenshannon(p / p.sum(), q / q.sum(), base=2))


# --- features --------------------------------------------------------------------------------

def is_refusal(output: str) -> bool:
    """Whether the output opens with a refusal phrase (REFUSAL_PHRASES)."""
    return bool(_REFUSAL.search(output[:REFUSAL_CHARS].replace("\u2019", "'")))


def prompt_language(prompt: str) -> str:
    """ISO 639-1 code of the prompt, or UNDETERMINED below the data stage's confidence cut."""
    if not prompt.strip():
        return UNDETERMINED
    lang, score = identify(prompt)
    return lang if score >= LanguageFilter.min_score else UNDETERMINED


def row_features(row: Mapping[str, Any], use_token_ids: bool) -> dict[str, Any]:
    """One request row's drift features; `prompt_perplexity` is None without `prompt_nll`."""
    nll = row.get("prompt_nll")
    return {
        "created_at": row["created_at"],
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "prompt_perplexity": None if nll is None else math.exp(nll),
        "language": prompt_language(row["prompt"]),
        "refusal": "refused" if is_refusal(row["output"]) else "answered",
        "finish_reason": str(row["finish_reason"]),
        "tokens": list(row["prompt_token_ids"]) if use_token_ids else row["prompt"].split(),
    }


def split_windows(rows: Iterable[Mapping[str, Any]], reference_days: float, current_days: float,
                  now: datetime | None = None) -> tuple[list[Mapping], list[Mapping]]:
    """Cut rows by `created_at` into (reference, current), each sorted by time.

    current: the `current_days` up to and including `now`; reference: the `reference_days`
    before that, half-open. `now` defaults to the latest row's time, so a replayed log cuts the
    same way every time; it must be naive or aware as the rows' times are.
    """
    rows = sorted(rows, key=lambda r: r["created_at"])
    if not rows:
        return [], []
    now = now or rows[-1]["created_at"]
    cut = now - timedelta(days=current_days)
    start = cut - timedelta(days=reference_days)
    return ([r for r in rows if start <= r["created_at"] < cut],
            [r for r in rows if cut <= r["created_at"] <= now])


# --- report ----------------------------------------------------------------------------------

@dataclass
class ColumnDrift:
    """One column's test. `statistic` and `p_value` are None when it could not be tested."""

    name: str
    kind: str  # "numeric" | "categorical" | "distribution"
    test: str  # a DEFAULT_THRESHOLDS key
    statistic: float | None
    p_value: float | None
    threshold: float
    drifted: bool
    reference_value: Any  # numeric: mean; otherwise: {category: share}
    current_value: Any
    detail: str


@dataclass
class Window:
    start: datetime | None
    end: datetime | None
    rows: int


@dataclass
class DriftReport:
    """What drifted (`drifted`, column names), by how much (`columns`) and since when."""

    reference_window: Window
    current_window: Window
    columns: list[ColumnDrift]
    drifted: list[str]
    since: datetime | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: datetimes as ISO 8601 strings."""
        def iso(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat()

        def window(w: Window) -> dict[str, Any]:
            return {"start": iso(w.start), "end": iso(w.end), "rows": w.rows}

        return {"reference_window": window(self.reference_window),
                "current_window": window(self.current_window),
                "columns": [asdict(c) for c in self.columns],
                "drifted": list(self.drifted), "since": iso(self.since)}

    def summary(self) -> str:
        """A header line, then one line per column."""
        ref, cur = self.reference_window, self.current_window
        lines = [f"drift: {len(self.drifted)} of {len(self.columns)} columns drifted; "
                 f"reference {_span(ref)} vs current {_span(cur)}"]
        for c in self.columns:
            if c.statistic is None:
                lines.append(f"{c.name}: not testable ({c.detail})")
                continue
            label = TEST_LABELS[c.test]
            if c.test in P_VALUE_TESTS:
                sign = "<" if c.drifted else ">="
                measure = f"{label} p={c.p_value:.2g} {sign} {c.threshold:g}"
            else:
                sign = ">" if c.drifted else "<="
                measure = f"{label}={c.statistic:.3f} {sign} {c.threshold:g}"
            line = (f"{c.name}: {'drifted' if c.drifted else 'ok'} ({measure}), "
                    f"{_change(c.reference_value, c.current_value)}")
            if c.drifted and self.since is not None:
                line += f", since {self.since.isoformat(timespec='minutes')}"
            lines.append(line)
        return "\n".join(lines)


def _span(w: Window) -> str:
    if w.start is None:
        return "(0 rows)"
    fmt = "%Y-%m-%d %H:%M"
    return f"{w.start.strftime(fmt)} .. {w.end.strftime(fmt)} ({w.rows} rows)"


def _change(ref: Any, cur: Any) -> str:
    """'mean a -> b', or the three shares that moved most, as 'key a% -> b%'."""
    if not isinstance(ref, dict):
        return f"mean {ref:.4g} -> {cur:.4g}"
    moved = sorted(set(ref) | set(cur), key=lambda k: (-abs(cur.get(k, 0) - ref.get(k, 0)), k))[:3]
    return ", ".join(f"{k} {ref.get(k, 0):.1%} -> {cur.get(k, 0):.1%}" for k in moved)


def _shares(counts: Counter) -> dict[str, float]:
    total = sum(counts.values())
    return {str(k): round(n / total, 4) for k, n in counts.most_common()}


def _untestable(name: str, kind: str, test: str, threshold: float, why: str) -> ColumnDrift:
    return ColumnDrift(name, kind, test, None, None, threshold, False, None, None, why)


def _decide(test: str, statistic: float, p_value: float | None, threshold: float) -> bool:
    return p_value < threshold if test in P_VALUE_TESTS else statistic > threshold


def _numeric(name: str, ref: list[float], cur: list[float],
             thresholds: Mapping[str, float]) -> ColumnDrift:
    test = "ks" if min(len(ref), len(cur)) <= LARGE_SAMPLE else "wasserstein"
    if test == "ks":
        statistic, p_value = ks_test(ref, cur)
    else:
        statistic, p_value = wasserstein_normalised(ref, cur), None
    threshold = thresholds[test]
    detail = (f"PSI {psi(ref, cur):.3f}; median {np.median(ref):.4g} -> {np.median(cur):.4g}; "
              f"{len(ref)} -> {len(cur)} rows")
    return ColumnDrift(name, "numeric", test, statistic, p_value, threshold,
                       _decide(test, statistic, p_value, threshold),
                       float(np.mean(ref)), float(np.mean(cur)), detail)


def _pool_rare(ref: Counter, cur: Counter) -> tuple[Counter, Counter]:
    """Lump categories expected fewer than MIN_EXPECTED times in a window into OTHER."""
    n_ref, n_cur = sum(ref.values()), sum(cur.values())
    smaller = min(n_ref, n_cur) / (n_ref + n_cur)
    rare = {k for k in ref | cur if smaller * (ref[k] + cur[k]) < MIN_EXPECTED}

    def pooled(counts: Counter) -> Counter:
        kept = Counter({k: n for k, n in counts.items() if k not in rare})
        kept[OTHER] += sum(counts[k] for k in rare)
        return kept

    return pooled(ref), pooled(cur)


def _categorical(name: str, ref: list[str], cur: list[str],
                 thresholds: Mapping[str, float]) -> ColumnDrift:
    ref_counts, cur_counts = Counter(ref), Counter(cur)
    if min(len(ref), len(cur)) <= LARGE_SAMPLE:
        test = "chi_square"
        statistic, p_value = chi_square_test(*_pool_rare(ref_counts, cur_counts))
    else:
        test, p_value = "jensen_shannon", None
        statistic = jensen_shannon(ref_counts, cur_counts)
    threshold = thresholds[test]
    return ColumnDrift(name, "categorical", test, statistic, p_value, threshold,
                       _decide(test, statistic, p_value, threshold), _shares(ref_counts),
                       _shares(cur_counts), f"{len(ref)} -> {len(cur)} rows")


def _distribution(name: str, ref: list[list], cur: list[list],
                  thresholds: Mapping[str, float]) -> ColumnDrift:
    ref_all = Counter(t for tokens in ref for t in tokens)
    top = {t for t, _ in ref_all.most_common(TOP_TOKENS)}

    def bucketed(rows: list[list]) -> Counter:
        return Counter(t if t in top else OTHER for tokens in rows for t in tokens)

    ref_counts, cur_counts = bucketed(ref), bucketed(cur)
    if not ref_counts or not cur_counts:
        return _untestable(name, "distribution", "jensen_shannon",
                           thresholds["jensen_shannon"], "no prompt tokens in a window")
    statistic = jensen_shannon(ref_counts, cur_counts)
    threshold = thresholds["jensen_shannon"]
    keep = [str(t) for t, _ in ref_counts.most_common(5)] + [OTHER]
    ref_shares, cur_shares = _shares(ref_counts), _shares(cur_counts)
    return ColumnDrift(name, "distribution", "jensen_shannon", statistic, None, threshold,
                       statistic > threshold,
                       {k: ref_shares.get(k, 0.0) for k in keep},
                       {k: cur_shares.get(k, 0.0) for k in keep},
                       f"top {len(top)} reference tokens + {OTHER}; {sum(ref_all.values())} -> "
                       f"{sum(cur_counts.values())} tokens")


def _test_column(name: str, ref: list[dict], cur: list[dict], thresholds: Mapping[str, float],
                 min_rows: int) -> ColumnDrift:
    """Test one feature column between two lists of row features."""
    key = "tokens" if name in DISTRIBUTION else name
    ref_values = [f[key] for f in ref if f[key] is not None]
    cur_values = [f[key] for f in cur if f[key] is not None]
    if min(len(ref_values), len(cur_values)) < min_rows:
        kind, test = (("numeric", "ks") if name in NUMERIC else
                      ("categorical", "chi_square") if name in CATEGORICAL else
                      ("distribution", "jensen_shannon"))
        why = (f"{len(ref_values)} reference and {len(cur_values)} current rows"
               f"{' with prompt_nll' if name == 'prompt_perplexity' else ''}; "
               f"needs {min_rows} in each")
        return _untestable(name, kind, test, thresholds[test], why)
    if name in NUMERIC:
        return _numeric(name, ref_values, cur_values, thresholds)
    if name in CATEGORICAL:
        return _categorical(name, ref_values, cur_values, thresholds)
    return _distribution(name, ref_values, cur_values, thresholds)


def _since(ref: list[dict], cur: list[dict], drifted: list[str], thresholds: Mapping[str, float],
           min_rows: int, chunks: int) -> datetime | None:
    """Start of the earliest chunk from which every later chunk drifts.

    The time-ordered current window is cut into `chunks` chunks of equal row counts, each tested
    alone against the whole reference; a chunk drifts when at least half of the `drifted`
    columns do, so one column's false alarm (5% at p < 0.05) does not pull `since` back a
    chunk. The chunk in which a change begins usually drifts already, so `since` tends to fall
    up to one chunk before the change. None when the last chunk does not drift (too few rows
    to test, or the change has passed).
    """
    bounds = np.linspace(0, len(cur), chunks + 1).astype(int)
    flags = [2 * sum(_test_column(name, ref, cur[a:b], thresholds, min_rows).drifted
                     for name in drifted) >= len(drifted)
             for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    first = len(flags)
    while first > 0 and flags[first - 1]:
        first -= 1
    return cur[bounds[first]]["created_at"] if first < len(flags) else None


def _window(features: list[dict]) -> Window:
    if not features:
        return Window(None, None, 0)
    return Window(features[0]["created_at"], features[-1]["created_at"], len(features))


def drift_report(reference_rows: Sequence[Mapping[str, Any]],
                 current_rows: Sequence[Mapping[str, Any]], *,
                 thresholds: Mapping[str, float] | None = None, min_rows: int = MIN_ROWS,
                 chunks: int = CHUNKS) -> DriftReport:
    """Test every column of `current_rows` against `reference_rows` (request store rows).

    `thresholds` overrides DEFAULT_THRESHOLDS by test name ("ks", "chi_square": p-values;
    "wasserstein", "jensen_shannon": distances). The token distribution counts
    `prompt_token_ids` when every row of both windows has them, else whitespace words.
    """
    thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    all_rows = [*reference_rows, *current_rows]
    use_ids = bool(all_rows) and all(r.get("prompt_token_ids") is not None for r in all_rows)

    def features(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
        return sorted((row_features(r, use_ids) for r in rows), key=lambda f: f["created_at"])

    ref, cur = features(reference_rows), features(current_rows)
    columns = [_test_column(name, ref, cur, thresholds, min_rows)
               for name in (*NUMERIC, *CATEGORICAL, *DISTRIBUTION)]
    drifted = [c.name for c in columns if c.drifted]
    since = _since(ref, cur, drifted, thresholds, min_rows, chunks) if drifted else None
    return DriftReport(_window(ref), _window(cur), columns, drifted, since)
