"""CMC and DET figures (matplotlib, saved to files).

Figures are built with ``matplotlib.figure.Figure`` directly, not pyplot: no global backend
or figure registry is touched, so this is safe in headless runs and in callbacks. The DET
curve is drawn as NIST IR 8271 does: FNIR against FPIR, both on log axes; points where a
rate is 0 cannot be shown on a log axis and are left out of the line. The operating point
of ``functional.operating_point`` (FPIR@FNIR, default FNIR = 1e-2) is marked on each curve.
Their W&B counterparts live next to the report, in ``crossres.report.wandb``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from crossres.metrics.functional import DetCurve, operating_point

__all__ = ["as_mapping", "cmc_values", "plot_cmc", "plot_det"]


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
    ax.set(xlabel="rank", ylabel="identification rate (hit rate)", ylim=(0, 1.02), title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
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
    positive: list[float] = []
    notes = []
    for label, curve in data.items():
        fpir = curve.fpir.detach().double().cpu()
        fnir = curve.fnir.detach().double().cpu()
        shown = (fpir > 0) & (fnir > 0)
        (line,) = ax.plot(
            fpir[shown].tolist(), fnir[shown].tolist(), label=label, gid=f"det:{label}"
        )
        positive += fpir[fpir > 0].tolist() + fnir[fnir > 0].tolist()
        op = operating_point(curve, target_fnir)
        if op.reached:
            ax.plot(
                [float(op.fpir)],
                [float(op.fnir)],
                marker="o",
                linestyle="none",
                color=line.get_color(),
                gid=f"operating-point:{label}",
            )
            notes.append(f"{label}: FPIR={float(op.fpir):.4g} @ FNIR={float(op.fnir):.3g}")
        else:
            notes.append(f"{label}: FNIR<={target_fnir:g} not reached (FPIR=1)")
    ax.axhline(target_fnir, color="gray", linestyle="--", linewidth=0.8, gid="target-fnir")
    low = min([*positive, target_fnir]) / 2
    ax.set(xlim=(low, 1.05), ylim=(low, 1.05), xlabel="FPIR", ylabel="FNIR", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")
    ax.text(0.02, 0.02, "\n".join(notes), transform=ax.transAxes, fontsize=7, va="bottom")
    _save(fig, path)
    return fig
