"""Confidence intervals for the benchmark's rates and means: Wilson score and bootstrap.

Binomial rates (attack success rate, hit rate: k successes among the cell's n queries) get
the Wilson score interval (Wilson 1927), in closed form:

    centre = (k + z^2 / 2) / (n + z^2)
    half   = z / (n + z^2) * sqrt(k (n - k) / n + z^2 / 4)

with z the standard normal quantile at (1 + confidence) / 2. Unlike the Wald interval
p +- z sqrt(p (1 - p) / n) it stays inside [0, 1], is not degenerate at k = 0 or k = n,
and its coverage is close to nominal at the small n of a benchmark cell (Newcombe 1998;
Brown, Cai, DasGupta 2001). n = 0 gives (NaN, NaN): the rate is undefined there, as
``functional.attack_success_rate`` returns NaN when no sample counts.

Everything else (FPIR@FNIR, mean perturbation norms) gets a percentile bootstrap. With
``groups`` (identity labels) it is a cluster bootstrap: each resample draws as many
identities as there are, with replacement, and takes every row of each drawn identity as
many times as it was drawn, so rows of one identity (which are not independent: same face,
same template) move together. The resampling procedure is fixed so that a plain loop can
reproduce it: group labels are numbered in sorted order, and resample b is
``rng.integers(0, n_groups, size=n_groups)`` on ``numpy.random.default_rng(seed)`` (one call
per resample, in order; without ``groups`` every row is its own group). The interval is
``numpy.quantile(replicates, [(1 - confidence) / 2, (1 + confidence) / 2])`` (linear
interpolation). A resample is represented by its row multiplicities ("weights"), so the
mean and FPIR@FNIR conveniences evaluate all resamples at once with matrix operations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "bootstrap_fpir_at_fnir_interval",
    "bootstrap_interval",
    "bootstrap_mean_interval",
    "bootstrap_replicates",
    "wilson_interval",
]

MIN_RESAMPLES = 1000  # percentile tails at 2.5 % rest on ~25 replicates at this count
_BLOCK = 1 << 22  # resample weights held at once (int64), bounding memory for big tables


def _z(confidence: float) -> float:
    if not (0.0 < float(confidence) < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return NormalDist().inv_cdf(0.5 + float(confidence) / 2)


# ------------------------------------------------------------------------------- Wilson


def wilson_interval(
    successes: Any, n: Any, confidence: float = 0.95
) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]:
    """Wilson score interval (low, high) for ``successes`` out of ``n`` trials.

    Scalars give two floats; arrays (broadcast together) give two float64 arrays. Counts
    must be integers with 0 <= successes <= n; n = 0 gives (NaN, NaN). The bounds are
    exactly 0 at successes = 0 and exactly 1 at successes = n.
    """
    z = _z(confidence)
    k_in, n_in = np.asarray(successes), np.asarray(n)
    for name, v in (("successes", k_in), ("n", n_in)):
        if v.dtype == bool or not np.issubdtype(v.dtype, np.number):
            raise ValueError(f"{name} must be integer counts, got dtype {v.dtype}")
        if not np.all(np.isfinite(v)) or not np.all(v == np.round(v)):
            raise ValueError(f"{name} must be integer counts, got {v!r}")
    k, m = np.broadcast_arrays(k_in.astype(np.float64), n_in.astype(np.float64))
    if np.any(k < 0) or np.any(k > m):
        raise ValueError(f"need 0 <= successes <= n, got successes={k_in!r}, n={n_in!r}")
    z2 = z * z
    with np.errstate(invalid="ignore", divide="ignore"):  # n = 0: NaN, set below
        centre = (k + z2 / 2) / (m + z2)
        half = z / (m + z2) * np.sqrt(k * (m - k) / m + z2 / 4)
        low = np.where(k == 0, 0.0, np.clip(centre - half, 0.0, 1.0))
        high = np.where(k == m, 1.0, np.clip(centre + half, 0.0, 1.0))
    low = np.where(m == 0, math.nan, low)
    high = np.where(m == 0, math.nan, high)
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


# ---------------------------------------------------------------------------- bootstrap


def _check_resampling(n_resamples: int, seed: Any) -> np.random.Generator:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int):
        raise ValueError(f"n_resamples must be an int, got {n_resamples!r}")
    if n_resamples < MIN_RESAMPLES:
        raise ValueError(
            f"n_resamples must be >= {MIN_RESAMPLES} (the 95 % percentile tails rest on "
            f"n_resamples * 2.5 % replicates), got {n_resamples}"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int (the bootstrap is reproducible), got {seed!r}")
    return np.random.default_rng(int(seed))


def _group_index(groups: Any, n: int, name: str) -> tuple[np.ndarray, int]:
    """(group number of each row [n], number of groups); None = every row its own group."""
    if groups is None:
        return np.arange(n), n
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with one label per row ({n}), got {g.shape}")
    labels, inverse = np.unique(g, return_inverse=True)
    return inverse.reshape(-1), labels.shape[0]


def _draw_counts(rng: np.random.Generator, n_groups: int, n_resamples: int) -> np.ndarray:
    """[n_resamples, n_groups] times each group is drawn; one generator call per resample."""
    draws = np.empty((n_resamples, n_groups), dtype=np.int64)
    for b in range(n_resamples):
        draws[b] = rng.integers(0, n_groups, size=n_groups)
    offsets = (np.arange(n_resamples) * n_groups)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=n_resamples * n_groups).reshape(
        n_resamples, n_groups
    )


def _weight_blocks(
    rng: np.random.Generator, inverse: np.ndarray, n_groups: int, n_resamples: int
) -> Iterator[np.ndarray]:
    """Row multiplicities [block, n_rows] of consecutive resamples."""
    block = max(1, _BLOCK // max(inverse.shape[0], n_groups, 1))
    for start in range(0, n_resamples, block):
        counts = _draw_counts(rng, n_groups, min(block, n_resamples - start))
        yield counts[:, inverse]


def _as_columns(data: Any) -> tuple[list[np.ndarray], bool]:
    """The data arrays (sharing their first dimension) and whether a single one was given."""
    single = not isinstance(data, (tuple, list))
    arrays = [np.asarray(a) for a in ((data,) if single else data)]
    if not arrays:
        raise ValueError("data must be an array or a non-empty tuple of arrays")
    n = arrays[0].shape[0] if arrays[0].ndim else -1
    for i, a in enumerate(arrays):
        if a.ndim == 0 or a.shape[0] != n:
            shapes = [x.shape for x in arrays]
            raise ValueError(f"data arrays must share their first dimension, got {shapes} ({i})")
    if n == 0:
        raise ValueError("data has no rows: a bootstrap needs at least one")
    return arrays, single


def _percentile(replicates: np.ndarray, confidence: float) -> tuple[Any, Any]:
    _z(confidence)  # validates
    bad = np.isnan(replicates)
    if bad.any():
        raise ValueError(
            f"the statistic is NaN on {int(bad.any(axis=tuple(range(1, bad.ndim))).sum())} of "
            f"{replicates.shape[0]} resamples (undefined there); the interval would be biased"
        )
    alpha = 1.0 - float(confidence)
    low, high = np.quantile(replicates, [alpha / 2, 1 - alpha / 2], axis=0)
    if np.ndim(low) == 0:
        return float(low), float(high)
    return low, high


def bootstrap_replicates(
    statistic: Callable[..., Any],
    data: Any,
    *,
    groups: Any = None,
    n_resamples: int = MIN_RESAMPLES,
    seed: int,
) -> np.ndarray:
    """The statistic on each resample [n_resamples] (float64), see the module docstring.

    ``data`` is one array or a tuple of arrays sharing their first dimension (rows);
    ``statistic(*arrays)`` receives the resampled rows (original order, repeated as drawn)
    and returns a number.
    """
    arrays, _ = _as_columns(data)
    rng = _check_resampling(n_resamples, seed)
    n = arrays[0].shape[0]
    inverse, n_groups = _group_index(groups, n, "groups")
    out = np.empty(n_resamples, dtype=np.float64)
    b = 0
    rows = np.arange(n)
    for weights in _weight_blocks(rng, inverse, n_groups, n_resamples):
        for w in weights:
            idx = np.repeat(rows, w)
            out[b] = float(statistic(*(a[idx] for a in arrays)))
            b += 1
    return out


def bootstrap_interval(
    statistic: Callable[..., Any],
    data: Any,
    *,
    groups: Any = None,
    n_resamples: int = MIN_RESAMPLES,
    confidence: float = 0.95,
    seed: int,
) -> tuple[float, float]:
    """Percentile bootstrap interval (low, high) of ``statistic`` over ``data``.

    ``groups`` (one label per row, e.g. identity): cluster bootstrap, resampling whole
    groups. ``seed`` is required: the same seed gives the same resamples. A statistic
    that is NaN on some resample is an error (the interval would silently condition on
    the resamples where it is defined).
    """
    reps = bootstrap_replicates(statistic, data, groups=groups, n_resamples=n_resamples, seed=seed)
    return _percentile(reps, confidence)


def bootstrap_mean_interval(
    values: Any,
    *,
    groups: Any = None,
    n_resamples: int = MIN_RESAMPLES,
    confidence: float = 0.95,
    seed: int,
) -> tuple[Any, Any]:
    """Bootstrap interval of the mean of ``values`` [n] (two floats) or of each column of
    ``values`` [n, k] (two [k] arrays; e.g. the L2, L0, Linf columns, all from the same
    resamples). Same resamples, hence the same result up to rounding, as
    ``bootstrap_interval(np.mean, values, ...)`` with the same seed."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim not in (1, 2) or x.shape[0] == 0:
        raise ValueError(f"values must be a non-empty [n] or [n, k] array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(
            f"values contain {int((~np.isfinite(x)).sum())} NaN/inf entries; drop the rows "
            "without a value (e.g. failed attacks) before averaging"
        )
    rng = _check_resampling(n_resamples, seed)
    inverse, n_groups = _group_index(groups, x.shape[0], "groups")
    x2 = x.reshape(x.shape[0], -1)
    parts = [
        (w @ x2) / w.sum(1, keepdims=True)
        for w in _weight_blocks(rng, inverse, n_groups, n_resamples)
    ]
    reps = np.concatenate(parts)
    return _percentile(reps if x.ndim == 2 else reps[:, 0], confidence)


