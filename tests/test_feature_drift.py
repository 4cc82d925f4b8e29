"""Feature drift (``ResultRow.feature_drift``): the frozen target's distance between a clean
query's features at r px and the same face's at the original resolution, against a brute
force over the dataset; the report's drift tables against numpy, scipy's Wilcoxon test and
Holm's adjustment computed here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from scipy import stats

from crossres.callbacks import ResultStoreCallback
from crossres.datamodules import SyntheticFacesDataModule
from crossres.lightning_modules import FrozenTarget, TargetSpec
from crossres.metrics import holm
from crossres.metrics.intervals import bootstrap_mean_interval
from crossres.report.drift import drift_cells, drift_pairs
from crossres.report.markdown import write_report
from crossres.report.tables import N_RESAMPLES, SEED
from crossres.store import CLEAN, ResultRow, ResultStore


def run(tmp_path, *, feature_drift: bool = True) -> tuple[FrozenTarget, SyntheticFacesDataModule]:
    torch.manual_seed(0)
    module = FrozenTarget([TargetSpec("tiny_facenet", "tiny")], feature_drift=feature_drift)
    dm = SyntheticFacesDataModule(
        n_identities=4, n_images=3, resolutions=[8, 16, 0], batch_size=5, input_size=64
    )
    pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
        default_root_dir=str(tmp_path), callbacks=[ResultStoreCallback()],
    ).test(module, datamodule=dm)  # fmt: skip
    return module, dm


def test_drift_is_the_distance_to_the_same_face_at_the_original_resolution(tmp_path, one_thread):
    module, dm = run(tmp_path)
    model = module.targets["tiny"].model
    rows = [r for r in ResultStore(tmp_path).rows() if r.attack == CLEAN]
    assert len(rows) == 3 * len(dm.query_table) and not any(
        math.isnan(r.feature_drift) for r in rows
    )
    # brute force: each face through the dataset at r and at the original, one at a time
    dataset = dm.query_dataset()
    items = {(dataset[k].sample_id, dataset[k].resolution): dataset[k] for k in range(len(dataset))}
    worst = 0.0
    with torch.no_grad():
        for r in rows:
            at_r = model.features(items[(r.sample_id, r.resolution)].image[None])
            original = model.features(items[(r.sample_id, 0)].image[None])
            want = float((at_r - original).norm())
            if r.resolution == 0:
                assert r.feature_drift == 0.0  # the same tensor: exactly
            else:
                assert want > 0
                worst = max(worst, abs(r.feature_drift - want) / want)
    # batched vs one at a time: float32 rounding only (5.7e-7 relative measured; 10x that)
    assert worst < 6e-6, worst


def test_drift_off_leaves_the_column_empty_and_the_batches_without_references(tmp_path, one_thread):
    _, dm = run(tmp_path, feature_drift=False)
    assert not dm.reference_images
    rows = [r for r in ResultStore(tmp_path).rows() if r.attack == CLEAN]
    assert rows and all(math.isnan(r.feature_drift) for r in rows)


def clean(model: str, sid: int, res: int, drift: float) -> ResultRow:
    return ResultRow(model=model, attack=CLEAN, sample_id=sid, resolution=res, identity=sid // 2,
                     feature_drift=drift)  # fmt: skip


def test_drift_tables_against_numpy_scipy_and_holm():
    rng = np.random.default_rng(3)
    base16, cr16 = rng.uniform(0.4, 0.8, 20), rng.uniform(0.2, 0.6, 20)
    base64, cr64 = rng.uniform(0.1, 0.3, 20), rng.uniform(0.1, 0.3, 20)
    rows = [clean("Base", i, 16, float(v)) for i, v in enumerate(base16)]
    rows += [clean("CR", i, 16, float(v)) for i, v in enumerate(cr16)]
    rows += [clean("Base", i, 64, float(v)) for i, v in enumerate(base64)]
    rows += [clean("CR", i, 64, float(v)) for i, v in enumerate(cr64)]
    rows += [clean("Base", i, 0, 0.0) for i in range(20)] + [
        clean("CR", i, 0, 0.0) for i in range(20)
    ]
    rows += [clean("CR", 99, 16, 5.0)]  # measured on one target only: in its cell, never paired
    rows += [
        ResultRow(
            model="Base", attack="CW", sample_id=0, resolution=16, identity=0, feature_drift=9.0
        )
    ]  # fmt: skip  (an attack row: not a drift)
    cells = {(c.model, c.resolution): c for c in drift_cells(rows)}
    assert cells[("Base", 16)].n == 20 and cells[("CR", 16)].n == 21
    assert cells[("Base", 16)].mean == pytest.approx(base16.mean(), abs=1e-12)
    groups = np.arange(20) // 2
    assert cells[("Base", 64)].interval == pytest.approx(
        bootstrap_mean_interval(base64, groups=groups, n_resamples=N_RESAMPLES, seed=SEED)
    )
    pairs = {p.resolution: p for p in drift_pairs(rows, "Base", "CR")}
    assert pairs[16].n == 20 and pairs[16].mean_second == pytest.approx(cr16.mean())
    assert pairs[16].difference == pytest.approx((cr16 - base16).mean())
    assert pairs[16].pvalue == pytest.approx(stats.wilcoxon(cr16, base16).pvalue)
    assert pairs[64].pvalue == pytest.approx(stats.wilcoxon(cr64, base64).pvalue)
    assert math.isnan(pairs[0].pvalue) and math.isnan(pairs[0].pvalue_holm)  # all zero: no test
    adjusted = holm([pairs[16].pvalue, pairs[64].pvalue])
    assert [pairs[16].pvalue_holm, pairs[64].pvalue_holm] == pytest.approx(list(adjusted))


def test_report_has_the_drift_section(tmp_path):
    rows = [clean(m, i, r, 0.5 if m == "Base" else 0.25) for m in ("Base", "CR") for i in range(6)
            for r in (16, 0)]  # fmt: skip
    for r in rows:
        if r.resolution == 0:
            r.feature_drift = 0.0
    ResultStore(tmp_path).writer(0).write(rows)
    text = write_report(tmp_path).read_text()
    section = text.split("## Feature drift", 1)[1].split("\n## ", 1)[0]
    assert "| Base | 0.5 [0.5, 0.5] (n=6) | 0 [0, 0] (n=6) |" in section
    assert "| 16 | 6 | 0.5 | 0.25 | -0.25 [-0.25, -0.25] |" in section
