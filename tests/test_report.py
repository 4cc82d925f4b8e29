"""Report rendering from a store whose rows are written by hand: the tables must show the
numbers the published definitions give for those rows."""

import json
import math
import re

import numpy as np
import pytest
import torch

from crossres.metrics import (
    bootstrap_fpir_at_fnir_interval,
    bootstrap_mean_interval,
    wilson_interval,
)
from crossres.report.markdown import write_report
from crossres.report.tables import N_RESAMPLES, SEED, TARGET_FNIR, summarize
from crossres.store import CLEAN, ResultRow, ResultStore


def make_rows():
    rows = []
    # 4 queries of identities 0..3 at 16 px; identity 3 is non-mated in the open set
    clean_top1 = {0: 0, 1: 1, 2: 9, 3: 3}  # query 2 is misclassified when clean
    for sid in range(4):
        rows.append(
            ResultRow(
                model="base",
                attack=CLEAN,
                sample_id=sid,
                resolution=16,
                identity=sid,
                clean_top1=clean_top1[sid],
                mate_rank=1 if sid != 1 else 3,
                mate_score=0.9,
                best_nonmate_score=0.5,
                open_mated=sid != 3,
                open_mate_rank=0 if sid == 3 else 1,
                open_mate_score=math.nan if sid == 3 else 0.8 + 0.01 * sid,
                open_top_score=0.7 if sid == 3 else 0.8 + 0.01 * sid,
            )
        )
    params = json.dumps({"class": "CarliniWagnerL2", "objective": "untargeted"})
    adv_top1 = {0: 5, 1: 1, 2: 9, 3: 7}  # succeeds on 0 and 3 of the correctly classified 0,1,3
    for sid in range(4):
        rows.append(
            ResultRow(
                model="base",
                attack="CW",
                sample_id=sid,
                resolution=16,
                identity=sid,
                params=params,
                success=adv_top1[sid] != sid,
                clean_top1=clean_top1[sid],
                adv_top1=adv_top1[sid],
                l2=0.5,
                mate_rank=2,
                mate_score=0.4,
                open_mated=sid != 3,
                open_mate_rank=0 if sid == 3 else 2,
                open_mate_score=math.nan if sid == 3 else 0.4,
                open_top_score=0.6,
            )
        )
    return rows


def test_tables_follow_the_definitions(tmp_path):
    ResultStore(tmp_path).writer(0).write(make_rows())
    cells = {(c.attack, c.resolution): c for c in summarize(ResultStore(tmp_path).rows())}
    clean, cw = cells[(CLEAN, 16)], cells[("CW", 16)]
    assert clean.n == cw.n == 4
    assert math.isnan(clean.success_rate)
    assert cw.success_rate == pytest.approx(2 / 3)  # 2 of the 3 correctly classified
    assert clean.hit_rate == pytest.approx(3 / 4)  # query 1 ranked 3rd
    assert cw.hit_rate == 0.0
    # clean open set: mates score 0.80, 0.81, 0.82 at rank 1; the non-mate's top is 0.70.
    # FNIR <= 1e-2 needs T <= 0.80, where the non-mate (0.70 >= T) still alarms unless
    # T > 0.70: T = 0.80 gives FPIR 0.
    assert clean.fpir_at_fnir == 0.0
    # attacked: every mate at rank 2 -> FNIR = 1 at rank 1 for any T: unreachable -> 1.0
    assert cw.fpir_at_fnir == 1.0


def test_report_renders_tables_and_figures(tmp_path):
    ResultStore(tmp_path).writer(0).write(make_rows())
    text = write_report(tmp_path).read_text()
    assert f"| CW | 66.7 [{pct(wilson_interval(2, 3)[0])}, " in text  # Table 1
    assert f"| clean | 75.0 [{pct(wilson_interval(3, 4)[0])}, " in text  # Table 2
    assert (tmp_path / "figures" / "det_base_r16.png").stat().st_size > 0
    assert (tmp_path / "figures" / "cmc_base_r16.png").stat().st_size > 0