# --------------------------------------------------------------------------- FPIR@FNIR


def _fpir_at_fnir_weighted(
    eff: np.ndarray,
    w_mated: np.ndarray,
    top: np.ndarray,
    w_nonmated: np.ndarray,
    target_fnir: float,
) -> np.ndarray:
    """FPIR@FNIR of each weighted resample [B], as ``functional.fpir_at_fnir_from_summary``.

    eff: effective mate scores (-inf outside the top R); top: non-mated top scores. The
    candidate thresholds are every value of the full sample and +inf: a superset of each
    resample's own candidates, which changes nothing since any other threshold gives the
    (FPIR, FNIR) pair of the smallest candidate above it.
    """
    thresholds = np.unique(np.concatenate([eff[np.isfinite(eff)], top, [math.inf]]))
    e_order, t_order = np.argsort(eff, kind="stable"), np.argsort(top, kind="stable")
    e_sorted, t_sorted = eff[e_order], top[t_order]
    # cumulative weight of the sorted values, with a leading 0 column
    ce = np.concatenate([np.zeros((w_mated.shape[0], 1), np.int64), w_mated[:, e_order]], 1)
    ct = np.concatenate([np.zeros((w_nonmated.shape[0], 1), np.int64), w_nonmated[:, t_order]], 1)
    ce, ct = ce.cumsum(1), ct.cumsum(1)
    n_m, n_n = ce[:, -1:], ct[:, -1:]
    misses = ce[:, np.searchsorted(e_sorted, thresholds, side="left")]  # weight of eff < T
    alarms = n_n - ct[:, np.searchsorted(t_sorted, thresholds, side="left")]  # weight top >= T
    fnir = misses.astype(np.float64) / n_m
    fpir = alarms.astype(np.float64) / n_n
    # FPIR never increases with T, so the smallest FPIR with FNIR <= target is its minimum
    # over those thresholds; 1.0 where no threshold reaches the target
    return np.where(fnir <= target_fnir, fpir, math.inf).min(1).clip(max=1.0)


