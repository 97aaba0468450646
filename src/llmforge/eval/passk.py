"""The unbiased pass@k estimator of Chen et al. (2021), "Evaluating Large Language Models
Trained on Code".

Given ``n`` samples for a problem of which ``c`` are correct, the probability that at least
one of ``k`` samples drawn without replacement is correct is ``1 - C(n-c, k) / C(n, k)``.
The ratio of binomials is computed as the product ``prod_{i=n-c+1}^{n} (1 - k / i)``, which
never forms huge integers and stays accurate for large ``n``.
"""

from __future__ import annotations

import operator

__all__ = ["pass_at_k"]


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples with ``c`` correct ones.

    Raises ValueError unless ``n >= 1``, ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    n = _as_int("n", n)
    c = _as_int("c", c)
    k = _as_int("k", k)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod
