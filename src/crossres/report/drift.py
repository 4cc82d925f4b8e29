"""Feature drift: how far resolution alone moves a face in each target's feature space.

The paper's cross-resolution claim is about the deep features: a CR model maps a small face
close to where it maps the same face at full resolution. Each clean row carries that distance
(``ResultRow.feature_drift``: ``||f(x_r) - f(x_original)||``, measured by the frozen target
when ``feature_drift`` is on), so every run measures the claim on its own queries.

- ``drift_cells``: per target x resolution, the mean drift with a bootstrap interval over
  identities (the queries of one person are not independent).
- ``drift_pairs``: per resolution, the second target minus the first on the queries both
  measured (paired by sample), the mean difference with its bootstrap interval, a two-sided
  Wilcoxon signed-rank test (scipy's), Holm-adjusted over the resolutions tested.

Distances are in each model's own units: a model that shrank its whole space would look
better here without being better; ``benchmarks/cr_eval.py`` also divides by the distance
between different people's faces.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from crossres.metrics.intervals import bootstrap_mean_interval
from crossres.metrics.paired import holm
from crossres.report.tables import CONFIDENCE, N_RESAMPLES, SEED
from crossres.store import CLEAN, ResultRow


@dataclass(frozen=True)
class DriftCell:
    model: str
    resolution: int
    n: int
    mean: float
    interval: tuple[float, float]


@dataclass
class DriftPair:
    resolution: int
    n: int
    mean_first: float
    mean_second: float
    difference: float  # second - first
    difference_ci: tuple[float, float]
    pvalue: float  # Wilcoxon signed-rank, two-sided; NaN when every difference is 0
    pvalue_holm: float = math.nan


def _measured(rows: Sequence[ResultRow]) -> dict[tuple[str, int], dict[int, ResultRow]]:
    """(model, resolution) -> sample id -> clean row with a drift."""
    out: dict[tuple[str, int], dict[int, ResultRow]] = defaultdict(dict)
    for r in rows:
        if r.attack == CLEAN and not math.isnan(r.feature_drift):
            out[(r.model, r.resolution)][r.sample_id] = r
    return out


def _interval(values: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    low, high = bootstrap_mean_interval(
        values, groups=groups, n_resamples=N_RESAMPLES, confidence=CONFIDENCE, seed=SEED
    )
    return float(low), float(high)


def drift_cells(rows: Sequence[ResultRow]) -> list[DriftCell]:
    """Mean drift per target x resolution (sorted by model, then resolution as stored)."""
    out = []
    for (model, res), by_sample in sorted(_measured(rows).items()):
        found = list(by_sample.values())
        values = np.array([r.feature_drift for r in found])
        groups = np.array([r.identity for r in found])
        out.append(
            DriftCell(model, res, len(found), float(values.mean()), _interval(values, groups))
        )
    return out


def drift_pairs(rows: Sequence[ResultRow], first: str, second: str) -> list[DriftPair]:
    """``second`` vs ``first`` per resolution on the samples both measured."""
    measured = _measured(rows)
    out = []
    for res in sorted({res for model, res in measured if model == first}):
        a, b = measured.get((first, res), {}), measured.get((second, res), {})
        shared = sorted(a.keys() & b.keys())
        if not shared:
            continue
        x = np.array([a[s].feature_drift for s in shared])
        y = np.array([b[s].feature_drift for s in shared])
        groups = np.array([a[s].identity for s in shared])
        d = y - x
        pvalue = float(stats.wilcoxon(y, x).pvalue) if np.any(d != 0) else math.nan
        out.append(
            DriftPair(
                res, len(shared), float(x.mean()), float(y.mean()), float(d.mean()),
                _interval(d, groups), pvalue,
            )
        )  # fmt: skip
    tested = [p for p in out if not math.isnan(p.pvalue)]
    for p, adjusted in zip(tested, holm([p.pvalue for p in tested]), strict=True):
        p.pvalue_holm = float(adjusted)
    return out
