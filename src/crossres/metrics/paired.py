"""Paired comparisons of two targets on the same queries: exact McNemar and Holm.

When the same queries hit two targets (Base and CR), each query gives a pair of binary
outcomes (attack success, rank-1 hit). Only the discordant pairs carry information about
a difference: b = #(first yes, second no), c = #(first no, second yes). Under the null
hypothesis of equal rates each discordant pair goes either way with probability 1/2, so
the exact (conditional) McNemar test is a two-sided binomial test of b among b + c:

    p = min(1, 2 * P(X <= min(b, c))),  X ~ Bin(b + c, 1/2);  p = 1 when b + c = 0.

The tail is summed in exact integer arithmetic (sum of binomial coefficients over 2^n),
so p is the correctly rounded value, however small.

Several such tests (per attack x resolution) are adjusted with Holm's step-down method
(Holm 1979): with the p-values sorted, p_(1) <= ... <= p_(m), the adjusted value of the
i-th is max_{j <= i} min(1, (m - j + 1) p_(j)). It controls the family-wise error rate
under any dependence and is uniformly more powerful than Bonferroni.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

__all__ = ["McNemar", "holm", "mcnemar_exact", "mcnemar_paired"]


class McNemar(NamedTuple):
    """A paired comparison of two binary outcomes on the same n queries.

    b: first true, second false; c: first false, second true; difference: rate of the
    first minus rate of the second, (b - c) / n; pvalue: exact two-sided McNemar.
    """

    n: int
    b: int
    c: int
    difference: float
    pvalue: float


def _count(x: Any, name: str) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) or x < 0:
        raise ValueError(f"{name} must be a non-negative int (a count of pairs), got {x!r}")
    return int(x)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c``."""
    b, c = _count(b, "b"), _count(c, "c")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)  # int / int: one correctly rounded division


def _as_bool(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of outcomes, got shape {a.shape}")
    if a.dtype != bool:
        if not np.issubdtype(a.dtype, np.number) or not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans (or 0/1), got dtype {a.dtype}")
        a = a.astype(bool)
    return a


def mcnemar_paired(first: Any, second: Any) -> McNemar:
    """Exact McNemar test of two paired boolean outcome arrays (position i = one query).

    Rows must already be aligned (the same query at the same position in both arrays).
    """
    x, y = _as_bool(first, "first"), _as_bool(second, "second")
    if x.shape != y.shape:
        raise ValueError(
            f"first and second must pair up one to one, got {x.shape[0]} and {y.shape[0]} outcomes"
        )
    if x.shape[0] == 0:
        raise ValueError("no paired outcomes (empty arrays)")
    b, c = int((x & ~y).sum()), int((~x & y).sum())
    return McNemar(int(x.shape[0]), b, c, (b - c) / x.shape[0], mcnemar_exact(b, c))


def holm(pvalues: Any) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (float64, input order), monotone in the raw
    p-values and capped at 1. Tied raw p-values get the same adjusted value."""
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be 1-D, got shape {p.shape}")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"pvalues must lie in [0, 1] (no NaN), got {p!r}")
    m = p.shape[0]
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m, dtype=np.float64)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted
