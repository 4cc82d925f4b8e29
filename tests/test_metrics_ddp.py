"""Two gloo processes give exactly the single-process values, padding duplicates included.

Each process takes its shard from a real ``DistributedSampler`` (23 samples over 2 ranks:
one sample is repeated to even the shards), updates every metric in uneven batches, and
computes; torchmetrics gathers the per-sample states and the classes drop the repeat.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from crossres.metrics import CMC, AttackSuccessRate, DETCurve, FPIRAtFNIR, HitRate
from crossres.metrics import functional as MF

N, WORLD = 23, 2


def make_data():
    g = torch.Generator().manual_seed(11)
    gids = torch.randperm(40, generator=g)[:8]
    scores = torch.randint(0, 6, (N, 8), generator=g).float()  # ties
    pids = gids[torch.randint(0, 8, (N,), generator=g)]
    pids[torch.randperm(N, generator=g)[:7]] = 100 + torch.arange(7)  # non-mated searches
    is_mate = pids[:, None] == gids[None, :]
    mate_score = torch.randint(4, 10, (N, 1), generator=g).float()  # signal, ties remain
    scores = torch.where(is_mate, mate_score, scores)
    labels = torch.randint(0, 6, (N,), generator=g)
    clean = torch.where(torch.rand(N, generator=g) < 0.8, labels, (labels + 1) % 6)
    adv = torch.where(
        torch.rand(N, generator=g) < 0.4, labels, torch.randint(0, 6, (N,), generator=g)
    )
    targets = (labels + 1 + torch.randint(0, 5, (N,), generator=g)) % 6
    return scores, pids, gids, labels, clean, adv, targets


def new_metrics():
    return {
        "cmc": CMC(max_rank=5),
        "hit": HitRate(),
        "fpir": FPIRAtFNIR(target_fnir=0.2, rank=2),
        "fpir1": FPIRAtFNIR(target_fnir=0.2),
        "unreached": FPIRAtFNIR(target_fnir=0.01),
        "det": DETCurve(rank=1),
        "asr": AttackSuccessRate(),
        "asr_t": AttackSuccessRate(targeted=True),
    }


def update(metrics, index: torch.Tensor, data) -> None:
    scores, pids, gids, labels, clean, adv, targets = data
    for start, size in zip((0, 5, 7), (5, 2, 100), strict=True):  # uneven batches
        i = index[start : start + size]
        mated = torch.isin(pids[i], gids)
        for name in ("cmc", "hit"):
            metrics[name].update(scores[i][mated], pids[i][mated], gids, i[mated])
        for name in ("fpir", "fpir1", "unreached", "det"):
            metrics[name].update(scores[i], pids[i], gids, i)
        metrics["asr"].update(clean[i], adv[i], labels[i], i)
        metrics["asr_t"].update(clean[i], adv[i], labels[i], i, targets[i])


def _plain(value):
    return tuple(value) if isinstance(value, tuple) else value  # DetCurve -> tuple


def worker(rank: int, port: int, out: str) -> None:
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        sampler = DistributedSampler(range(N), num_replicas=WORLD, rank=rank, shuffle=True, seed=3)
        index = torch.tensor(list(sampler))
        metrics = new_metrics()
        update(metrics, index, make_data())
        torch.save(
            {"index": index, **{k: _plain(m.compute()) for k, m in metrics.items()}},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same(a, b) -> None:
    if isinstance(a, tuple):
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a.dtype == b.dtype and torch.equal(a, b), (a, b)


def test_two_gloo_processes_equal_single_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the children share 2 cores
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    seen = torch.cat([r["index"] for r in results])
    assert seen.numel() == 24 and seen.unique().numel() == N  # one padding duplicate

    data = make_data()
    scores, pids, gids, labels, clean, adv, targets = data
    mated = torch.isin(pids, gids)
    args = (scores[mated], pids[mated], scores[~mated], gids)
    truth = {
        "cmc": MF.cmc(scores[mated], pids[mated], gids, 5),
        "fpir": MF.fpir_at_fnir(*args, target_fnir=0.2, rank=2),
        "fpir1": MF.fpir_at_fnir(*args, target_fnir=0.2),
        "unreached": MF.fpir_at_fnir(*args, target_fnir=0.01),
        "det": MF.det_curve(*args, rank=1),
        "asr": MF.attack_success_rate(clean, adv, labels),
        "asr_t": MF.attack_success_rate(clean, adv, labels, targets=targets),
    }
    truth["hit"] = truth["cmc"][0]
    single = new_metrics()
    update(single, torch.arange(N), data)
    for name, value in truth.items():
        assert_same(single[name].compute(), value)
        for r in results:  # every rank computes the same, global value
            assert_same(r[name], value)
    # the case is not degenerate: the duplicate and the mixed batches matter
    for name in ("hit", "fpir", "fpir1", "asr", "asr_t"):
        assert 0 < float(truth[name]) < 1, name
    assert float(truth["unreached"]) == 1.0
    # and keeping the padding duplicate would have changed the answer
    m = torch.isin(pids[seen], gids)
    naive_cmc = MF.cmc(scores[seen][m], pids[seen][m], gids, 5)
    naive_asr = MF.attack_success_rate(clean[seen], adv[seen], labels[seen])
    assert not torch.equal(naive_cmc, truth["cmc"]) or naive_asr != truth["asr"]