def bootstrap_fpir_at_fnir_interval(
    mate_rank: Any,
    mate_score: Any,
    nonmated_top: Any,
    *,
    target_fnir: float = 0.01,
    rank: int = 1,
    mated_groups: Any = None,
    nonmated_groups: Any = None,
    n_resamples: int = MIN_RESAMPLES,
    confidence: float = 0.95,
    seed: int,
) -> tuple[float, float]:
    """Bootstrap interval of FPIR@FNIR, from the arrays ``functional.fpir_at_fnir_from_summary``
    takes: mated searches' ``mate_rank`` and ``mate_score`` [n_mated], non-mated searches'
    ``nonmated_top`` [n_nonmated] (numpy arrays or CPU tensors).

    Stratified: each resample draws the mated searches and then the non-mated ones (each
    with the procedure of the module docstring, mated first), so both kinds are always
    present. With ``mated_groups`` / ``nonmated_groups`` (identity labels; both or
    neither) identities are resampled within each kind; an identity with searches of both
    kinds is an error, since it could not be resampled whole.
    """
    rank_a = np.asarray(mate_rank)
    score_a = np.asarray(mate_score, dtype=np.float64)
    top_a = np.asarray(nonmated_top, dtype=np.float64)
    if rank_a.ndim != 1 or score_a.shape != rank_a.shape or top_a.ndim != 1:
        raise ValueError(
            f"mate_rank {rank_a.shape} and mate_score {score_a.shape} must be 1-D of the same "
            f"length, nonmated_top {top_a.shape} 1-D"
        )
    if rank_a.shape[0] == 0 or top_a.shape[0] == 0:
        raise ValueError(
            f"FPIR@FNIR needs mated and non-mated searches, got {rank_a.shape[0]} mated and "
            f"{top_a.shape[0]} non-mated"
        )
    if np.any(rank_a < 1):
        raise ValueError(f"mate_rank must be >= 1 (mated searches), got {int((rank_a < 1).sum())}")
    if np.isnan(score_a).any() or np.isnan(top_a).any():
        raise ValueError("mate_score / nonmated_top contain NaN")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if not (0.0 <= float(target_fnir) <= 1.0):
        raise ValueError(f"target_fnir must be in [0, 1], got {target_fnir!r}")
    if (mated_groups is None) != (nonmated_groups is None):
        raise ValueError("give both mated_groups and nonmated_groups, or neither")
    if mated_groups is not None:
        shared = np.intersect1d(np.asarray(mated_groups), np.asarray(nonmated_groups))
        if shared.size:
            raise ValueError(
                f"{shared.size} identities have both mated and non-mated searches (first: "
                f"{shared[0]!r}); the stratified cluster bootstrap needs them apart"
            )
    _z(confidence)
    rng = _check_resampling(n_resamples, seed)
    inv_m, g_m = _group_index(mated_groups, rank_a.shape[0], "mated_groups")
    inv_n, g_n = _group_index(nonmated_groups, top_a.shape[0], "nonmated_groups")
    eff = np.where(rank_a <= rank, score_a, -math.inf)
    reps = np.empty(n_resamples, dtype=np.float64)
    block = max(1, _BLOCK // max(rank_a.shape[0] + top_a.shape[0], g_m + g_n))
    for start in range(0, n_resamples, block):
        size = min(block, n_resamples - start)
        cm = np.empty((size, g_m), np.int64)
        cn = np.empty((size, g_n), np.int64)
        for b in range(size):  # mated then non-mated draws of each resample, in order
            cm[b] = _draw_counts(rng, g_m, 1)[0]
            cn[b] = _draw_counts(rng, g_n, 1)[0]
        reps[start : start + size] = _fpir_at_fnir_weighted(
            eff, cm[:, inv_m], top_a, cn[:, inv_n], float(target_fnir)
        )
    return _percentile(reps, confidence)
