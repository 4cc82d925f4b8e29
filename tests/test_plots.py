"""CMC and DET figures: files are written, the curves are the metric values, and the DET
operating point sits where ``functional.fpir_at_fnir`` says."""

from __future__ import annotations

import pytest
import torch

from crossres.metrics import functional as MF
from crossres.metrics.plots import plot_cmc, plot_det
from crossres.report.wandb import wandb_cmc, wandb_det, wandb_image

PNG = b"\x89PNG\r\n\x1a\n"


def open_set(seed: int):
    g = torch.Generator().manual_seed(seed)
    gids = torch.arange(30)
    mated = torch.randn(400, 30, generator=g)
    pids = torch.randint(0, 30, (400,), generator=g)
    mated[torch.arange(400), pids] += 6.0  # mates mostly first
    nonmated = torch.randn(300, 30, generator=g)
    return mated, pids, nonmated, gids


def artists(fig, prefix):
    return [a for a in fig.axes[0].get_lines() if (a.get_gid() or "").startswith(prefix)]


def test_cmc_plot_written_and_values(tmp_path):
    mated, pids, _, gids = open_set(0)
    curves = {"clean": MF.cmc(mated, pids, gids, 10), "attacked": MF.cmc(-mated, pids, gids, 10)}
    path = tmp_path / "sub" / "cmc.png"
    fig = plot_cmc(curves, path)
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 1000
    for label, values in curves.items():
        (line,) = artists(fig, f"cmc:{label}")
        assert list(line.get_xdata()) == list(range(1, 11))
        assert list(line.get_ydata()) == values.tolist()


def test_det_plot_marks_the_operating_point(tmp_path):
    args = open_set(1)
    curve = MF.det_curve(*args)
    expected = MF.fpir_at_fnir(*args, target_fnir=1e-2)
    assert 0 < float(expected) < 1  # a point inside the plot
    path = tmp_path / "det.pdf"
    fig = plot_det({"clean": curve}, path, target_fnir=1e-2)
    assert path.stat().st_size > 1000 and path.read_bytes().startswith(b"%PDF")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    (point,) = artists(fig, "operating-point:clean")
    assert list(point.get_xdata()) == [float(expected)]
    fnir, fpir = MF.fnir_fpir_at_threshold(*args, float(MF.operating_point(curve).threshold))
    assert list(point.get_ydata()) == [float(fnir)] and float(fpir) == float(expected)
    assert float(fnir) <= 1e-2
    (target,) = artists(fig, "target-fnir")
    assert list(target.get_ydata()) == [1e-2, 1e-2]


def test_det_plot_unreachable_target_has_no_point(tmp_path):
    mated, pids, nonmated, gids = open_set(2)
    mated[:50, :] = torch.randn(50, 30)  # mates of 50 probes lost: FNIR >= ~10% at rank 1
    curve = MF.det_curve(mated, pids, nonmated, gids)
    assert float(MF.fpir_at_fnir(mated, pids, nonmated, gids)) == 1.0
    fig = plot_det(curve, tmp_path / "det.png")
    assert artists(fig, "operating-point") == []
    assert "not reached" in fig.axes[0].texts[0].get_text()


def test_wandb_objects():
    wandb = pytest.importorskip("wandb")
    args = open_set(3)
    chart = wandb_cmc({"clean": MF.cmc(*args[:2], args[3], 5)})
    assert isinstance(chart, wandb.plot.CustomChart)
    assert isinstance(wandb_det(MF.det_curve(*args)), wandb.plot.CustomChart)
    image = wandb_image(plot_det(MF.det_curve(*args)), caption="DET")
    assert isinstance(image, wandb.Image)
