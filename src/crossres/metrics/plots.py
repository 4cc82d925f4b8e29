"""CMC, DET and rate-against-parameter figures (matplotlib, saved to files).

Figures are built with ``matplotlib.figure.Figure`` directly, not pyplot: no global backend
or figure registry is touched, so this is safe in headless runs and in callbacks. The DET
curve is drawn as NIST IR 8271 does: FNIR against FPIR, both on log axes; a rate of 0
cannot be shown on a log axis and is drawn on the axis edge (the axis labels say so). The operating point
of ``functional.operating_point`` (FPIR@FNIR, default FNIR = 1e-2) is marked on each curve.
Their W&B counterparts live next to the report, in ``crossres.report.wandb``.

Readability rules every figure here follows: legends sit outside the axes (right of the last
panel; ``bbox_inches="tight"`` keeps them in the file), so they never cover a curve; DET axis
limits come from the data (the smallest positive rate shown on each axis, with a margin),
not from a fixed decade range; rates carry their confidence interval as error bars and a
band (``plot_rate_curves``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from matplotlib.figure import Figure
from torch import Tensor

from crossres.metrics.functional import DetCurve, operating_point

__all__ = ["RatePoint", "as_mapping", "cmc_values", "plot_cmc", "plot_det", "plot_rate_curves"]

LOG_MARGIN = 1.5  # DET axes start this factor below the smallest positive rate shown


class RatePoint(NamedTuple):
    """One point of a rate curve: x, the rate, and its interval (low, high)."""

    x: float
    rate: float
    low: float
    high: float


def legend_outside(ax: Any, **kwargs: Any) -> Any:
    """A legend right of ``ax``, outside it (so it covers no data)."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)


def as_mapping(curves: Any, kind: type | tuple[type, ...], name: str) -> dict[str, Any]:
    """One curve of type ``kind`` (labelled ``name``) or a non-empty mapping label -> curve."""
    if isinstance(curves, kind):
        return {name: curves}
    if isinstance(curves, Mapping) and curves:
        return dict(curves)
    raise ValueError(
        f"expected a {name} or a non-empty mapping label -> {name}, got {type(curves)}"
    )


def cmc_values(values: Any, label: str) -> list[float]:
    """A CMC curve as a list of hit rates (float64), checked to be non-empty and 1-D."""
    v = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if v.ndim != 1 or v.numel() == 0:
        raise ValueError(
            f"CMC {label!r} must be a non-empty 1-D hit-rate tensor, got {tuple(v.shape)}"
        )
    return v.tolist()


def _save(fig: Figure, path: str | Path | None) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")


def plot_cmc(
    curves: Tensor | Mapping[str, Tensor],
    path: str | Path | None = None,
    *,
    title: str = "CMC",
) -> Figure:
    """CMC curves (hit rate at ranks 1..n), one line per label; saved to ``path`` if given."""
    data = {k: cmc_values(v, k) for k, v in as_mapping(curves, Tensor, "CMC").items()}
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    for label, values in data.items():
        ranks = list(range(1, len(values) + 1))
        ax.plot(ranks, values, marker="o", markersize=3, label=label, gid=f"cmc:{label}")
    ax.set(xlabel="rank", ylabel="identification rate (hit rate)", ylim=(-0.02, 1.02), title=title)
    ax.grid(True, alpha=0.3)
    legend_outside(ax, fontsize=8)
    _save(fig, path)
    return fig


