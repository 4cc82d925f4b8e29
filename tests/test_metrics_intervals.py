"""Wilson and bootstrap intervals against closed forms, published values and plain loops.

The references here share no code with crossres.metrics.intervals: the Wilson bounds come
from the textbook form of the formula (a different arrangement than the module's) with
``math`` only, the bootstrap from a plain Python loop over the documented draws, and
FPIR@FNIR per resample from ``functional.fpir_at_fnir_from_summary``.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom

from crossres.metrics import functional as MF
from crossres.metrics.intervals import (
    bootstrap_fpir_at_fnir_interval,
    bootstrap_interval,
    bootstrap_mean_interval,
    bootstrap_replicates,
    wilson_interval,
)

Z95 = 1.959963984540054  # standard normal 0.975 quantile (tables: 1.95996 39845 40054)

# ------------------------------------------------------------------------------- Wilson


def textbook_wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), Wilson (1927)."""
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    # Newcombe (1998), Stat. Med. 17:857, Table II, method 3 (score, no continuity correction)
    [
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_published_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert round(lo, 4) == low and round(hi, 4) == high


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10_000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_matches_textbook_formula(kn):
    k, n = kn
    lo, hi = wilson_interval(k, n)
    rlo, rhi = textbook_wilson(k, n)
    # measured agreement ~1e-16; rlo at k = 0 is a rounding residue around 0
    assert lo == pytest.approx(max(rlo, 0.0), abs=1e-14)
    assert hi == pytest.approx(min(rhi, 1.0), abs=1e-14)


def test_wilson_other_confidence():
    z99 = 2.5758293035489004  # 0.995 quantile
    lo, hi = wilson_interval(7, 40, confidence=0.99)
    rlo, rhi = textbook_wilson(7, 40, z99)
    assert lo == pytest.approx(rlo, abs=1e-14) and hi == pytest.approx(rhi, abs=1e-14)
    lo95, hi95 = wilson_interval(7, 40)
    assert lo < lo95 and hi > hi95


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_bounds_and_symmetry(kn):
    k, n = kn
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert lo < hi
    mlo, mhi = wilson_interval(n - k, n)  # mirror: failures are successes of the other kind
    assert mlo == pytest.approx(1 - hi, abs=1e-14) and mhi == pytest.approx(1 - lo, abs=1e-14)
    assert (lo == 0.0) == (k == 0) and (hi == 1.0) == (k == n)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 500), st.integers(0, 500), st.integers(2, 20))
def test_wilson_narrows_as_n_grows(n, k, factor):
    k = k % (n + 1)
    lo, hi = wilson_interval(k, n)
    lo2, hi2 = wilson_interval(k * factor, n * factor)  # same p_hat, more trials
    assert hi2 - lo2 < hi - lo


def test_wilson_monotone_in_successes():
    for n in (1, 7, 22, 100):
        lo, hi = wilson_interval(np.arange(n + 1), n)
        assert np.all(np.diff(lo) > 0) and np.all(np.diff(hi) > 0)


def test_wilson_vectorised_equals_scalar():
    k = np.array([[0, 3, 22], [5, 10, 1]])
    n = np.array([22, 22, 22])
    lo, hi = wilson_interval(k, n)
    assert lo.shape == hi.shape == (2, 3)
    for i, j in itertools.product(range(2), range(3)):
        assert (lo[i, j], hi[i, j]) == wilson_interval(int(k[i, j]), int(n[j]))


def test_wilson_empty_is_nan():
    lo, hi = wilson_interval(0, 0)
    assert math.isnan(lo) and math.isnan(hi)
    lo, hi = wilson_interval([0, 1], [0, 2])
    assert math.isnan(lo[0]) and math.isnan(hi[0]) and 0 < lo[1] < 0.5 < hi[1] < 1


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((5, 4), "successes <= n"),
        ((-1, 4), "successes <= n"),
        ((1.5, 4), "integer"),
        ((1, 4, 1.0), "confidence"),
        ((1, 4, 0.0), "confidence"),
        ((True, 4), "integer"),
    ],
)
def test_wilson_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        wilson_interval(*args)


