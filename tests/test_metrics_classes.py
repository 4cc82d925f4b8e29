"""Metric classes: batched accumulation equals the functional form on all the data at once,
padding duplicates are dropped, and every input form (scores, summary, search) agrees."""

from __future__ import annotations

import pytest
import torch

from crossres.metrics import CMC, AttackSuccessRate, DETCurve, FPIRAtFNIR, HitRate
from crossres.metrics import functional as MF
from crossres.metrics.scoring import search, similarity


def open_set_data(seed: int = 0, n_mated: int = 30, n_non: int = 12, n_gallery: int = 9):
    """Integer scores (ties) for mated probes (ids in the gallery) and non-mated ones."""
    g = torch.Generator().manual_seed(seed)
    gids = torch.randperm(50, generator=g)[:n_gallery]
    scores = torch.randint(0, 6, (n_mated + n_non, n_gallery), generator=g).float()
    pids = torch.cat(
        [gids[torch.randint(0, n_gallery, (n_mated,), generator=g)], 100 + torch.arange(n_non)]
    )
    order = torch.randperm(n_mated + n_non, generator=g)  # mix mated and non-mated in batches
    return scores[order], pids[order], gids, (pids[order] < 100)


def batches(n: int, sizes: list[int]):
    start = 0
    while start < n:
        for size in sizes:
            if start >= n:
                break
            yield torch.arange(start, min(start + size, n))
            start += size


def test_cmc_and_hit_rate_accumulate_exactly():
    scores, pids, gids, mated = open_set_data()
    S, P = scores[mated], pids[mated]
    cmc, hit, hit3 = CMC(max_rank=6), HitRate(), HitRate(rank=3)
    for idx in batches(S.shape[0], [4, 7, 1]):
        for m in (cmc, hit, hit3):
            m.update(S[idx], P[idx], gids, idx)
    ref = MF.cmc(S, P, gids, 6)
    assert torch.equal(cmc.compute(), ref)
    assert hit.compute() == ref[0] and hit3.compute() == ref[2] and hit.compute().ndim == 0


def test_open_set_classes_accumulate_exactly_with_mixed_batches():
    scores, pids, gids, mated = open_set_data(1)
    fpir = FPIRAtFNIR(target_fnir=0.1, rank=2)
    det = DETCurve(rank=2)
    sid = torch.arange(scores.shape[0]) + 500
    for idx in batches(scores.shape[0], [5, 3]):
        fpir.update(scores[idx], pids[idx], gids, sid[idx])
        det.update(scores[idx], pids[idx], gids, sid[idx])
    args = (scores[mated], pids[mated], scores[~mated], gids)
    assert fpir.compute() == MF.fpir_at_fnir(*args, target_fnir=0.1, rank=2)
    got, ref = det.compute(), MF.det_curve(*args, rank=2)
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)


def test_duplicates_are_dropped_and_first_record_kept():
    scores, pids, gids, mated = open_set_data(2)
    S, P = scores[mated], pids[mated]
    sid = torch.arange(S.shape[0])
    once, padded = CMC(max_rank=4), CMC(max_rank=4)
    once.update(S, P, gids, sid)
    padded.update(S, P, gids, sid)
    padded.update(S[:5], P[:5], gids, sid[:5])  # DistributedSampler-style repeats
    assert torch.equal(padded.compute(), once.compute())
    # a repeat that disagrees does not override the first record of that sample id
    first = CMC(max_rank=1)
    worst = S.clone()
    worst[0] = -1.0
    worst[0, (gids == P[0]).nonzero()[0, 0]] = -2.0  # sample 0 now ranked last
    first.update(S[:1], P[:1], gids, sid[:1])
    first.update(worst[:1], P[:1], gids, sid[:1])
    assert float(first.compute()) == float(MF.cmc(S[:1], P[:1], gids, 1))


def test_search_result_and_summary_inputs_agree_with_scores():
    g = torch.Generator().manual_seed(4)
    q = torch.randint(0, 3, (25, 4), generator=g).float()
    gids = torch.arange(25) * 3
    p = torch.randint(0, 3, (40, 4), generator=g).float()
    pids = torch.where(torch.arange(40) < 30, gids[torch.arange(40) % 25], 999 + torch.arange(40))
    sid = torch.arange(40)
    from_scores, from_search, from_summary = (FPIRAtFNIR(0.2, rank=3) for _ in range(3))
    full = similarity(p, q, metric="neg_euclidean")
    for idx in batches(40, [16]):
        from_scores.update(full[idx], pids[idx], gids, sid[idx])
        res = search(p[idx], q, gids, pids[idx], metric="neg_euclidean", chunk_size=6)
        from_search.update(res, sample_id=sid[idx])
        from_summary.update(res.summary, sample_id=sid[idx])
    assert from_scores.compute() == from_search.compute() == from_summary.compute()


def test_attack_success_rate_class():
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 5, (40,), generator=g)
    clean = torch.where(torch.rand(40, generator=g) < 0.8, labels, (labels + 1) % 5)
    adv = torch.randint(0, 5, (40,), generator=g)
    targets = (labels + 1 + torch.randint(0, 4, (40,), generator=g)) % 5
    sid = torch.arange(40)
    untargeted, targeted = AttackSuccessRate(), AttackSuccessRate(targeted=True)
    for idx in [*batches(40, [9, 4]), torch.arange(6)]:  # the last batch repeats samples
        untargeted.update(clean[idx], adv[idx], labels[idx], sid[idx])
        targeted.update(
            clean[idx],
            torch.nn.functional.one_hot(adv[idx], 5).float(),
            labels[idx],
            sid[idx],
            targets[idx],
        )
    assert untargeted.compute() == MF.attack_success_rate(clean, adv, labels)
    assert targeted.compute() == MF.attack_success_rate(clean, adv, labels, targets=targets)
    with pytest.raises(ValueError, match="needs targets"):
        targeted.update(clean, adv, labels, sid)


def test_reset_and_errors():
    scores, pids, gids, mated = open_set_data(6)
    cmc = CMC(max_rank=2)
    cmc.update(scores[mated], pids[mated], gids, torch.arange(int(mated.sum())))
    cmc.reset()
    with pytest.raises(ValueError, match="before any update"), pytest.warns(UserWarning):
        cmc.compute()
    cmc.update(scores, pids, gids, torch.arange(scores.shape[0]))
    with pytest.raises(ValueError, match="close-set"):
        cmc.compute()
    with pytest.raises(ValueError, match="sample_id is required"):
        cmc.update(scores, pids, gids)
    only_mated = FPIRAtFNIR()
    only_mated.update(scores[mated], pids[mated], gids, torch.arange(int(mated.sum())))
    with pytest.raises(ValueError, match="non-mated"):
        only_mated.compute()


def test_unreachable_target_through_the_class():
    gids = torch.tensor([0, 1, 2])
    scores = torch.tensor([[0.9, 0.1, 0.2], [0.8, 0.6, 0.1], [0.1, 0.2, 0.3]])
    pids = torch.tensor([0, 1, 7])  # probe 1 ranked 2nd; probe 7 non-mated
    m = FPIRAtFNIR(target_fnir=0.01, rank=1)
    m.update(scores, pids, gids, torch.arange(3))
    assert float(m.compute()) == 1.0