def plot_det(
    curves: DetCurve | Mapping[str, DetCurve],
    path: str | Path | None = None,
    *,
    target_fnir: float = 1e-2,
    title: str = "DET",
) -> Figure:
    """DET curves (FNIR vs FPIR, log-log) with the FNIR = ``target_fnir`` operating point of
    each curve marked (artist gid ``"operating-point:<label>"``); saved to ``path`` if given."""
    data = as_mapping(curves, DetCurve, "DET")
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")
    xs: list[float] = []
    ys: list[float] = [target_fnir]
    prepared = []
    for label, curve in data.items():
        fpir = curve.fpir.detach().double().cpu()
        fnir = curve.fnir.detach().double().cpu()
        xs += fpir[fpir > 0].tolist()
        ys += fnir[fnir > 0].tolist()
        prepared.append((label, curve, fpir, fnir))
    xlim, ylim = data_limits(xs), data_limits(ys)
    for label, curve, fpir, fnir in prepared:
        # a rate of 0 has no place on a log axis: it is drawn on the axis edge
        shown_x = fpir.clamp_min(xlim[0]).tolist()
        shown_y = fnir.clamp_min(ylim[0]).tolist()
        op = operating_point(curve, target_fnir)
        if op.reached:
            note = f"FPIR={float(op.fpir):.3g} @ FNIR={float(op.fnir):.3g}"
        else:
            note = f"FNIR<={target_fnir:g} not reached"
        (line,) = ax.plot(
            shown_x, shown_y, drawstyle="steps-post", label=f"{label}: {note}", gid=f"det:{label}"
        )
        if op.reached:
            ax.plot(
                [max(float(op.fpir), xlim[0])],
                [max(float(op.fnir), ylim[0])],
                marker="o",
                linestyle="none",
                color=line.get_color(),
                gid=f"operating-point:{label}",
            )
    ax.axhline(target_fnir, color="gray", linestyle="--", linewidth=0.8, gid="target-fnir")
    ax.set(
        xlim=xlim,
        ylim=ylim,
        xlabel="FPIR (0 drawn on the left edge)",
        ylabel="FNIR (0 drawn on the bottom edge)",
        title=title,
    )
    ax.grid(True, which="both", alpha=0.3)
    legend_outside(ax, fontsize=7)
    _save(fig, path)
    return fig


def data_limits(values: list[float]) -> tuple[float, float]:
    """Log-axis limits of rates: ``LOG_MARGIN`` below the smallest positive value and just
    above the largest (at most 1.05, the rates' ceiling); (1e-3, 1.05) without data."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if not positive:
        return 1e-3, 1.05
    low, high = min(positive) / LOG_MARGIN, min(1.05, max(positive) * LOG_MARGIN)
    return low, max(high, low * LOG_MARGIN**2)


def plot_rate_curves(
    panels: Mapping[str, Mapping[str, list[RatePoint]]],
    path: str | Path | None = None,
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
) -> Figure:
    """Rates against a parameter (e.g. DR success against delta): one panel per key of
    ``panels``, one line per label, each point with its interval as an error bar and the
    band between the interval bounds shaded. Lines carry gid ``"rate:<panel>:<label>"``."""
    if not panels:
        raise ValueError("plot_rate_curves needs at least one panel")
    fig = Figure(figsize=(2.9 * len(panels) + 1.6, 3.0))
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    xs_all = sorted({p.x for lines in panels.values() for pts in lines.values() for p in pts})
    for ax, (name, lines) in zip(axes, panels.items(), strict=True):
        for label, points in lines.items():
            pts = sorted(points)
            x = [p.x for p in pts]
            y = [p.rate for p in pts]
            lo = [p.low for p in pts]
            hi = [p.high for p in pts]
            err = [
                [max(0.0, a - b) for a, b in zip(y, lo, strict=True)],
                [max(0.0, b - a) for a, b in zip(y, hi, strict=True)],
            ]
            bars = ax.errorbar(x, y, yerr=err, marker="o", markersize=4, capsize=3, label=label)
            bars.lines[0].set_gid(f"rate:{name}:{label}")
            ax.fill_between(x, lo, hi, alpha=0.15, color=bars.lines[0].get_color(), linewidth=0)
        ax.set(title=name, xlabel=xlabel, ylim=(-0.03, 1.03))
        if xs_all:
            ax.set_xticks(xs_all)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(ylabel)
    handles: dict[str, Any] = {}
    for ax in axes:  # a label drawn in any panel, once
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        legend_outside(axes[-1], handles=list(handles.values()), labels=list(handles), fontsize=7)
    if title:
        fig.suptitle(title, y=1.06)
    _save(fig, path)
    return fig