def exact_coverage(p: float, n: int) -> float:
    k = np.arange(n + 1)
    lo, hi = wilson_interval(k, n)
    return float(binom.pmf(k[(lo <= p) & (p <= hi)], n, p).sum())


@pytest.mark.parametrize("n", [10, 22, 50, 100])
def test_wilson_exact_coverage_near_nominal(n):
    """Exact coverage sum_k Bin(k; n, p) [p in CI(k)] over p in [0.1, 0.9]. Measured minima
    (step 0.001): 0.9172 (n=10), 0.9228 (22), 0.9308 (50), 0.9328 (100); means 0.951-0.954.
    Wilson's coverage oscillates around the nominal 0.95 and dips lower only near p = 0 or 1
    (0.84 at n = 10, Brown, Cai, DasGupta 2001), outside this range."""
    cov = np.array([exact_coverage(p, n) for p in np.linspace(0.1, 0.9, 801)])
    assert cov.min() >= 0.915
    assert abs(cov.mean() - 0.95) < 0.006


# ---------------------------------------------------------------------------- bootstrap


def linear_quantile(values: list[float], q: float) -> float:
    """numpy's default ('linear') quantile, by hand: interpolate at position q (B - 1)."""
    s = sorted(values)
    h = q * (len(s) - 1)
    lo = math.floor(h)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (h - lo) * (s[hi] - s[lo])


def loop_replicates(stat, data, groups, n_resamples, seed):
    """The documented procedure as a plain loop: groups numbered in sorted label order, one
    ``rng.integers(0, G, size=G)`` per resample, all rows of each drawn group."""
    rng = np.random.default_rng(seed)
    labels = sorted(set(groups)) if groups is not None else list(range(len(data)))
    members = {g: [] for g in labels}
    for i in range(len(data)):
        members[groups[i] if groups is not None else i].append(i)
    reps = []
    for _ in range(n_resamples):
        draw = rng.integers(0, len(labels), size=len(labels))
        rows = [i for d in draw for i in members[labels[d]]]
        reps.append(stat([data[i] for i in rows]))
    return reps


def median(xs):
    return float(np.median(np.asarray(xs)))


@settings(max_examples=15, deadline=None)
@given(
    st.lists(st.integers(-5, 5), min_size=1, max_size=12),
    st.integers(0, 2**31),
    st.booleans(),
)
def test_bootstrap_equals_plain_loop(xs, seed, grouped):
    groups = [i % 4 * 7 - 3 for i in range(len(xs))] if grouped else None  # unsorted labels
    ref = loop_replicates(median, xs, groups, 1000, seed)
    reps = bootstrap_replicates(np.median, np.array(xs), groups=groups, seed=seed)
    assert reps.tolist() == ref  # medians of integers: exact, whatever the row order
    lo, hi = bootstrap_interval(np.median, np.array(xs), groups=groups, seed=seed)
    assert (lo, hi) == (linear_quantile(ref, 0.025), linear_quantile(ref, 0.975))


def test_bootstrap_distribution_equals_exact_enumeration():
    """All 3^3 equally likely ordered resamples of 3 rows give the exact bootstrap law of the
    mean; 20000 replicates match it within 5 binomial standard errors."""
    data = np.array([0.0, 1.0, 5.0])
    exact = Counter(float(np.mean(data[list(r)])) for r in itertools.product(range(3), repeat=3))
    n_resamples = 20_000
    reps = bootstrap_replicates(np.mean, data, n_resamples=n_resamples, seed=5)
    seen = Counter(reps.tolist())
    assert all(min(abs(v - e) for e in exact) < 1e-12 for v in seen)  # only possible means
    for value, count in exact.items():
        p = count / 27
        got = sum(c for v, c in seen.items() if abs(v - value) < 1e-12) / n_resamples
        assert abs(got - p) < 5 * math.sqrt(p * (1 - p) / n_resamples), value


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.01, 100), min_size=1, max_size=40), st.integers(0, 2**31))
def test_bootstrap_interval_contains_centre_of_symmetric_data(half, seed):
    data = np.array(half + [-x for x in half])  # symmetric about 0: the mean's law is too
    lo, hi = bootstrap_interval(np.mean, data, seed=seed)
    assert lo <= 0.0 <= hi
    lo2, hi2 = bootstrap_mean_interval(data, seed=seed)
    assert lo2 <= 0.0 <= hi2


