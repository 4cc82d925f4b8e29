"""Exact McNemar against hand-computed binomial tails and scipy's binomtest; Holm against a
brute-force run of the step-down procedure itself."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest

from crossres.metrics.paired import holm, mcnemar_exact, mcnemar_paired


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (1, 9, 2 * (1 + 10) / 1024),  # = 0.021484375
        (9, 1, 0.021484375),
        (0, 5, 2 * 1 / 32),
        (2, 5, 2 * (1 + 7 + 21) / 128),
        (0, 1, 1.0),  # 2 * 1/2, capped
        (3, 3, 1.0),  # 2 * P(X <= 3 | n = 6) = 2 * 42/64 > 1
        (0, 0, 1.0),  # no discordant pair: no evidence
        (0, 20, 2 / 2**20),
    ],
)
def test_mcnemar_hand_cases(b, c, p):
    assert mcnemar_exact(b, c) == p


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 400), st.integers(0, 400))
def test_mcnemar_equals_scipy_binomtest(b, c):
    p = mcnemar_exact(b, c)
    assert p == mcnemar_exact(c, b)
    if b + c == 0:
        assert p == 1.0
        return
    ref = binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
    # scipy sums floating-point pmfs: measured relative difference <= 4.5e-14 (b, c <= 400)
    assert p == pytest.approx(ref, rel=5e-13, abs=1e-300)


def test_mcnemar_tiny_p_does_not_underflow_to_zero_early():
    p = mcnemar_exact(0, 1000)
    assert p == 2.0**-999


def test_mcnemar_paired_counts_and_difference():
    first = [True, True, False, False, True, False, True]
    second = [True, False, True, False, False, False, False]
    r = mcnemar_paired(first, second)
    b = sum(1 for x, y in zip(first, second, strict=True) if x and not y)
    c = sum(1 for x, y in zip(first, second, strict=True) if y and not x)
    assert (r.n, r.b, r.c) == (7, b, c) == (7, 3, 1)
    assert r.difference == pytest.approx(np.mean(first) - np.mean(second))
    assert r.pvalue == mcnemar_exact(3, 1) == 2 * 5 / 16
    assert mcnemar_paired(np.array([1, 0, 1]), np.array([0, 0, 1])).b == 1  # 0/1 accepted


@pytest.mark.parametrize(
    ("first", "second", "match"),
    [
        ([True], [True, False], "pair up"),
        ([], [], "empty"),
        ([0.5], [1], "booleans"),
        ([[True]], [[True]], "1-D"),
    ],
)
def test_mcnemar_paired_rejects_bad_input(first, second, match):
    with pytest.raises(ValueError, match=match):
        mcnemar_paired(first, second)


@pytest.mark.parametrize(("b", "c"), [(-1, 2), (1.0, 2), (True, 3)])
def test_mcnemar_rejects_bad_counts(b, c):
    with pytest.raises(ValueError, match="non-negative int"):
        mcnemar_exact(b, c)


# ------------------------------------------------------------------------------- Holm


def holm_rejects(p: list[float], alpha: float) -> set[int]:
    """Holm (1979) step-down at level alpha: test the sorted p-values against
    alpha / (m - j) (j = 0, 1, ...) and stop at the first that fails. Written as
    (m - j) p > alpha, so that the levels below are exact breakpoints in floating point."""
    m = len(p)
    rejected = set()
    for j, i in enumerate(sorted(range(m), key=lambda i: p[i])):
        if (m - j) * p[i] > alpha:
            break
        rejected.add(i)
    return rejected


def brute_force_holm(p: list[float]) -> list[float]:
    """Adjusted p-value = the smallest level at which the procedure rejects the hypothesis.
    The rejected set changes only at the levels (m - j) p_(j), so these (and 1) suffice."""
    m = len(p)
    levels = sorted({min(1.0, (m - j) * q) for j in range(m) for q in p} | {1.0})
    out = []
    for i in range(m):
        out.append(min((a for a in levels if i in holm_rejects(p, a)), default=1.0))
    return out


def test_holm_hand_case():
    np.testing.assert_array_equal(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    np.testing.assert_array_equal(holm([0.5, 0.5]), [1.0, 1.0])
    assert holm([]).shape == (0,)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(st.floats(0, 1), st.sampled_from([0.0, 0.01, 0.02, 0.05, 0.5, 1.0])),
        min_size=1,
        max_size=9,
    )
)
def test_holm_equals_step_down_procedure(p):
    adj = holm(p)
    ref = brute_force_holm(p)
    np.testing.assert_array_equal(adj, ref)  # the same products (m - j) p: exact
    assert np.all(adj >= np.asarray(p)) and np.all(adj <= 1.0)
    for i, j in itertools.product(range(len(p)), repeat=2):
        if p[i] <= p[j]:
            assert adj[i] <= adj[j]  # monotone in the raw p-values, ties equal


def test_holm_rejects_bad_pvalues():
    for bad in ([0.1, float("nan")], [1.2], [-0.1], [[0.1]]):
        with pytest.raises(ValueError, match="pvalues"):
            holm(bad)
