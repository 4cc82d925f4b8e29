"""The Base vs CR table and the paper's findings on hand-made stores: every verdict of every
decision rule is reached by a store built for it, p-values are the exact binomial tails
computed by hand, and ``crossres report`` ends with the findings."""

from __future__ import annotations

import json

import pytest

from crossres.cli import main
from crossres.metrics import holm, mcnemar_exact
from crossres.report.comparisons import one_sided, pair_outcomes, paired_table
from crossres.report.findings import (
    NOT_REPRODUCED,
    REPRODUCED,
    UNDECIDED,
    Comparison,
    cr_finding,
    decide,
    dr_finding,
    resolution_finding,
)
from crossres.report.tables import hit_outcome, success_outcome
from crossres.store import CLEAN, ResultRow, ResultStore

DR = json.dumps({"class": "DeepRepresentation", "objective": "impersonation", "epsilon": 0.03})
CW = json.dumps({"class": "CarliniWagnerL2", "objective": "untargeted"})


def rows_for(spec: dict[tuple[str, str, int], list[tuple[bool, bool]]]) -> list[ResultRow]:
    """Rows from (model, attack, resolution) -> per query (success, rank-1 hit); query i is
    of identity i // 2, classified correctly when clean (so every success counts); attack
    "DR" is a feature attack, any other a classification one; a clean row per query too."""
    rows, seen = [], set()
    for (model, attack, res), outcomes in spec.items():
        for sid, (success, hit) in enumerate(outcomes):
            ident = sid // 2
            common = dict(
                model=model,
                sample_id=sid,
                resolution=res,
                identity=ident,
                clean_top1=ident,
                open_mated=True,
                open_mate_rank=1,
                open_mate_score=0.5,
                open_top_score=0.5,
            )
            if (model, sid, res) not in seen:
                seen.add((model, sid, res))
                rows.append(ResultRow(attack=CLEAN, mate_rank=1, **common))
            rows.append(
                ResultRow(
                    attack=attack,
                    params=DR if attack.startswith("DR") else CW,
                    success=success,
                    adv_top1=ident + 1000 if success else ident,
                    mate_rank=1 if hit else 2,
                    **common,
                )
            )
    return rows


def n_of(k: int, n: int, value: bool = True) -> list[bool]:
    return [value] * k + [not value] * (n - k)


def test_one_sided_is_the_exact_binomial_tail():
    assert one_sided(3, 0) == 1 / 8  # P(X >= 3), X ~ Bin(3, 1/2)
    assert one_sided(0, 3) == 1.0
    assert one_sided(4, 1) == (1 + 5) / 32  # P(X >= 4), X ~ Bin(5, 1/2)
    assert one_sided(0, 0) == 1.0
    for b, c in [(7, 2), (2, 7), (5, 5), (12, 0)]:
        assert min(1.0, 2 * min(one_sided(b, c), one_sided(c, b))) == pytest.approx(
            mcnemar_exact(b, c), rel=1e-12
        )
    with pytest.raises(ValueError, match="discordant"):
        one_sided(-1, 2)


def test_pairs_only_queries_counted_on_both():
    rows = rows_for(
        {("Base", "CW", 16): [(True, False)] * 4, ("CR", "CW", 16): [(False, True)] * 3}
    )
    # query 1 is misclassified on CR when clean: its success does not count there
    for r in rows:
        if r.model == "CR" and r.sample_id == 1:
            r.clean_top1 = 99
    x, y = pair_outcomes(rows, ("Base", "CW", 16), ("CR", "CW", 16), success_outcome)
    assert x.tolist() == [True, True] and y.tolist() == [False, False]  # queries 0 and 2
    x, y = pair_outcomes(rows, ("Base", "CW", 16), ("CR", "CW", 16), hit_outcome)
    assert len(x) == 3  # hits count on every mated query


def test_base_vs_cr_table_mcnemar_and_holm():
    # success at 16 px: Base 9/10, CR 1/10 -> b = 8, c = 0; at 64 px: b = 2, c = 1
    spec = {
        ("Base", "CW", 16): [(s, False) for s in n_of(9, 10)],
        ("CR", "CW", 16): [(s, False) for s in n_of(1, 10)],
        ("Base", "CW", 64): [(s, False) for s in [True, True, False, True]],
        ("CR", "CW", 64): [(s, False) for s in [False, False, True, True]],
    }
    table = paired_table(
        rows_for(spec), "Base", "CR", success_outcome, attacks=["CW"], resolutions=[16, 64]
    )
    first, second = table
    assert (first.n, first.b, first.c) == (10, 8, 0)
    assert first.pvalue == 2 / 2**8  # both tails of Bin(8, 1/2) at 0
    assert first.difference == pytest.approx(-0.8)
    assert first.difference_ci[0] <= -0.8 <= first.difference_ci[1]
    assert (second.b, second.c) == (2, 1) and second.pvalue == 1.0
    assert [first.pvalue_holm, second.pvalue_holm] == holm([first.pvalue, second.pvalue]).tolist()


