"""Report rendering from a store whose rows are written by hand: the tables must show the
numbers the published definitions give for those rows."""

import json
import math

import pytest
import torch

from crossres.report.markdown import write_report
from crossres.report.tables import summarize
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
    assert "| CW | 66.7 |" in text  # Table 1
    assert "| clean | 75.0 |" in text  # Table 2
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
