"""The paper's numbers as views of the result store.

For every (model, attack configuration, resolution): attack success rate (Table 1), hit rate
= CMC at rank 1 (Table 2) and open-set FPIR at FNIR = 1e-2 (Table 3), computed by the
definitions in ``crossres.metrics.functional`` from the per-sample rows.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from crossres.metrics import functional as F
from crossres.store import CLEAN, ResultRow

TARGET_FNIR = 1e-2


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
            )
        )
    return cells


def _order(item) -> tuple:
    (model, attack, res), _ = item
    return (model, attack != CLEAN, attack, res)


def _mean(values: Iterable[float]) -> float:
    v = list(values)
    return sum(v) / len(v) if v else math.nan
