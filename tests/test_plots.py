"""CMC and DET figures: files are written, the curves are the metric values, and the DET
operating point sits where ``functional.fpir_at_fnir`` says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crossres.metrics import functional as MF
from crossres.metrics import wilson_interval
from crossres.metrics.plots import RatePoint, data_limits, plot_cmc, plot_det, plot_rate_curves
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
    assert "not reached" in fig.axes[0].get_legend().get_texts()[0].get_text()


def test_wandb_objects():
    wandb = pytest.importorskip("wandb")
    args = open_set(3)
    chart = wandb_cmc({"clean": MF.cmc(*args[:2], args[3], 5)})
    assert isinstance(chart, wandb.plot.CustomChart)
    assert isinstance(wandb_det(MF.det_curve(*args)), wandb.plot.CustomChart)
    image = wandb_image(plot_det(MF.det_curve(*args)), caption="DET")
    assert isinstance(image, wandb.Image)


# --------------------------------------------------------------- readability: axes, legends


def drawn(fig):
    """Draw ``fig`` on an Agg canvas and return its renderer (for artist extents)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def assert_legend_outside(fig, ax):
    renderer = drawn(fig)
    legend = ax.get_legend()
    assert legend is not None
    box, frame = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert box.x0 >= frame.x1  # entirely right of the axes: it covers no curve


def test_det_axes_come_from_the_data_and_the_legend_sits_outside():
    # an attacked-like curve: every rate between 0.3 and 1 (the old fixed axes put it into
    # the top-right corner)
    curve = MF.DetCurve(
        fpir=torch.tensor([1.0, 0.8, 0.5, 0.3, 0.0], dtype=torch.float64),
        fnir=torch.tensor([0.3, 0.5, 0.7, 0.9, 1.0], dtype=torch.float64),
        thresholds=torch.tensor([0.1, 0.2, 0.3, 0.4, float("inf")]),
    )
    fig = plot_det({"attacked": curve, "other": curve}, target_fnir=0.01)
    ax = fig.axes[0]
    assert ax.get_xlim() == pytest.approx((0.3 / 1.5, 1.05))
    assert ax.get_ylim() == pytest.approx((0.01 / 1.5, 1.05))  # the target FNIR is shown
    assert_legend_outside(fig, ax)
    assert data_limits([0.5, 0.0, float("nan")]) == pytest.approx((0.5 / 1.5, 0.75))
    assert data_limits([]) == (1e-3, 1.05)


def test_cmc_legend_sits_outside():
    mated, pids, _, gids = open_set(4)
    fig = plot_cmc({f"attack {i}": MF.cmc(mated, pids, gids, 5) for i in range(6)})
    assert_legend_outside(fig, fig.axes[0])


def test_rate_curves_carry_intervals_and_a_shared_legend(tmp_path):
    k = np.array([2, 9, 17, 20])
    low, high = wilson_interval(k, 20)
    points = [RatePoint(float(d), k[i] / 20, low[i], high[i]) for i, d in enumerate((1, 2, 4, 8))]
    panels = {"16 px": {"Base": points}, "64 px": {"Base": points[:2], "CR": points[2:]}}
    fig = plot_rate_curves(panels, tmp_path / "f.png", xlabel="delta", ylabel="rate")
    assert (tmp_path / "f.png").read_bytes().startswith(PNG)
    ax0, ax1 = fig.axes
    (line,) = [a for a in ax0.get_lines() if a.get_gid() == "rate:16 px:Base"]
    assert list(line.get_ydata()) == pytest.approx((k / 20).tolist())
    # error bars span exactly the Wilson intervals
    segments = [c for c in ax0.collections if c.__class__.__name__ == "LineCollection"]
    spans = sorted((float(s[0][1]), float(s[1][1])) for s in segments[0].get_segments())
    expected = sorted(zip(low.tolist(), high.tolist(), strict=True))
    assert np.allclose(spans, expected, rtol=0, atol=1e-12)
    assert list(ax0.get_xticks()) == [1, 2, 4, 8]
    labels = [t.get_text() for t in ax1.get_legend().get_texts()]
    assert labels == ["Base", "CR"]  # every line once, in the last panel's legend
    assert_legend_outside(fig, ax1)
    with pytest.raises(ValueError, match="panel"):
        plot_rate_curves({}, xlabel="x", ylabel="y")
