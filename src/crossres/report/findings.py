"""The paper's three findings, decided on the result store by stated rules.

1. Attack success rises as resolution falls (paper, Section 5.1 and Conclusions).
   Comparisons: per target and attack configuration, attack success at the lowest resolution
   vs the highest, on the queries counted at both (paired).
2. DR hurts identification more than the classification attacks (Section 5.2.1).
   Comparisons: per target, resolution and classification attack (JSMA, CW, EAD: any attack
   whose objective is not a feature objective), rank-1 hit under that attack vs under DR, on
   the mated queries of both. DR = the DR configuration with the largest delta in the run
   (the paper's claim is about what DR reaches within its budget; the report's Figures 2-4
   show the whole sweep).
3. CR is more resilient than Base (Sections 5.1-5.2): per attack configuration and
   resolution, on the queries both targets share, rank-1 hit under attack (CR higher) and
   attack success (CR lower).

Test, for every comparison: the exact one-sided McNemar test on the paired outcomes
(``comparisons.one_sided``: b pairs go the paper's way, c the other way; under "no
difference" each discordant pair goes either way with probability 1/2), in both directions.
The 2m one-sided p-values of a finding's m comparisons are Holm-adjusted together (family-wise
error ``ALPHA`` = 0.05 per finding).

Decision rule (``decide``):
- a comparison is *decidable* when even its most lopsided outcome could be significant at
  this n: 2^-(b + c) < ALPHA / (2m) (Bonferroni's bound, Holm's strictest step); with fewer
  discordant pairs no outcome could decide it;
- **not reproduced**: some comparison is significant (Holm) against the paper's direction;
- **reproduced**: none is significant against, and at least one, and at least half of the
  decidable comparisons, are significant (Holm) in the paper's direction;
- **undecided at this n** otherwise (including: no comparison, or too few decidable ones).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from crossres.metrics.paired import holm
from crossres.report.comparisons import Outcome, base_and_cr, one_sided, pair_outcomes
from crossres.report.tables import FEATURE_OBJECTIVES, hit_outcome, success_outcome
from crossres.store import CLEAN, ResultRow

ALPHA = 0.05
REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
UNDECIDED = "undecided at this n"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, UNDECIDED)


@dataclass
class Comparison:
    """Two paired conditions; ``a`` is the one the paper says has the outcome more often."""

    label: str
    outcome: str  # "success" or "rank-1 hit"
    n: int  # pairs
    rate_a: float
    rate_b: float
    b: int  # a true, b false: pairs that go the paper's way
    c: int  # a false, b true: pairs against it
    p_for: float = math.nan
    p_against: float = math.nan
    p_for_holm: float = math.nan
    p_against_holm: float = math.nan
    decidable: bool = False

    @property
    def significant_for(self) -> bool:
        return self.p_for_holm < ALPHA

    @property
    def significant_against(self) -> bool:
        return self.p_against_holm < ALPHA


@dataclass
class Finding:
    number: int
    title: str
    test: str
    comparisons: list[Comparison] = field(default_factory=list)
    verdict: str = UNDECIDED
    reason: str = ""


def decide(comparisons: Sequence[Comparison], alpha: float = ALPHA) -> tuple[str, str]:
    """Fill in the comparisons' p-values (raw and Holm) and return (verdict, reason) by the
    rule of the module docstring."""
    m = len(comparisons)
    if m == 0:
        return UNDECIDED, "no comparison could be formed from the stored rows"
    raw = []
    for comp in comparisons:
        comp.p_for, comp.p_against = one_sided(comp.b, comp.c), one_sided(comp.c, comp.b)
        comp.decidable = 2.0 ** -(comp.b + comp.c) < alpha / (2 * m)
        raw += [comp.p_for, comp.p_against]
    adjusted = holm(raw)
    for i, comp in enumerate(comparisons):
        comp.p_for_holm, comp.p_against_holm = float(adjusted[2 * i]), float(adjusted[2 * i + 1])
    n_for = sum(c.p_for_holm < alpha for c in comparisons)
    n_against = sum(c.p_against_holm < alpha for c in comparisons)
    n_decidable = sum(c.decidable for c in comparisons)
    counts = (
        f"{n_for} of {m} comparisons significant for the paper, {n_against} against "
        f"(Holm over {2 * m} one-sided tests, alpha {alpha:g}); {n_decidable} decidable at this n"
    )
    if n_against:
        return NOT_REPRODUCED, counts
    if n_for >= 1 and 2 * n_for >= n_decidable:
        return REPRODUCED, counts
    return UNDECIDED, counts


def _compare(
    rows: Sequence[ResultRow],
    label: str,
    a: tuple[str, str, int],
    b: tuple[str, str, int],
    outcome: Outcome,
    outcome_name: str,
) -> Comparison | None:
    x, y = pair_outcomes(rows, a, b, outcome)
    if x.size == 0:
        return None
    return Comparison(
        label=label,
        outcome=outcome_name,
        n=int(x.size),
        rate_a=float(x.mean()),
        rate_b=float(y.mean()),
        b=int((x & ~y).sum()),
        c=int((~x & y).sum()),
    )


def _objective(rows: Sequence[ResultRow], attack: str) -> str:
    for r in rows:
        if r.attack == attack:
            return str(json.loads(r.params).get("objective", "untargeted"))
    raise KeyError(attack)


def _order(res: int) -> float:
    return res if res > 0 else math.inf


def resolution_finding(rows: Sequence[ResultRow]) -> Finding:
    finding = Finding(
        1,
        "Attack success rises as resolution falls",
        "per target and attack: success at the lowest vs the highest resolution on the same "
        "queries, exact one-sided McNemar (lowest more often successful)",
    )
    for model in sorted({r.model for r in rows}):
        attacks = dict.fromkeys(r.attack for r in rows if r.model == model and r.attack != CLEAN)
        for attack in attacks:
            res = sorted({r.resolution for r in rows if (r.model, r.attack) == (model, attack)})
            res.sort(key=_order)
            if len(res) < 2:
                continue
            low, high = res[0], res[-1]
            comp = _compare(
                rows,
                f"{model}, {attack}: {low} px vs {high or 'orig'} px",
                (model, attack, low),
                (model, attack, high),
                success_outcome,
                "success",
            )
            if comp is not None:
                finding.comparisons.append(comp)
    finding.verdict, finding.reason = decide(finding.comparisons)
    return finding


def strongest_dr(rows: Sequence[ResultRow]) -> str | None:
    """The feature-objective (DR) configuration with the largest delta (epsilon)."""
    best: tuple[float, str] | None = None
    for attack in dict.fromkeys(r.attack for r in rows if r.attack != CLEAN):
        params = json.loads(next(r.params for r in rows if r.attack == attack))
        if params.get("objective") in FEATURE_OBJECTIVES:
            eps = float(params.get("epsilon", math.nan))
            if best is None or (not math.isnan(eps) and eps > best[0]):
                best = (eps, attack)
    return None if best is None else best[1]


def dr_finding(rows: Sequence[ResultRow]) -> Finding:
    dr = strongest_dr(rows)
    finding = Finding(
        2,
        "DR hurts identification more than the classification attacks",
        f"per target, resolution and classification attack: rank-1 hit under that attack vs "
        f"under {dr or 'DR'} on the same mated queries, exact one-sided McNemar (hit more "
        "often under the classification attack)",
    )
    if dr is not None:
        classification = [
            a
            for a in dict.fromkeys(r.attack for r in rows if r.attack != CLEAN)
            if _objective(rows, a) not in FEATURE_OBJECTIVES
        ]
        for model in sorted({r.model for r in rows}):
            res = sorted({r.resolution for r in rows if r.model == model}, key=_order)
            for attack in classification:
                for r in res:
                    comp = _compare(
                        rows,
                        f"{model} {r or 'orig'} px: {attack} vs {dr}",
                        (model, attack, r),
                        (model, dr, r),
                        hit_outcome,
                        "rank-1 hit",
                    )
                    if comp is not None:
                        finding.comparisons.append(comp)
    finding.verdict, finding.reason = decide(finding.comparisons)
    return finding


def cr_finding(rows: Sequence[ResultRow]) -> Finding:
    pair = base_and_cr(r.model for r in rows)
    finding = Finding(
        3,
        "CR is more resilient than Base",
        "per attack and resolution, on the queries both targets share: rank-1 hit under "
        "attack (CR more often) and attack success (Base more often), exact one-sided McNemar",
    )
    if pair is not None:
        base, cr = pair
        attacks = dict.fromkeys(r.attack for r in rows if r.attack != CLEAN)
        res = sorted({r.resolution for r in rows}, key=_order)
        for attack in attacks:
            for r in res:
                for comp in (
                    _compare(
                        rows,
                        f"{attack} {r or 'orig'} px: {cr} vs {base} hit",
                        (cr, attack, r),
                        (base, attack, r),
                        hit_outcome,
                        "rank-1 hit",
                    ),
                    _compare(
                        rows,
                        f"{attack} {r or 'orig'} px: {base} vs {cr} success",
                        (base, attack, r),
                        (cr, attack, r),
                        success_outcome,
                        "success",
                    ),
                ):
                    if comp is not None:
                        finding.comparisons.append(comp)
    finding.verdict, finding.reason = decide(finding.comparisons)
    return finding


def findings(rows: Sequence[ResultRow]) -> list[Finding]:
    """The three findings, in the paper's order, each decided."""
    rows = list(rows)
    return [resolution_finding(rows), dr_finding(rows), cr_finding(rows)]


__all__ = [
    "ALPHA",
    "NOT_REPRODUCED",
    "REPRODUCED",
    "UNDECIDED",
    "VERDICTS",
    "Comparison",
    "Finding",
    "cr_finding",
    "decide",
    "dr_finding",
    "findings",
    "resolution_finding",
    "strongest_dr",
]