# ------------------------------------------------------------------------ decision rule


def test_decide_rule_on_hand_counts():
    big_for = Comparison("a", "success", 20, 1.0, 0.0, b=20, c=0)
    big_against = Comparison("b", "success", 20, 0.0, 1.0, b=0, c=20)
    tiny = Comparison("c", "success", 3, 1.0, 0.0, b=3, c=0)  # 2^-3 > alpha / 4: undecidable
    assert decide([big_for, tiny])[0] == REPRODUCED
    assert not tiny.decidable and big_for.decidable
    assert big_for.p_for == 2.0**-20 and big_for.p_for_holm == 4 * 2.0**-20
    assert decide([big_for, big_against])[0] == NOT_REPRODUCED
    assert decide([tiny])[0] == UNDECIDED
    assert decide([])[0] == UNDECIDED
    # half the decidable comparisons are needed: 1 significant of 3 decidable is not enough
    null = [Comparison(str(i), "success", 20, 0.5, 0.5, b=10, c=10) for i in range(2)]
    assert decide([big_for, *null])[0] == UNDECIDED
    assert decide([big_for, null[0]])[0] == REPRODUCED


@pytest.mark.parametrize(
    ("low", "high", "verdict"),
    [(20, 0, REPRODUCED), (0, 20, NOT_REPRODUCED), (10, 10, UNDECIDED)],
)
def test_finding_1_resolution(low, high, verdict):
    spec = {
        ("Base", "DR", 16): [(s, False) for s in n_of(low, 20)],
        ("Base", "DR", 64): [(s, False) for s in n_of(high, 20)],
    }
    f = resolution_finding(rows_for(spec))
    assert f.verdict == verdict
    (comp,) = f.comparisons
    assert (comp.n, comp.rate_a, comp.rate_b) == (20, low / 20, high / 20)


def test_finding_1_small_n_is_undecided():
    spec = {("Base", "DR", 16): [(True, False)] * 3, ("Base", "DR", 64): [(False, False)] * 3}
    assert resolution_finding(rows_for(spec)).verdict == UNDECIDED


@pytest.mark.parametrize(
    ("cw_hits", "dr_hits", "verdict"),
    [(20, 0, REPRODUCED), (0, 20, NOT_REPRODUCED), (5, 5, UNDECIDED)],
)
def test_finding_2_dr_vs_classification(cw_hits, dr_hits, verdict):
    spec = {
        ("Base", "CW", 16): [(True, h) for h in n_of(cw_hits, 20)],
        ("Base", "DR (8)", 16): [(True, h) for h in n_of(dr_hits, 20)],
    }
    f = dr_finding(rows_for(spec))
    assert f.verdict == verdict
    assert [c.label for c in f.comparisons] == ["Base 16 px: CW vs DR (8)"]


@pytest.mark.parametrize(
    ("cr_hits", "base_hits", "verdict"),
    [(20, 0, REPRODUCED), (0, 20, NOT_REPRODUCED), (7, 7, UNDECIDED)],
)
def test_finding_3_cr_resilience(cr_hits, base_hits, verdict):
    # success identical on both targets: only the hits can decide
    spec = {
        ("Base", "DR", 16): [(True, h) for h in n_of(base_hits, 20)],
        ("CR", "DR", 16): [(True, h) for h in n_of(cr_hits, 20)],
    }
    f = cr_finding(rows_for(spec))
    assert f.verdict == verdict
    assert {c.outcome for c in f.comparisons} == {"rank-1 hit", "success"}


def test_report_command_ends_with_the_findings(tmp_path, capsys):
    spec = {
        ("Base", "CW", 16): [(s, h) for s, h in zip(n_of(20, 20), n_of(10, 20), strict=True)],
        ("Base", "CW", 64): [(s, True) for s in n_of(2, 20)],
        ("Base", "DR", 16): [(True, False)] * 20,
        ("Base", "DR", 64): [(True, False)] * 20,
        ("CR", "CW", 16): [(s, True) for s in n_of(15, 20)],
        ("CR", "CW", 64): [(s, True) for s in n_of(2, 20)],
        ("CR", "DR", 16): [(True, False)] * 20,
        ("CR", "DR", 64): [(True, False)] * 20,
    }
    ResultStore(tmp_path).writer(0).write(rows_for(spec))
    assert main(["report", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    findings = text.split("## Findings of the paper", 1)[1]
    assert "\n## " not in findings  # the last section
    verdicts = [
        line.rsplit("**", 2)[1] for line in findings.splitlines() if line.startswith("### Finding")
    ]
    assert len(verdicts) == 3 and all(
        v in (REPRODUCED, NOT_REPRODUCED, UNDECIDED) for v in verdicts
    )
    assert verdicts[0] == REPRODUCED  # CW: 20/20 vs 2/20 on both targets
    assert "## Base vs CR (paired)" in text
