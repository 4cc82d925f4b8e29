"""The paper's numbers as views of the result store, each with its n and a 95 % interval.

For every (model, attack configuration, resolution): attack success rate (Table 1), hit rate
= CMC at rank 1 (Table 2) and open-set FPIR at FNIR = 1e-2 (Table 3), computed by the
definitions in ``crossres.metrics.functional`` from the per-sample rows.

Intervals (``crossres.metrics.intervals``): success and hit rates are binomial over the
cell's queries (``success_n`` / ``hit_n`` of them count), so they get the Wilson score
interval; FPIR@FNIR and the mean perturbation norms are not binomial, so they get a
percentile bootstrap over identities (the rows' ``identity`` column as clusters; FPIR@FNIR
stratified into mated and non-mated searches), ``N_RESAMPLES`` resamples, seed ``SEED``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from crossres.metrics import functional as F
from crossres.metrics.intervals import (
    bootstrap_fpir_at_fnir_interval,
    bootstrap_mean_interval,
    wilson_interval,
)
from crossres.store import CLEAN, ResultRow

TARGET_FNIR = 1e-2
CONFIDENCE = 0.95
N_RESAMPLES = 1000  # bootstrap resamples per interval (>= 1000: the 2.5% tails rest on 25 each)
SEED = 0  # every bootstrap interval of a report uses this seed: rerunning gives the same text
FEATURE_OBJECTIVES = ("impersonation", "dodging")
NORMS = ("l2", "l0", "linf")
Interval = tuple[float, float]
NAN_INTERVAL: Interval = (math.nan, math.nan)


@dataclass
class Cell:
    """One (model, attack, resolution) of the tables."""

    model: str
    attack: str
    resolution: int
    params: dict
    n: int
    success_rate: float  # NaN for clean rows
    hit_rate: float
    cmc: list[float]
    fpir_at_fnir: float
    mean_l2: float
    mean_linf: float
    mean_iterations: float
    seconds_per_sample: float
    # counts and 95 % intervals (module docstring); n = how many queries the rate rests on
    success_k: int = 0
    success_n: int = 0
    success_ci: Interval = NAN_INTERVAL
    hit_k: int = 0
    hit_n: int = 0
    hit_ci: Interval = NAN_INTERVAL
    n_mated: int = 0  # open-set mated searches
    n_nonmated: int = 0  # open-set non-mated searches
    fpir_ci: Interval = NAN_INTERVAL
    mean_l0: float = math.nan
    norm_ci: dict[str, Interval] = field(default_factory=dict)  # "l2"/"l0"/"linf" -> interval


def success_outcome(row: ResultRow) -> bool | None:
    """One attacked query's outcome as Table 1 counts it; None when it does not count.

    Feature objectives (DR): every query counts and its success flag is the outcome.
    Classification objectives: only queries the model classifies correctly when clean count
    (the paper's definition, ``functional.attack_success_rate``); untargeted success = the
    adversarial prediction leaves the label, targeted = it reaches the target.
    """
    if row.attack == CLEAN:
        return None
    objective = json.loads(row.params).get("objective")
    if objective in FEATURE_OBJECTIVES:
        return bool(row.success)
    if row.clean_top1 != row.identity:
        return None
    if objective == "targeted":
        return row.adv_top1 == row.target
    return row.adv_top1 != row.identity


def hit_outcome(row: ResultRow) -> bool | None:
    """Rank-1 hit of a closed-set mated search (CMC(1)); None for searches without a mate."""
    return None if row.mate_rank <= 0 else row.mate_rank == 1


def counts(outcomes: Iterable[bool | None]) -> tuple[int, int]:
    """(successes, n) over the outcomes that count (not None)."""
    kept = [o for o in outcomes if o is not None]
    return sum(kept), len(kept)


def wilson(k: int, n: int) -> Interval:
    return NAN_INTERVAL if n == 0 else wilson_interval(k, n, CONFIDENCE)


def fpir_interval(rows: list[ResultRow]) -> Interval:
    """Bootstrap (identities, stratified mated / non-mated) interval of FPIR@FNIR."""
    mated = [r for r in rows if r.open_mated]
    nonmated = [r for r in rows if not r.open_mated]
    if not mated or not nonmated:
        return NAN_INTERVAL
    return bootstrap_fpir_at_fnir_interval(
        np.array([r.open_mate_rank for r in mated]),
        np.array([r.open_mate_score for r in mated], dtype=np.float64),
        np.array([r.open_top_score for r in nonmated], dtype=np.float64),
        target_fnir=TARGET_FNIR,
        mated_groups=np.array([r.identity for r in mated]),
        nonmated_groups=np.array([r.identity for r in nonmated]),
        n_resamples=N_RESAMPLES,
        confidence=CONFIDENCE,
        seed=SEED,
    )


def norm_intervals(rows: list[ResultRow]) -> dict[str, Interval]:
    """Bootstrap (identities) intervals of the mean L2, L0 and Linf, from the same resamples."""
    if not rows:
        return {}
    values = np.array([[getattr(r, k) for k in NORMS] for r in rows], dtype=np.float64)
    low, high = bootstrap_mean_interval(
        values,
        groups=np.array([r.identity for r in rows]),
        n_resamples=N_RESAMPLES,
        confidence=CONFIDENCE,
        seed=SEED,
    )
    return {k: (float(lo), float(hi)) for k, lo, hi in zip(NORMS, low, high, strict=True)}


def attack_success(rows: list[ResultRow], clean: dict[tuple, ResultRow]) -> float:
    """Classification objectives: the paper's definition (correctly classified clean samples
    only). Feature objectives (DR): share of searches the k-NN assigns to the goal."""
    params = json.loads(rows[0].params)
    if params.get("objective") in ("impersonation", "dodging"):
        return sum(bool(r.success) for r in rows) / len(rows)
    clean_pred = torch.tensor([r.clean_top1 for r in rows])
    adv_pred = torch.tensor([r.adv_top1 for r in rows])
    labels = torch.tensor([r.identity for r in rows])
    if params.get("objective") == "targeted":
        targets = torch.tensor([r.target for r in rows])
        return float(F.attack_success_rate(clean_pred, adv_pred, labels, targets=targets))
    return float(F.attack_success_rate(clean_pred, adv_pred, labels))


def open_set_fpir(rows: list[ResultRow]) -> float:
    mated = [r for r in rows if r.open_mated]
    nonmated = [r for r in rows if not r.open_mated]
    if not mated or not nonmated:
        return math.nan
    return float(
        F.fpir_at_fnir_from_summary(
            torch.tensor([r.open_mate_rank for r in mated]),
            torch.tensor([r.open_mate_score for r in mated], dtype=torch.float64),
            torch.tensor([r.open_top_score for r in nonmated], dtype=torch.float64),
            target_fnir=TARGET_FNIR,
        )
    )


def det_curve(rows: list[ResultRow]) -> F.DetCurve | None:
    mated = [r for r in rows if r.open_mated]
    nonmated = [r for r in rows if not r.open_mated]
    if not mated or not nonmated:
        return None
    return F.det_curve_from_summary(
        torch.tensor([r.open_mate_rank for r in mated]),
        torch.tensor([r.open_mate_score for r in mated], dtype=torch.float64),
        torch.tensor([r.open_top_score for r in nonmated], dtype=torch.float64),
    )


def cmc_curve(rows: list[ResultRow], max_rank: int = 10) -> list[float]:
    ranks = torch.tensor([r.mate_rank for r in rows if r.mate_rank > 0])
    return F.cmc_from_ranks(ranks, max_rank).tolist() if len(ranks) else []


def group(rows: Iterable[ResultRow]) -> dict[tuple[str, str, int], list[ResultRow]]:
    groups: dict[tuple, list[ResultRow]] = defaultdict(list)
    for r in rows:
        groups[(r.model, r.attack, r.resolution)].append(r)
    return groups


def summarize(rows: Iterable[ResultRow], *, max_rank: int = 10) -> list[Cell]:
    rows = list(rows)
    clean = {(r.model, r.sample_id, r.resolution): r for r in rows if r.attack == CLEAN}
    cells = []
    for (model, attack, res), members in sorted(group(rows).items(), key=_order):
        is_clean = attack == CLEAN
        cmc = cmc_curve(members, max_rank)
        sk, sn = counts(success_outcome(r) for r in members)
        hk, hn = counts(hit_outcome(r) for r in members)
        n_mated = sum(1 for r in members if r.open_mated)
        cells.append(
            Cell(
                model=model,
                attack=attack,
                resolution=res,
                params=json.loads(members[0].params),
                n=len(members),
                success_rate=math.nan if is_clean else attack_success(members, clean),
                hit_rate=cmc[0] if cmc else math.nan,
                cmc=cmc,
                fpir_at_fnir=open_set_fpir(members),
                mean_l2=_mean(r.l2 for r in members),
                mean_linf=_mean(r.linf for r in members),
                mean_iterations=_mean(r.iterations for r in members),
                seconds_per_sample=_mean(r.seconds for r in members),
                success_k=sk,
                success_n=sn,
                success_ci=wilson(sk, sn),
                hit_k=hk,
                hit_n=hn,
                hit_ci=wilson(hk, hn),
                n_mated=n_mated,
                n_nonmated=len(members) - n_mated,
                fpir_ci=fpir_interval(members),
                mean_l0=_mean(r.l0 for r in members),
                norm_ci={} if is_clean else norm_intervals(members),
            )
        )
    return cells


def _order(item) -> tuple:
    (model, attack, res), _ = item
    return (model, attack != CLEAN, attack, res)


def _mean(values: Iterable[float]) -> float:
    v = list(values)
    return sum(v) / len(v) if v else math.nan