def test_cluster_bootstrap_resamples_whole_groups():
    """Groups of identical rows: a cluster resample is a resample of the group values, so the
    replicates equal a row bootstrap over one row per group (same seed, same draws)."""
    rng = np.random.default_rng(0)
    values = rng.integers(-50, 50, size=15).astype(float)
    size = 8
    rows = np.repeat(values, size)
    groups = np.repeat(np.arange(100, 115)[::-1], size)  # labels in reverse order
    order = np.argsort(np.arange(100, 115)[::-1])  # groups numbered in sorted label order
    clustered = bootstrap_replicates(np.mean, rows, groups=groups, seed=3)
    per_group = bootstrap_replicates(np.mean, values[order], seed=3)
    np.testing.assert_allclose(clustered, per_group, rtol=0, atol=1e-12)
    # ignoring the clusters treats 120 rows as independent: the interval shrinks by about
    # sqrt(8) (measured ratio 2.7 for this seed)
    c_lo, c_hi = bootstrap_mean_interval(rows, groups=groups, seed=3)
    n_lo, n_hi = bootstrap_mean_interval(rows, seed=3)
    assert 2.0 < (c_hi - c_lo) / (n_hi - n_lo) < 4.0


def test_mean_interval_equals_generic_bootstrap():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 3))
    groups = rng.integers(0, 40, 300)
    lo, hi = bootstrap_mean_interval(x, groups=groups, seed=9)
    assert lo.shape == hi.shape == (3,)
    for j in range(3):
        ref = bootstrap_interval(np.mean, x[:, j], groups=groups, seed=9)
        single = bootstrap_mean_interval(x[:, j], groups=groups, seed=9)
        # summation order differs (matrix product vs np.mean): measured ~1e-17
        np.testing.assert_allclose([lo[j], hi[j]], ref, rtol=0, atol=1e-13)
        np.testing.assert_allclose(single, ref, rtol=0, atol=1e-13)
        assert lo[j] < x[:, j].mean() < hi[j]


def test_bootstrap_is_seeded():
    x = np.arange(50.0)
    assert bootstrap_mean_interval(x, seed=1) == bootstrap_mean_interval(x, seed=1)
    assert bootstrap_mean_interval(x, seed=1) != bootstrap_mean_interval(x, seed=2)