def test_store_merges_processes_and_drops_duplicates(tmp_path):
    store = ResultStore(tmp_path)
    rows = make_rows()
    store.writer(0).write(rows[:5])
    store.writer(1).write(rows[3:])  # row 3 and 4 written by both (DDP padding)
    merged = store.rows()
    assert len(merged) == len(rows)
    assert len({r.key for r in merged}) == len(rows)
    assert store.done_keys() == {r.key for r in rows}


# ------------------------------------------------------------------ intervals and n per cell

CELL = re.compile(r"^(-?\d+\.\d) \[(-?\d+\.\d), (-?\d+\.\d)\]")


def pct(x: float) -> str:
    return f"{100 * x + 0.0:.1f}"


def table_rows(text: str, title: str) -> tuple[list[str], dict[str, list[str]]]:
    """Header cells and body rows (attack -> cells) of the markdown table under ``title``."""
    block = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return cells[0], {row[0]: row[1:] for row in cells[2:]}


def test_cells_carry_wilson_and_bootstrap_intervals(tmp_path):
    ResultStore(tmp_path).writer(0).write(make_rows())
    cells = {(c.attack, c.resolution): c for c in summarize(ResultStore(tmp_path).rows())}
    clean, cw = cells[(CLEAN, 16)], cells[("CW", 16)]
    assert (cw.success_k, cw.success_n) == (2, 3)
    assert cw.success_ci == wilson_interval(2, 3)
    assert (clean.hit_k, clean.hit_n) == (3, 4)
    assert clean.hit_ci == wilson_interval(3, 4)
    rows = [r for r in make_rows() if r.attack == CLEAN]
    mated = [r for r in rows if r.open_mated]
    nonmated = [r for r in rows if not r.open_mated]
    expected = bootstrap_fpir_at_fnir_interval(
        np.array([r.open_mate_rank for r in mated]),
        np.array([r.open_mate_score for r in mated]),
        np.array([r.open_top_score for r in nonmated]),
        target_fnir=TARGET_FNIR,
        mated_groups=np.array([r.identity for r in mated]),
        nonmated_groups=np.array([r.identity for r in nonmated]),
        n_resamples=N_RESAMPLES,
        seed=SEED,
    )
    assert clean.fpir_ci == expected
    assert (clean.n_mated, clean.n_nonmated) == (3, 1)


def varied_rows(n: int = 24) -> list[ResultRow]:
    """``n`` queries of n / 3 identities at two resolutions, clean and a DR-like attack whose
    norms, success and rank vary from query to query."""
    rng = np.random.default_rng(1)
    params = json.dumps(
        {
            "class": "DeepRepresentation",
            "objective": "impersonation",
            "epsilon": 4 / 255,
            "steps": 10,
        }
    )
    rows = []
    for res in (16, 64):
        for sid in range(n):
            ident = sid // 3
            common = dict(
                model="base",
                sample_id=sid,
                resolution=res,
                identity=ident,
                clean_top1=ident,
                mate_score=0.5,
                open_mated=ident % 2 == 0,
                open_mate_rank=1 if ident % 2 == 0 else 0,
                open_mate_score=float(rng.uniform()) if ident % 2 == 0 else math.nan,
                open_top_score=float(rng.uniform()),
            )
            rows.append(ResultRow(attack=CLEAN, mate_rank=1 + int(rng.integers(0, 2)), **common))
            rows.append(
                ResultRow(
                    attack="DR (4-10)",
                    params=params,
                    success=bool(rng.integers(0, 2)),
                    l2=float(rng.uniform(0.5, 2)),
                    l0=float(rng.integers(10, 100)),
                    linf=4 / 255,
                    mate_rank=1 + int(rng.integers(0, 3)),
                    **common,
                )
            )
    return rows


