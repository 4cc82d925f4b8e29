"""Functional identification metrics and scoring against plain brute-force references.

The references below loop over probes, gallery entries and thresholds in plain Python,
straight from the NIST IR 8271 wording; they share no code with crossres.metrics.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crossres.metrics import functional as MF
from crossres.metrics.scoring import search, similarity, topk_similarity

# ------------------------------------------------------------------ brute-force reference


def ref_rank(row: list[float], pid: int, gids: list[int]) -> int:
    mates = [j for j, g in enumerate(gids) if g == pid]
    assert len(mates) == 1
    m = row[mates[0]]
    return 1 + sum(1 for j, g in enumerate(gids) if g != pid and row[j] >= m)


def ref_cmc(S: list[list[float]], pids: list[int], gids: list[int], max_rank: int) -> list[float]:
    ranks = [ref_rank(row, p, gids) for row, p in zip(S, pids, strict=True)]
    return [sum(1 for r in ranks if r <= k) / len(ranks) for k in range(1, max_rank + 1)]


def ref_fnir(M: list[list[float]], pids: list[int], gids: list[int], T: float, R: int) -> float:
    misses = 0
    for row, p in zip(M, pids, strict=True):
        mate = gids.index(p)
        if ref_rank(row, p, gids) > R or row[mate] < T:
            misses += 1
    return misses / len(M)


def ref_fpir(N: list[list[float]], T: float, R: int) -> float:
    # "a candidate in the top R scoring >= T", literally: sort, take R, look at each
    alarms = 0
    for row in N:
        top = sorted(row, reverse=True)[:R]
        if any(s >= T for s in top):
            alarms += 1
    return alarms / len(N)


def ref_fpir_at_fnir(M, pids, N, gids, target: float, R: int) -> float:
    thresholds = {s for row in M + N for s in row} | {math.inf}
    ok = [ref_fpir(N, T, R) for T in thresholds if ref_fnir(M, pids, gids, T, R) <= target]
    return min(ok) if ok else 1.0


def random_open_set(rng: random.Random):
    """Integer-valued scores (many ties), unique gallery ids, mated and non-mated probes."""
    n_gallery = rng.randint(1, 8)
    gids = rng.sample(range(100), n_gallery)
    n_mated, n_non = rng.randint(1, 9), rng.randint(1, 6)
    top = rng.randint(1, 5)
    M = [[float(rng.randint(0, top)) for _ in gids] for _ in range(n_mated)]
    N = [[float(rng.randint(0, top)) for _ in gids] for _ in range(n_non)]
    pids = [rng.choice(gids) for _ in range(n_mated)]
    return M, pids, N, gids


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


# ------------------------------------------------------------ seeded random vs reference


@pytest.mark.parametrize("seed", range(60))
def test_cmc_matches_brute_force(seed):
    rng = random.Random(seed)
    M, pids, _, gids = random_open_set(rng)
    max_rank = rng.randint(1, len(gids) + 2)
    got = MF.cmc(t(M), t(pids, torch.long), t(gids, torch.long), max_rank)
    assert got.tolist() == pytest.approx(ref_cmc(M, pids, gids, max_rank), abs=0)
    ranks, scores = MF.mate_rank_and_score(t(M), t(pids, torch.long), t(gids, torch.long))
    assert ranks.tolist() == [ref_rank(r, p, gids) for r, p in zip(M, pids, strict=True)]
    assert scores.tolist() == [r[gids.index(p)] for r, p in zip(M, pids, strict=True)]


@pytest.mark.parametrize("seed", range(60))
def test_open_set_matches_brute_force(seed):
    rng = random.Random(1000 + seed)
    M, pids, N, gids = random_open_set(rng)
    args = (t(M), t(pids, torch.long), t(N), t(gids, torch.long))
    for R in (1, 2, 3):
        for target in (0.0, 0.01, 0.1, 0.25, 0.5, 0.99, 1.0):
            got = MF.fpir_at_fnir(*args, target_fnir=target, rank=R)
            assert float(got) == ref_fpir_at_fnir(M, pids, N, gids, target, R), (R, target)
        # the curve is the set of (FPIR, FNIR) pairs over every score and +inf
        curve = MF.det_curve(*args, rank=R)
        ref_pairs = {
            (ref_fpir(N, T, R), ref_fnir(M, pids, gids, T, R))
            for T in {s for row in M + N for s in row} | {math.inf}
        }
        got_pairs = set(zip(curve.fpir.tolist(), curve.fnir.tolist(), strict=True))
        assert got_pairs == ref_pairs
        for T, fp, fn in zip(curve.thresholds.tolist(), curve.fpir, curve.fnir, strict=True):
            assert float(fp) == ref_fpir(N, T, R) and float(fn) == ref_fnir(M, pids, gids, T, R)
        for T in (-1.0, 0.5, 1.0, 2.5, 100.0, math.inf):
            fnir, fpir = MF.fnir_fpir_at_threshold(*args, T, rank=R)
            assert (float(fnir), float(fpir)) == (ref_fnir(M, pids, gids, T, R), ref_fpir(N, T, R))


def test_rank_counting_in_row_blocks(monkeypatch):
    # the full-matrix path counts in row blocks to bound its temporaries; tiny blocks here
    monkeypatch.setattr(MF, "_COUNT_BLOCK", 5)
    for seed in range(10):
        M, pids, _, gids = random_open_set(random.Random(seed))
        ranks, _ = MF.mate_rank_and_score(t(M), t(pids, torch.long), t(gids, torch.long))
        assert ranks.tolist() == [ref_rank(r, p, gids) for r, p in zip(M, pids, strict=True)]


# ----------------------------------------------------------------------- hand-computed


def test_probe_ranked_last_and_ties_count_against_the_probe():
    gids = t([10, 11, 12, 13], torch.long)
    scores = t([[0.9, 0.8, 0.7, 0.1], [0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.3, 0.3]])
    pids = t([13, 10, 12], torch.long)
    ranks, _ = MF.mate_rank_and_score(scores, pids, gids)
    # last of 4; one tie above -> 2; everything tied -> last
    assert ranks.tolist() == [4, 2, 4]
    assert MF.cmc(scores, pids, gids, 5).tolist() == [0.0, 1 / 3, 1 / 3, 1.0, 1.0]


def test_fpir_at_fnir_by_hand():
    gids = t([0, 1, 2], torch.long)
    # mates: probe id 0 scores 0.9 (rank 1), probe id 1 scores 0.6 (rank 1)
    mated = t([[0.9, 0.1, 0.2], [0.3, 0.6, 0.5]])
    nonmated = t([[0.7, 0.1, 0.0], [0.5, 0.4, 0.2]])  # top scores 0.7 and 0.5
    args = (mated, t([0, 1], torch.long), nonmated, gids)
    # FNIR = 0 needs T <= 0.6 -> FPIR(0.6) = 1/2 (0.7 >= 0.6, 0.5 < 0.6)
    assert float(MF.fpir_at_fnir(*args, target_fnir=0.0)) == 0.5
    # FNIR <= 1/2 allows T up to 0.9 -> no non-mated top reaches it
    assert float(MF.fpir_at_fnir(*args, target_fnir=0.5)) == 0.0
    assert [float(x) for x in MF.fnir_fpir_at_threshold(*args, 0.7)] == [0.5, 0.5]
    curve = MF.det_curve(*args)
    assert curve.thresholds.tolist() == pytest.approx([0.5, 0.6, 0.7, 0.9, math.inf])
    assert curve.fpir.tolist() == [1.0, 0.5, 0.5, 0.0, 0.0]
    assert curve.fnir.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]


def test_threshold_is_inclusive_as_nist_not_strict_as_the_papers_code():
    gids = t([0, 1], torch.long)
    mated = t([[0.6, 0.1]])
    nonmated = t([[0.6, 0.2]])  # top score equal to the mate's
    args = (mated, t([0], torch.long), nonmated, gids)
    # at T = 0.6 the mate is a hit (>=) and the non-mated search an alarm (>=)
    assert float(MF.fpir_at_fnir(*args, target_fnir=0.0)) == 1.0
    assert [float(x) for x in MF.fnir_fpir_at_threshold(*args, 0.6)] == [0.0, 1.0]


def test_unreachable_target_gives_one():
    gids = t([0, 1, 2], torch.long)
    # second probe's mate is at rank 2: outside the top 1 at every threshold
    mated = t([[0.9, 0.1, 0.2], [0.8, 0.6, 0.1]])
    nonmated = t([[0.1, 0.2, 0.3]])
    args = (mated, t([0, 1], torch.long), nonmated, gids)
    assert float(MF.fpir_at_fnir(*args, target_fnir=0.01, rank=1)) == 1.0
    op = MF.operating_point(MF.det_curve(*args, rank=1), 0.01)
    assert not op.reached and math.isnan(float(op.threshold))
    # at rank 2 the mate is in the list: FNIR 0 up to T = 0.6, where FPIR = 0
    assert float(MF.fpir_at_fnir(*args, target_fnir=0.01, rank=2)) == 0.0
    # target exactly the miss share is reachable (<=)
    assert float(MF.fpir_at_fnir(*args, target_fnir=0.5, rank=1)) == 0.0


def test_attack_success_rate_by_hand():
    labels = t([0, 1, 2, 3], torch.long)
    clean = t([0, 1, 2, 0], torch.long)  # sample 3 misclassified clean: not counted
    adv = t([1, 1, 0, 0], torch.long)  # 0 fooled, 1 not, 2 fooled
    assert float(MF.attack_success_rate(clean, adv, labels)) == pytest.approx(2 / 3)
    targets = t([5, 2, 0, 1], torch.long)
    adv_t = t([5, 1, 7, 1], torch.long)  # 0 hits its target, 1 no, 2 fooled but not to 0
    assert float(MF.attack_success_rate(clean, adv_t, labels, targets=targets)) == pytest.approx(
        1 / 3
    )
    logits = torch.nn.functional.one_hot(adv, 8).float()
    assert float(MF.attack_success_rate(clean, logits, labels)) == pytest.approx(2 / 3)
    assert math.isnan(float(MF.attack_success_rate(labels + 1, adv, labels)))
    with pytest.raises(ValueError, match="targets equal labels"):
        MF.attack_success_rate(clean, adv, labels, targets=labels)


def test_errors_name_the_problem():
    gids = t([0, 0, 1], torch.long)
    with pytest.raises(ValueError, match="2 mates"):
        MF.cmc(torch.rand(1, 3), t([0], torch.long), gids, 1)
    with pytest.raises(ValueError, match="no mate"):
        MF.cmc(torch.rand(1, 3), t([5], torch.long), t([0, 1, 2], torch.long), 1)
    with pytest.raises(ValueError, match="NaN"):
        MF.cmc(t([[math.nan, 1.0]]), t([0], torch.long), t([0, 1], torch.long), 1)
    with pytest.raises(ValueError, match="target_fnir"):
        MF.fpir_at_fnir(
            torch.rand(1, 2), t([0], torch.long), torch.rand(1, 2), t([0, 1], torch.long), 2.0
        )


# ------------------------------------------------------------------ hypothesis invariances


@st.composite
def score_case(draw, min_probes=1):
    n_gallery = draw(st.integers(1, 7))
    n_probe = draw(st.integers(min_probes, 8))
    vals = st.integers(0, 4).map(float)
    S = draw(
        st.lists(
            st.lists(vals, min_size=n_gallery, max_size=n_gallery),
            min_size=n_probe,
            max_size=n_probe,
        )
    )
    pids = draw(st.lists(st.integers(0, n_gallery - 1), min_size=n_probe, max_size=n_probe))
    perm = draw(st.permutations(list(range(n_gallery))))
    return t(S), t(pids, torch.long), torch.arange(n_gallery), t(perm, torch.long)


@settings(max_examples=40, deadline=None)
@given(score_case())
def test_cmc_invariant_to_gallery_permutation_and_monotone(case):
    S, pids, gids, perm = case
    R = gids.shape[0] + 1
    base = MF.cmc(S, pids, gids, R)
    assert torch.equal(MF.cmc(S[:, perm], pids, gids[perm], R), base)
    assert (base[1:] >= base[:-1]).all()
    assert base[gids.shape[0] - 1] == 1.0  # every mate is within the whole gallery


@settings(max_examples=40, deadline=None)
@given(
    score_case(),
    score_case(),
    st.integers(1, 3),
    st.lists(st.floats(-1, 5), min_size=2, max_size=6),
)
def test_det_monotone_in_threshold(mated_case, non_case, R, thresholds):
    M, pids, gids, _ = mated_case
    N = non_case[0]
    if N.shape[1] != M.shape[1]:
        N = torch.zeros(N.shape[0], M.shape[1])
    args = (M, pids, N, gids)
    curve = MF.det_curve(*args, rank=R)
    assert (curve.thresholds[1:] > curve.thresholds[:-1]).all()
    assert (curve.fpir[1:] <= curve.fpir[:-1]).all() and (curve.fnir[1:] >= curve.fnir[:-1]).all()
    pts = [MF.fnir_fpir_at_threshold(*args, T, rank=R) for T in sorted(thresholds)]
    for (fn0, fp0), (fn1, fp1) in zip(pts, pts[1:], strict=False):
        assert fn1 >= fn0 and fp1 <= fp0
    # a looser target or a longer candidate list never makes FPIR@FNIR worse
    vals = [float(MF.fpir_at_fnir(*args, target_fnir=x, rank=R)) for x in (0.0, 0.2, 0.5, 1.0)]
    assert vals == sorted(vals, reverse=True)
    assert float(MF.fpir_at_fnir(*args, rank=R + 1)) <= float(MF.fpir_at_fnir(*args, rank=R))


# ------------------------------------------------------------------------------ scoring


def test_similarity_matches_definitions():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(7, 5, generator=g), torch.randn(11, 5, generator=g)
    cos = torch.nn.functional.cosine_similarity(p[:, None], q[None], dim=2)
    torch.testing.assert_close(similarity(p, q), cos)
    torch.testing.assert_close(
        similarity(p, q, metric="neg_euclidean"), -torch.cdist(p, q), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="metric"):
        similarity(p, q, metric="dot")


@pytest.mark.parametrize("metric", ["cosine", "neg_euclidean"])
@pytest.mark.parametrize("chunk", [1, 3, 7, 50, 1000])
def test_chunked_topk_equals_full_matmul(metric, chunk):
    g = torch.Generator().manual_seed(1)
    p, q = torch.randn(13, 6, generator=g), torch.randn(50, 6, generator=g)
    full = similarity(p, q, metric=metric).topk(5, dim=1)
    got = topk_similarity(p, q, 5, metric=metric, chunk_size=chunk)
    torch.testing.assert_close(got.values, full.values)
    assert torch.equal(got.indices, full.indices)  # continuous scores: no ties


@pytest.mark.parametrize("chunk", [1, 2, 5, 100])
@pytest.mark.parametrize("k", [1, 3])
def test_search_exact_with_ties(chunk, k):
    # integer vectors: squared distances are exact integers, so every path gives the same
    # bits and ties are real ties
    g = torch.Generator().manual_seed(chunk * 10 + k)
    q = torch.randint(0, 3, (20, 4), generator=g).float()
    gids = torch.randperm(100, generator=g)[:20]
    p = torch.randint(0, 3, (30, 4), generator=g).float()
    pids = gids[torch.randint(0, 20, (30,), generator=g)]
    pids[-6:] = 1000 + torch.arange(6)  # non-mated searches
    full = similarity(p, q, metric="neg_euclidean")
    res = search(p, q, gids, pids, k=k, metric="neg_euclidean", chunk_size=chunk)
    ref = MF.summarize_probes(full, pids, gids)
    assert torch.equal(res.summary.mate_rank, ref.mate_rank)
    assert torch.equal(res.summary.mate_score[:-6], ref.mate_score[:-6])
    assert res.summary.mate_score[-6:].isnan().all() and (res.summary.mate_rank[-6:] == 0).all()
    assert torch.equal(res.summary.top_score, ref.top_score)
    assert torch.equal(res.values, full.topk(k, dim=1).values)
    # indices among ties are unspecified, but each must carry its value and its id
    assert torch.equal(full.gather(1, res.indices), res.values)
    assert torch.equal(res.candidate_ids, gids[res.indices])
    assert torch.equal(
        MF.cmc_from_ranks(res.summary.mate_rank[:-6], 4), MF.cmc(full[:-6], pids[:-6], gids, 4)
    )


def test_search_cosine_matches_full_matrix():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(300, 16, generator=g)
    gids = torch.arange(300) * 7
    p = q[:40] + 0.8 * torch.randn(40, 16, generator=g)
    pids = gids[:40].clone()
    res = search(p, q, gids, pids, k=2, chunk_size=64)
    ref = MF.summarize_probes(similarity(p, q), pids, gids)
    assert torch.equal(res.summary.mate_rank, ref.mate_rank)
    torch.testing.assert_close(res.summary.mate_score, ref.mate_score)
    twice = gids.clone()
    twice[100] = gids[0]  # identity 0 enrolled twice, in different chunks
    with pytest.raises(ValueError, match="id 0.* 2 mates"):
        search(p, q, twice, pids, chunk_size=64)
