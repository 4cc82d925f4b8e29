"""Paired comparisons of the result store: the same queries under two conditions.

Every attack configuration hits the same queries on every target and at every resolution,
so two conditions (Base vs CR, 16 px vs 256 px, DR vs CW) are compared on the queries they
share: each such query gives a pair of binary outcomes (``tables.success_outcome`` or
``tables.hit_outcome``), and only queries whose outcome counts under both conditions are
paired (a classification attack's success counts only on queries classified correctly when
clean, which can differ between targets and resolutions).

``pair_outcomes`` builds the aligned pairs; ``paired_table`` is the report's "Base vs CR" table
(two-sided exact McNemar, Holm-adjusted over the table's tests of one outcome; the difference
of rates gets a bootstrap interval over identities, as it is not binomial);
``one_sided`` the one-sided exact test the findings use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from crossres.metrics.intervals import bootstrap_mean_interval
from crossres.metrics.paired import holm, mcnemar_paired
from crossres.report.tables import CONFIDENCE, N_RESAMPLES, SEED
from crossres.store import CLEAN, ResultRow

Outcome = Callable[[ResultRow], "bool | None"]
Condition = tuple[str, str, int]  # (model, attack, resolution)


def pair_outcomes(
    rows: Iterable[ResultRow], first: Condition, second: Condition, outcome: Outcome
) -> tuple[np.ndarray, np.ndarray]:
    """Aligned boolean outcomes [n] of the queries (sample ids) present and counted under
    both conditions, in sample-id order."""
    x, y, _ = pair_outcomes_with_identity(rows, first, second, outcome)
    return x, y


def pair_outcomes_with_identity(
    rows: Iterable[ResultRow], first: Condition, second: Condition, outcome: Outcome
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``pair_outcomes`` plus each pair's identity (for a bootstrap over identities)."""
    if first == second:
        raise ValueError(f"a paired comparison needs two conditions, got {first} twice")
    a: dict[int, bool] = {}
    b: dict[int, bool] = {}
    identity: dict[int, int] = {}
    for r in rows:
        cond = (r.model, r.attack, r.resolution)
        if cond in (first, second):
            value = outcome(r)
            if value is not None:
                (a if cond == first else b)[r.sample_id] = bool(value)
                identity[r.sample_id] = r.identity
    shared = sorted(a.keys() & b.keys())
    return (
        np.array([a[s] for s in shared], dtype=bool),
        np.array([b[s] for s in shared], dtype=bool),
        np.array([identity[s] for s in shared], dtype=np.int64),
    )


def one_sided(b: int, c: int) -> float:
    """Exact one-sided McNemar p-value for "the first condition's outcome is true more often":
    P(X >= b), X ~ Bin(b + c, 1/2), b = #(first true, second false), c = the reverse.
    Twice the smaller of ``one_sided(b, c)`` and ``one_sided(c, b)``, capped at 1, is the
    two-sided ``metrics.paired.mcnemar_exact(b, c)``."""
    if min(b, c) < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(b, n + 1)) / 2**n


@dataclass
class PairedRow:
    """One attack x resolution of the Base vs CR table, for one outcome."""

    attack: str
    resolution: int
    n: int  # pairs
    rate_first: float
    rate_second: float
    difference: float  # second - first (CR - Base), in rate units
    difference_ci: tuple[float, float]  # bootstrap over identities of the paired difference
    b: int  # first true, second false
    c: int  # first false, second true
    pvalue: float  # two-sided exact McNemar
    pvalue_holm: float = math.nan


def paired_table(
    rows: Sequence[ResultRow],
    first: str,
    second: str,
    outcome: Outcome,
    *,
    attacks: Sequence[str],
    resolutions: Sequence[int],
) -> list[PairedRow]:
    """Per attack x resolution: model ``first`` vs ``second`` on their shared queries, exact
    McNemar, Holm-adjusted over every test of the table (cells without pairs are left out)."""
    out = []
    for attack in attacks:
        for res in resolutions:
            x, y, ids = pair_outcomes_with_identity(
                rows, (first, attack, res), (second, attack, res), outcome
            )
            if x.size == 0:
                continue
            test = mcnemar_paired(x, y)
            diff_ci = bootstrap_mean_interval(
                y.astype(np.float64) - x.astype(np.float64),
                groups=ids,
                n_resamples=N_RESAMPLES,
                confidence=CONFIDENCE,
                seed=SEED,
            )
            out.append(
                PairedRow(
                    attack=attack,
                    resolution=res,
                    n=test.n,
                    rate_first=float(x.mean()),
                    rate_second=float(y.mean()),
                    difference=-test.difference,
                    difference_ci=(float(diff_ci[0]), float(diff_ci[1])),
                    b=test.b,
                    c=test.c,
                    pvalue=test.pvalue,
                )
            )
    if out:
        for row, adjusted in zip(out, holm([r.pvalue for r in out]), strict=True):
            row.pvalue_holm = float(adjusted)
    return out


def base_and_cr(models: Iterable[str]) -> tuple[str, str] | None:
    """The two targets the report pairs: labels "Base" and "CR" when present (the paper's
    names), else the only two targets in sorted order; None otherwise."""
    models = sorted(set(models))
    if "Base" in models and "CR" in models:
        return "Base", "CR"
    return (models[0], models[1]) if len(models) == 2 else None


def attacks_of(rows: Iterable[ResultRow], *, with_clean: bool) -> list[str]:
    names = dict.fromkeys(r.attack for r in rows)
    return [a for a in names if with_clean or a != CLEAN]