def test_bootstrap_tuple_data_moves_rows_together():
    x = np.arange(20.0)
    y = 2 * x

    def ratio(a, b):
        return float(b.sum() / a.sum())

    reps = bootstrap_replicates(ratio, (x, y), n_resamples=1000, seed=0)
    np.testing.assert_allclose(reps, 2.0, rtol=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_resamples": 999}, "n_resamples"),
        ({"seed": None}, "seed"),
        ({"confidence": 1.5}, "confidence"),
        ({"groups": [1, 2]}, "groups"),
    ],
)
def test_bootstrap_rejects_bad_arguments(kwargs, match):
    args = {"seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        bootstrap_interval(np.mean, np.arange(5.0), **args)


def test_bootstrap_rejects_nan_statistic_and_empty_data():
    with pytest.raises(ValueError, match="NaN on"):
        bootstrap_interval(lambda a: np.nan if a.sum() > 3 else 0.0, np.arange(4.0), seed=0)
    with pytest.raises(ValueError, match="no rows"):
        bootstrap_interval(np.mean, np.array([]), seed=0)
    with pytest.raises(ValueError, match="NaN/inf"):
        bootstrap_mean_interval(np.array([1.0, np.nan]), seed=0)


# --------------------------------------------------------------------------- FPIR@FNIR


def loop_fpir_replicates(rank, score, top, mated_groups, nonmated_groups, target, r, seed, n):
    """Per resample: draw the mated groups, then the non-mated ones, take their rows and
    call the functional definition."""
    rng = np.random.default_rng(seed)

    def members(groups, size):
        labels = sorted(set(groups)) if groups is not None else list(range(size))
        rows = {g: [] for g in labels}
        for i in range(size):
            rows[groups[i] if groups is not None else i].append(i)
        return labels, rows

    lm, rm = members(mated_groups, len(rank))
    ln, rn = members(nonmated_groups, len(top))
    reps = []
    for _ in range(n):
        dm = rng.integers(0, len(lm), size=len(lm))
        dn = rng.integers(0, len(ln), size=len(ln))
        im = [i for d in dm for i in rm[lm[d]]]
        jn = [i for d in dn for i in rn[ln[d]]]
        reps.append(
            float(
                MF.fpir_at_fnir_from_summary(
                    torch.tensor([rank[i] for i in im]),
                    torch.tensor([score[i] for i in im], dtype=torch.float64),
                    torch.tensor([top[j] for j in jn], dtype=torch.float64),
                    target_fnir=target,
                    rank=r,
                )
            )
        )
    return reps


@pytest.mark.parametrize(
    ("grouped", "target", "r"), [(False, 0.2, 1), (True, 0.2, 2), (True, 0.0, 1)]
)
def test_fpir_interval_equals_functional_loop(grouped, target, r):
    rng = np.random.default_rng(4)
    n_m, n_n = 30, 18
    rank = np.where(rng.random(n_m) < 0.9, 1, rng.integers(2, 4, n_m)).tolist()
    score = rng.integers(2, 9, n_m).astype(float).tolist()  # ties with each other
    top = rng.integers(0, 6, n_n).astype(float).tolist()  # and with the non-mated tops
    mg = (rng.integers(0, 9, n_m) * 3).tolist() if grouped else None
    ng = (100 + rng.integers(0, 7, n_n)).tolist() if grouped else None
    ref = loop_fpir_replicates(rank, score, top, mg, ng, target, r, 11, 1000)
    assert np.std(ref) > 0.0  # not a degenerate case
    lo, hi = bootstrap_fpir_at_fnir_interval(
        np.array(rank),
        np.array(score),
        np.array(top),
        target_fnir=target,
        rank=r,
        mated_groups=mg,
        nonmated_groups=ng,
        seed=11,
    )
    assert (lo, hi) == (linear_quantile(ref, 0.025), linear_quantile(ref, 0.975))


def test_fpir_interval_takes_tensors_and_checks_groups():
    rank = torch.tensor([1, 1, 2, 1])
    score = torch.tensor([0.9, 0.5, 0.7, 0.8])
    top = torch.tensor([0.6, 0.4, 0.85])
    lo, hi = bootstrap_fpir_at_fnir_interval(rank, score, top, target_fnir=0.5, seed=0)
    point = float(MF.fpir_at_fnir_from_summary(rank, score, top, target_fnir=0.5))
    assert 0.0 <= lo <= point <= hi <= 1.0
    with pytest.raises(ValueError, match="both mated and non-mated"):
        bootstrap_fpir_at_fnir_interval(
            rank, score, top, mated_groups=[1, 2, 3, 4], nonmated_groups=[4, 5, 6], seed=0
        )
    with pytest.raises(ValueError, match="both mated_groups and nonmated_groups"):
        bootstrap_fpir_at_fnir_interval(rank, score, top, mated_groups=[1, 2, 3, 4], seed=0)
    with pytest.raises(ValueError, match="non-mated"):
        bootstrap_fpir_at_fnir_interval(rank, score, top[:0], seed=0)