def test_report_cells_parse_and_match_the_interval_functions(tmp_path):
    rows = varied_rows()
    ResultStore(tmp_path).writer(0).write(rows)
    text = write_report(tmp_path).read_text()
    head, body = table_rows(text, "Table 1: attack success rate (%)")
    assert head[1:] == ["base 16 (n=24)", "base 64 (n=24)"]
    for i, res in enumerate((16, 64)):
        here = [r for r in rows if r.attack == "DR (4-10)" and r.resolution == res]
        k = sum(r.success for r in here)
        low, high = wilson_interval(k, len(here))
        m = CELL.match(body["DR (4-10)"][i])
        assert m is not None, body["DR (4-10)"][i]
        assert m.groups() == (pct(k / len(here)), pct(low), pct(high))
    head, body = table_rows(text, "Table 2: hit rate, CMC rank 1 (%)")
    for i, res in enumerate((16, 64)):
        here = [r for r in rows if r.attack == CLEAN and r.resolution == res]
        k = sum(r.mate_rank == 1 for r in here)
        low, high = wilson_interval(k, len(here))
        assert CELL.match(body[CLEAN][i]).groups() == (pct(k / 24), pct(low), pct(high))
        assert head[1 + i] == f"base {res} (n=24)"
    head, body = table_rows(text, "Mean L2 of the perturbation ([0, 1] scale)")
    here = [r for r in rows if r.attack == "DR (4-10)" and r.resolution == 16]
    values = np.array([[r.l2, r.l0, r.linf] for r in here])
    low, high = bootstrap_mean_interval(
        values, groups=[r.identity for r in here], n_resamples=N_RESAMPLES, seed=SEED
    )
    assert body["DR (4-10)"][0] == (f"{values[:, 0].mean():.3g} [{low[0]:.3g}, {high[0]:.3g}]")
    head, body = table_rows(text, "Table 3: FPIR @ FNIR = 0.01 (%)")
    n_mated = sum(1 for r in here if r.open_mated)
    assert head[1] == f"base 16 (n={n_mated}+{24 - n_mated})"
    assert CELL.match(body[CLEAN][0]) and CELL.match(body["DR (4-10)"][1])


def test_wandb_payload_carries_every_interval_and_the_findings(tmp_path):
    wandb = pytest.importorskip("wandb")
    from crossres.report.wandb import INTERVAL_COLUMNS, run_payload

    payload = run_payload(make_rows())
    table = payload["report/intervals"]
    assert isinstance(table, wandb.Table) and table.columns == INTERVAL_COLUMNS
    by_key = {(r[1], r[3]): r for r in table.data}
    low, high = wilson_interval(2, 3)
    assert by_key[("CW", "success_rate")][4:] == ["3", pytest.approx(2 / 3), low, high]
    assert payload["ci/base/CW/r16/success_rate_low"] == low
    assert payload["ci/base/clean/r16/hit_rate_n"] == "4"
    assert [row[2] for row in payload["report/findings"].data] == [
        "undecided at this n"
    ] * 3  # one target, 4 queries: nothing can be decided


def test_wandb_payload_holds_rows_figures_and_example_pairs(tmp_path):
    wandb = pytest.importorskip("wandb")
    from crossres.report.wandb import example_grid, run_payload

    ResultStore(tmp_path).writer(0).write(make_rows())
    write_report(tmp_path)
    figures = sorted((tmp_path / "figures").glob("*.png"))
    clean = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    adv = (clean + 0.01 * torch.arange(5).view(-1, 1, 1, 1)).clamp(0, 1)
    payload = run_payload(
        ResultStore(tmp_path).rows(), figures=figures, examples={("base", "CW"): (clean, adv)}
    )
    assert len(payload["results"].data) == len(make_rows())
    assert {f"figures/{p.stem}" for p in figures} <= payload.keys()
    assert len(payload["examples/base/CW"]) == 4 and isinstance(
        payload["examples/base/CW"][0], wandb.Image
    )
    grid = example_grid(clean, adv)  # clean | adversarial | perturbation scaled to 1
    assert grid.shape == (5, 3, 8, 24)
    assert torch.equal(grid[..., :8], clean) and torch.equal(grid[..., 8:16], adv)
    assert torch.all(grid[1:, :, :, 16:].flatten(1).amax(1) == 1.0)
    assert torch.all(grid[0, :, :, 16:] == 0)  # no perturbation: nothing to scale
