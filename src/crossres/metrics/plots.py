"""CMC and DET figures (matplotlib, saved to files) and their W&B counterparts.

Figures are built with ``matplotlib.figure.Figure`` directly, not pyplot: no global backend
or figure registry is touched, so this is safe in headless runs and in callbacks. The DET
curve is drawn as NIST IR 8271 does: FNIR against FPIR, both on log axes; points where a
rate is 0 cannot be shown on a log axis and are left out of the line. The operating point
of ``functional.operating_point`` (FPIR@FNIR, default FNIR = 1e-2) is marked on each curve.
``wandb`` is imported only by the ``wandb_*`` helpers.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from crossres.metrics.functional import DetCurve, operating_point

__all__ = ["plot_cmc", "plot_det", "wandb_cmc", "wandb_det", "wandb_image"]


def _as_mapping(curves: Any, kind: type | tuple[type, ...], name: str) -> dict[str, Any]:
    if isinstance(curves, kind):
        return {name: curves}
    if isinstance(curves, Mapping) and curves:
        return dict(curves)
    raise ValueError(
        f"expected a {name} or a non-empty mapping label -> {name}, got {type(curves)}"
    )


def _cmc_values(values: Any, label: str) -> list[float]:
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
    data = {k: _cmc_values(v, k) for k, v in _as_mapping(curves, Tensor, "CMC").items()}
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
    data = _as_mapping(curves, DetCurve, "DET")
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


def _wandb() -> Any:
    try:
        import wandb
    except ImportError as err:  # pragma: no cover - wandb is a dependency
        raise ImportError("the wandb_* helpers need wandb: pip install wandb") from err
    return wandb


def wandb_cmc(curves: Tensor | Mapping[str, Tensor], *, title: str = "CMC") -> Any:
    """A ``wandb.plot.line_series`` of the CMC curves (x = rank), for ``run.log``."""
    data = {k: _cmc_values(v, k) for k, v in _as_mapping(curves, Tensor, "CMC").items()}
    n = max(len(v) for v in data.values())
    xs = list(range(1, n + 1))
    ys = [v + [v[-1]] * (n - len(v)) for v in data.values()]
    return _wandb().plot.line_series(xs=xs, ys=ys, keys=list(data), title=title, xname="rank")


def wandb_det(curves: DetCurve | Mapping[str, DetCurve], *, title: str = "DET") -> Any:
    """A ``wandb.plot.line_series`` of FNIR against FPIR (W&B draws linear axes; log the
    ``wandb_image`` of ``plot_det`` for the log-log view)."""
    data = _as_mapping(curves, DetCurve, "DET")
    xs = [c.fpir.detach().double().cpu().tolist() for c in data.values()]
    ys = [c.fnir.detach().double().cpu().tolist() for c in data.values()]
    return _wandb().plot.line_series(xs=xs, ys=ys, keys=list(data), title=title, xname="FPIR")


def wandb_image(fig: Figure, *, caption: str | None = None) -> Any:
    """``wandb.Image`` of a figure (rendered to PNG here, so pyplot is never needed)."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, bbox_inches="tight")
    buf.seek(0)
    return _wandb().Image(Image.open(buf).convert("RGB"), caption=caption)
