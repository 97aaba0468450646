"""The steps a recipe can list under `data.steps`, by name, and how a list becomes steps.

A step is a frozen dataclass whose fields are its parameters (defaults: the published
reference values). Per-document steps are called as `step(doc) -> Document | Drop`; dedup steps
(`is_global`) see the whole dataset (data/dedup/steps.py). In YAML a step is its name, or a
one-key mapping from its name to its parameters:

    steps: [clean, gopher_quality, {language: {languages: [en, fr]}}, minhash_dedup]
"""

from __future__ import annotations

from typing import Any

from llmforge.data.clean import (
    AlphaFilter,
    Clean,
    GeneratedFilter,
    LengthFilter,
    LongestLineFilter,
)
from llmforge.data.dedup.steps import ExactDedup, MinHashDedup
from llmforge.data.filters.c4 import C4Filter
from llmforge.data.filters.fineweb import FineWebQuality
from llmforge.data.filters.gopher import GopherQuality, GopherRepetition
from llmforge.data.filters.language import LanguageFilter
from llmforge.data.filters.pii import PIIRedactor
from llmforge.data.filters.toxicity import ToxicityFilter
from llmforge.schema import build

STEPS: dict[str, type] = {cls.name: cls for cls in (
    Clean, LengthFilter, LongestLineFilter, AlphaFilter, GeneratedFilter,
    GopherQuality, GopherRepetition, C4Filter, FineWebQuality,
    LanguageFilter, PIIRedactor, ToxicityFilter, ExactDedup, MinHashDedup,
)}

# Code and other text that web-prose heuristics would wrongly reject (the built-in corpus).
CODE_STEPS = ["clean", "exact_dedup", "length", "longest_line", "alpha", "generated"]


def build_steps(specs: list[Any]) -> list[Any]:
    """Step objects from a recipe's list; a bad name or parameter is a one-line error."""
    steps = []
    for i, spec in enumerate(specs):
        if isinstance(spec, str):
            name, params = spec, {}
        elif isinstance(spec, dict) and len(spec) == 1:
            ((name, params),) = spec.items()
        else:
            raise ValueError(f"steps[{i}]: expected a step name or {{name: {{params}}}}, "
                             f"got {spec!r}")
        if name not in STEPS:
            raise ValueError(f"steps[{i}]: unknown step {name!r} (valid: {', '.join(STEPS)})")
        steps.append(build(STEPS[name], params, f"steps[{i}].{name}"))
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"steps: each step may appear once, got {names}")
    return steps
