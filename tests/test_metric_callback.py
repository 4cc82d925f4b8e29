"""MetricCallback: the torchmetrics classes it keeps per (model, attack, resolution) give the
report's tables exactly, on one process and gathered over two gloo processes.

The rows are drawn at random with ties in the scores, closed-set non-mated queries, open-set
non-mated queries, every objective, a key only one process sees, a key with no mated
search, and a sample that both processes score (DistributedSampler padding). The reference
is ``report.tables.summarize`` on the rows, the report's own definitions.
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crossres.callbacks.metrics import MetricCallback
from crossres.report.tables import summarize
from crossres.store import CLEAN, ResultRow

WORLD = 2
OBJECTIVES = {
    CLEAN: None,
    "CW": "untargeted",
    "JSMA-t": "targeted",
    "DR": "impersonation",
}


def make_rows(seed: int = 5) -> list[ResultRow]:
    g = torch.Generator().manual_seed(seed)

    def randint(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))

    rows = []
    for attack, objective in OBJECTIVES.items():
        params = json.dumps({"class": attack, "objective": objective}) if objective else "{}"
        for res in (16, 0):
            for sid in range(23):
                identity = sid % 7
                closed = not (res == 16 and attack == "CW")  # one key with no mated search
                open_mated = identity < 4
                mate = randint(2, 6) / 4.0  # coarse scores: ties
                # every mate at rank 1 makes FNIR <= 1e-2 reachable, except in one key
                open_rank = 1 + (attack == "DR" and res == 16 and sid == 0)
                clean = identity if randint(0, 5) else (identity + 1) % 7
                rows.append(
                    ResultRow(
                        model="m",
                        attack=attack,
                        sample_id=sid,
                        resolution=res,
                        identity=identity,
                        params=params,
                        success=None if objective is None else bool(randint(0, 2)),
                        target=(identity + 1 + randint(0, 5)) % 7
                        if objective == "targeted"
                        else None,
                        clean_top1=clean,
                        adv_top1=randint(0, 7),
                        mate_rank=randint(1, 4) if closed else 0,
                        mate_score=mate if closed else math.nan,
                        best_nonmate_score=randint(0, 6) / 4.0,
                        open_mated=open_mated,
                        open_mate_rank=open_rank if open_mated else 0,
                        open_mate_score=mate if open_mated else math.nan,
                        open_top_score=randint(0, 6) / 4.0,
                        l2=0.1,
                    )
                )
    # a key only the first process will see
    rows += [
        ResultRow(
            model="m",
            attack=CLEAN,
            sample_id=100 + i,
            resolution=24,
            identity=i,
            mate_rank=1 + i % 2,
            mate_score=0.5,
            best_nonmate_score=0.25,
            open_mated=i < 2,
            open_mate_rank=1 if i < 2 else 0,
            open_mate_score=0.5 if i < 2 else math.nan,
            open_top_score=0.5,
        )
        for i in range(3)
    ]
    return rows


def expected(rows: list[ResultRow]) -> dict[str, float]:
    out = {}
    for c in summarize(rows):
        for name in ("success_rate", "hit_rate", "fpir_at_fnir"):
            value = getattr(c, name)
            if not math.isnan(value):
                out[f"{c.model}/{c.attack}/r{c.resolution}/{name}"] = value
    return out


def shard(rows: list[ResultRow], rank: int) -> list[ResultRow]:
    """Rank r takes the sample ids = r mod 2; sample 22 is also taken by rank 1 (padding)."""
    mine = [r for r in rows if r.sample_id % WORLD == rank and r.resolution != 24]
    if rank == 0:
        mine += [r for r in rows if r.resolution == 24]
    else:
        mine += [r for r in rows if r.sample_id == 22]
    return mine


def run_callback(rows: list[ResultRow]) -> dict[str, float]:
    cb = MetricCallback()
    for start in range(0, len(rows), 10):  # rows arrive a batch at a time
        cb.update(rows[start : start + 10])
    cb.on_test_epoch_end(SimpleNamespace(loggers=[]), None)
    return cb.values


def worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        values = run_callback(shard(make_rows(), rank))
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(values))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_reference_is_not_degenerate():
    truth = expected(make_rows())
    assert "m/CW/r16/hit_rate" not in truth and "m/CW/r0/hit_rate" in truth
    assert "m/clean/r24/fpir_at_fnir" in truth
    for name in ("CW/r0/success_rate", "JSMA-t/r0/success_rate", "DR/r0/success_rate"):
        assert 0 < truth[f"m/{name}"] < 1, name
    assert 0 < truth["m/clean/r0/hit_rate"] < 1
    assert 0 < truth["m/clean/r0/fpir_at_fnir"] < 1 and 0 < truth["m/CW/r16/fpir_at_fnir"] < 1
    assert truth["m/DR/r16/fpir_at_fnir"] == 1.0  # a mate beyond rank 1: never reached
    assert len(truth) == 4 * 2 * 2 + 3 * 2 - 1 + 2  # hit/FPIR, success, less CW@16 hit, r24


def test_one_process_equals_the_report_tables():
    rows = make_rows()
    assert run_callback(rows) == expected(rows)


def test_a_process_seeing_part_of_the_keys_still_gets_the_global_values():
    rows = make_rows()
    local = run_callback(shard(rows, 1))  # no process group: this shard alone
    assert "m/clean/r24/hit_rate" not in local and local != expected(rows)


@pytest.mark.slow
def test_two_gloo_processes_equal_the_report_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    truth = expected(make_rows())
    for rank in range(WORLD):  # every process holds the global values
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == truth
