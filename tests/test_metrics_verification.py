"""Verification ROC and TAR@FAR against a brute force over every threshold, and the
torchmetrics classes against the functional (padding duplicates, a simulated all-gather).

The brute force loops over candidate thresholds in plain Python, straight from the
definition; rates are Python float divisions count / n, the same IEEE operation the
definition's ``count / n <= far`` implies, so the comparison is exact.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crossres.metrics import TARAtFAR, VerificationROC
from crossres.metrics.verification import (
    tar_at_far,
    verification_operating_point,
    verification_roc,
)


def ref_rates(gen: list[float], imp: list[float], t: float) -> tuple[float, float]:
    far = sum(1 for s in imp if s >= t) / len(imp)
    tar = sum(1 for s in gen if s >= t) / len(gen)
    return far, tar


def ref_tar_at_far(gen: list[float], imp: list[float], far: float) -> tuple[float, float]:
    """(TAR, threshold) at the smallest candidate t (observed score or +inf) with FAR <= far."""
    t = min(t for t in set(gen) | set(imp) | {math.inf} if ref_rates(gen, imp, t)[0] <= far)
    return ref_rates(gen, imp, t)[1], t


def best_tar_any_threshold(gen: list[float], imp: list[float], far: float) -> float:
    """The largest TAR over thresholds between and around the observed scores too."""
    values = sorted(set(gen) | set(imp))
    probes = values + [(a + b) / 2 for a, b in itertools.pairwise(values)] + [values[0] - 1]
    probes.append(math.inf)
    return max(tar for t in probes for f, tar in [ref_rates(gen, imp, t)] if f <= far)


scores = st.lists(st.integers(0, 6).map(float), min_size=1, max_size=25)  # tie-heavy


@settings(max_examples=300, deadline=None)
@given(scores, scores, st.data())
def test_tar_at_far_equals_brute_force(gen, imp, data):
    n = len(imp)
    # exact FAR steps j / n (the boundary cases), 0, 1, and arbitrary values
    far = data.draw(
        st.one_of(st.integers(0, n).map(lambda j: j / n), st.floats(0, 1), st.just(0.0))
    )
    got = tar_at_far(torch.tensor(gen), torch.tensor(imp), far)
    want, t = ref_tar_at_far(gen, imp, far)
    assert got.dtype == torch.float64 and float(got) == want
    assert want == best_tar_any_threshold(gen, imp, far)
    point = verification_operating_point(
        verification_roc(torch.tensor(gen), torch.tensor(imp)), far
    )
    assert float(point.threshold) == t and float(point.tar) == want and float(point.far) <= far


@settings(max_examples=200, deadline=None)
@given(scores, scores)
def test_roc_equals_brute_force(gen, imp):
    roc = verification_roc(torch.tensor(gen, dtype=torch.float64), torch.tensor(imp))
    candidates = sorted(set(gen) | set(imp)) + [math.inf]
    assert roc.thresholds.tolist() == candidates
    ref = [ref_rates(gen, imp, t) for t in candidates]
    assert roc.far.tolist() == [f for f, _ in ref]
    assert roc.tar.tolist() == [t for _, t in ref]
    assert roc.far[-1] == 0 and roc.tar[-1] == 0  # the +inf end is always there


def test_hand_cases():
    gen = torch.tensor([0.9, 0.8, 0.7, 0.3], dtype=torch.float64)
    imp = torch.tensor([0.1, 0.2, 0.75, 0.5], dtype=torch.float64)
    # far 0: above every impostor, t = 0.8 (the smallest score > 0.75)
    assert float(tar_at_far(gen, imp, 0.0)) == 0.5
    # far 0.25: one impostor may pass; t = 0.7 (#imp >= 0.7 = 1)
    assert float(tar_at_far(gen, imp, 0.25)) == 0.75
    assert float(tar_at_far(gen, imp, 0.5)) == 1.0  # t = 0.3: imp 0.75 and 0.5 accepted
    assert float(tar_at_far(gen, imp, 1.0)) == 1.0
    # all impostors equal: ties are accepted, so far < 1 needs t above them
    imp_eq = torch.full((5,), 0.7, dtype=torch.float64)
    assert float(tar_at_far(gen, imp_eq, 0.99)) == 0.5
    assert float(tar_at_far(gen, imp_eq, 1.0)) == 1.0
    # every genuine at or below the impostors: only +inf meets far 0
    assert float(tar_at_far(torch.tensor([0.2, 0.7], dtype=torch.float64), imp_eq, 0.0)) == 0.0
    point = verification_operating_point(verification_roc(gen, imp_eq), 0.0)
    assert float(point.threshold) == 0.8 and float(point.far) == 0.0


@pytest.mark.parametrize(
    ("gen", "imp", "far", "match"),
    [
        (torch.tensor([]), torch.tensor([0.1]), 0.1, "genuine is empty"),
        (torch.tensor([0.1]), torch.tensor([]), 0.1, "impostor is empty"),
        (torch.tensor([0.1]), torch.tensor([0.2]), 1.5, "far must be in"),
        (torch.tensor([0.1]), torch.tensor([0.2]), -0.1, "far must be in"),
        (torch.tensor([0.1]), torch.tensor([0.2]), math.nan, "far must be in"),
        (torch.tensor([math.nan]), torch.tensor([0.2]), 0.1, "NaN"),
        (torch.tensor([1, 2]), torch.tensor([0.2]), 0.1, "floating point"),
        (torch.zeros(2, 2), torch.tensor([0.2]), 0.1, "1-D"),
    ],
)
def test_bad_input_is_named(gen, imp, far, match):
    with pytest.raises(ValueError, match=match):
        tar_at_far(gen, imp, far)


# ---------------------------------------------------------------------------- classes


def make_pairs(seed: int = 0, n: int = 13):
    g = torch.Generator().manual_seed(seed)
    genuine = torch.randint(2, 9, (n,), generator=g).double()  # one mate per probe
    impostor = torch.randint(0, 7, (n, 3), generator=g).double()  # 3 impostors per probe
    return genuine, impostor


def test_classes_equal_functional_and_drop_padding_duplicates():
    genuine, impostor = make_pairs()
    roc, tar = VerificationROC(), TARAtFAR(far=0.1)
    # uneven batches; the last repeats samples 0 and 5 (DistributedSampler padding) with
    # different scores, which must be ignored (the first record of a sample id is kept)
    batches = [torch.arange(0, 5), torch.arange(5, 11), torch.tensor([11, 12, 0, 5])]
    for idx in batches:
        gen_b, imp_b = genuine[idx].clone(), impostor[idx].clone()
        if idx.shape[0] == 4:
            gen_b[2:] = 100.0
            imp_b[2:] = 100.0
        for m in (roc, tar):
            m.update(gen_b, imp_b, idx)
    want_roc = verification_roc(genuine, impostor.flatten())
    got_roc = roc.compute()
    for a, b in zip(got_roc, want_roc, strict=True):
        assert torch.equal(a, b)
    want = tar_at_far(genuine, impostor.flatten(), 0.1)
    assert torch.equal(tar.compute(), want)
    assert 0 < float(want) < 1
    # keeping the duplicates would have changed the answer
    naive = tar_at_far(torch.cat([genuine, torch.tensor([100.0, 100.0])]), impostor.flatten(), 0.1)
    assert naive != want


def test_classes_take_separate_genuine_and_impostor_batches():
    genuine, impostor = make_pairs(1)
    m = TARAtFAR(far=0.05)
    m.update(genuine[:7], None, torch.arange(7))  # genuine pairs only
    m.update(None, impostor[:, 0], torch.arange(13))  # impostor pairs only, [B]
    m.update(genuine[7:], impostor[:, 1:][7:], torch.arange(7, 13))  # [B] and [B, 2]
    m.update(None, impostor[:7, 1:], torch.arange(7))
    want = tar_at_far(genuine, impostor.flatten(), 0.05)
    assert torch.equal(m.compute(), want)


def test_class_errors():
    with pytest.raises(ValueError, match="far must be in"):
        TARAtFAR(far=2.0)
    m = VerificationROC()
    with pytest.raises(ValueError, match="before any update"), pytest.warns(UserWarning):
        m.compute()
    with pytest.raises(ValueError, match="genuine or impostor"):
        m.update(None, None, torch.arange(2))
    with pytest.raises(ValueError, match="sample_id"):
        m.update(torch.zeros(3), torch.zeros(3), torch.arange(2))
    with pytest.raises(ValueError, match="impostor must be"):
        m.update(torch.zeros(3), torch.zeros(2), torch.arange(3))
    m.update(torch.zeros(3), None, torch.arange(3))
    with pytest.raises(ValueError, match="impostor is empty"):
        m.compute()


def _as_tuple(v):
    return v if isinstance(v, tuple) else (v,)


def test_simulated_two_rank_gather_equals_single_process():
    """torchmetrics syncs by all-gathering every state (rank order) and concatenating. Rank 1
    records what it would contribute; rank 0 then syncs with a gather that returns both
    ranks' tensors, as ``gather_all_tensors`` does. 13 samples over 2 ranks: sample 0 is
    repeated on rank 1 as the sampler's padding."""
    genuine, impostor = make_pairs(2)
    shards = [torch.arange(0, 13, 2), torch.cat([torch.arange(1, 13, 2), torch.tensor([0])])]
    recorded: list[torch.Tensor] = []

    def record(t, group=None):
        recorded.append(t)
        return [t]

    calls = iter(())

    def gather(t, group=None):
        return [t, recorded[next(calls)]]

    def fill(m, idx):
        for part in (idx[:3], idx[3:]):
            m.update(genuine[part], impostor[part], part)

    for make in (VerificationROC, lambda **kw: TARAtFAR(far=0.1, **kw)):
        recorded.clear()
        calls = iter(range(10**6))
        rank1 = make(dist_sync_fn=record, distributed_available_fn=lambda: True)
        fill(rank1, shards[1])
        rank1.compute()
        rank0 = make(dist_sync_fn=gather, distributed_available_fn=lambda: True)
        fill(rank0, shards[0])
        got = rank0.compute()
        single = make()
        fill(single, torch.arange(13))
        want = single.compute()
        assert next(calls) == len(recorded)  # every state was gathered
        for a, b in zip(_as_tuple(got), _as_tuple(want), strict=True):
            assert torch.equal(a, b)
    assert torch.equal(want, tar_at_far(genuine, impostor.flatten(), 0.1))
