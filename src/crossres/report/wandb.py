"""W&B views of a run: CMC/DET charts, figures as images, the result rows and example pairs,
and the report's numbers with their n and 95 % intervals (``interval_rows``: one row per
model x attack x resolution x metric with value, low, high and n, logged as the table
``report/intervals`` and as scalars ``ci/<model>/<attack>/r<res>/<metric>{,_low,_high,_n}``),
plus the findings' verdicts (table ``report/findings``) and the feature drift
(``drift/<model>/r<res>{,_low,_high,_n}``, ``report.drift``).

``wandb`` is imported only inside these functions, so the rest of the package runs without
it. Everything logged is a view of the result store (rows, the report's figures) or of the
example pairs an attack callback kept.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from crossres.metrics.functional import DetCurve
from crossres.metrics.plots import as_mapping, cmc_values
from crossres.report.drift import drift_cells
from crossres.report.findings import findings
from crossres.report.tables import Cell, summarize
from crossres.store import ResultRow, rows_to_dicts

__all__ = [
    "example_grid",
    "interval_rows",
    "run_payload",
    "wandb_cmc",
    "wandb_det",
    "wandb_image",
]

INTERVAL_COLUMNS = ["model", "attack", "resolution", "metric", "n", "value", "low", "high"]


def _wandb() -> Any:
    try:
        import wandb
    except ImportError as err:  # pragma: no cover - wandb is a dependency
        raise ImportError("the W&B helpers need wandb: pip install wandb") from err
    return wandb


def wandb_cmc(curves: Tensor | Mapping[str, Tensor], *, title: str = "CMC") -> Any:
    """A ``wandb.plot.line_series`` of the CMC curves (x = rank), for ``run.log``."""
    data = {k: cmc_values(v, k) for k, v in as_mapping(curves, Tensor, "CMC").items()}
    n = max(len(v) for v in data.values())
    xs = list(range(1, n + 1))
    ys = [v + [v[-1]] * (n - len(v)) for v in data.values()]
    return _wandb().plot.line_series(xs=xs, ys=ys, keys=list(data), title=title, xname="rank")


def wandb_det(curves: DetCurve | Mapping[str, DetCurve], *, title: str = "DET") -> Any:
    """A ``wandb.plot.line_series`` of FNIR against FPIR (W&B draws linear axes; log the
    ``wandb_image`` of ``plot_det`` for the log-log view)."""
    data = as_mapping(curves, DetCurve, "DET")
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


def example_grid(clean: Tensor, adversarial: Tensor) -> Tensor:
    """Per pair, side by side: clean | adversarial | |perturbation| scaled to its maximum."""
    diff = (adversarial - clean).abs()
    amplified = diff / diff.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return torch.cat([clean, adversarial, amplified], dim=3)


def interval_rows(cells: Sequence[Cell]) -> list[list[Any]]:
    """``INTERVAL_COLUMNS`` rows of every defined metric of every cell (the report's numbers:
    rates as fractions, n as in the report's column headers)."""
    out = []
    for c in cells:
        metrics = [
            ("success_rate", str(c.success_n), c.success_rate, c.success_ci),
            ("hit_rate", str(c.hit_n), c.hit_rate, c.hit_ci),
            ("fpir_at_fnir", f"{c.n_mated}+{c.n_nonmated}", c.fpir_at_fnir, c.fpir_ci),
        ]
        metrics += [
            (f"mean_{k}", str(c.n), getattr(c, f"mean_{k}"), c.norm_ci[k]) for k in c.norm_ci
        ]
        for name, n, value, (low, high) in metrics:
            if not math.isnan(value):
                out.append([c.model, c.attack, c.resolution, name, n, value, low, high])
    return out


def run_payload(
    rows: Sequence[ResultRow],
    *,
    figures: Sequence[Path] = (),
    examples: Mapping[tuple[str, str], tuple[Tensor, Tensor]] | None = None,
    n_images: int = 4,
    cells: Sequence[Cell] | None = None,
) -> dict[str, Any]:
    """What ``run.log`` receives at the end of a run: the rows as a table, every number of the
    report with its n and interval, the findings' verdicts, the report's figures, and up to
    ``n_images`` example pairs per (model, attack). ``cells``: ``summarize(rows)`` when
    already computed."""
    wandb = _wandb()
    payload: dict[str, Any] = {}
    cells = summarize(rows) if cells is None else cells
    table = interval_rows(cells)
    if table:
        payload["report/intervals"] = wandb.Table(columns=INTERVAL_COLUMNS, data=table)
        for model, attack, res, name, n, value, low, high in table:
            key = f"ci/{model}/{attack}/r{res}/{name}"
            payload.update({key: value, f"{key}_low": low, f"{key}_high": high, f"{key}_n": n})
        payload["report/findings"] = wandb.Table(
            columns=["finding", "title", "verdict", "decided by", "test"],
            data=[[f.number, f.title, f.verdict, f.reason, f.test] for f in findings(rows)],
        )
    for c in drift_cells(rows):  # the report's feature drift table, as scalars
        key = f"drift/{c.model}/r{c.resolution}"
        payload.update({key: c.mean, f"{key}_low": c.interval[0], f"{key}_high": c.interval[1]})
        payload[f"{key}_n"] = c.n
    data = rows_to_dicts(rows)
    if data:
        columns = list(data[0])
        payload["results"] = wandb.Table(
            columns=columns, data=[[d[c] for c in columns] for d in data]
        )
    for png in figures:
        payload[f"figures/{Path(png).stem}"] = wandb.Image(str(png))
    for (label, attack), (clean, adv) in (examples or {}).items():
        grid = example_grid(clean[:n_images], adv[:n_images])
        # uint8 here: wandb.Image (0.31) casts a float array with astype(uint8), no x255,
        # which logged every [0, 1] image black
        pixels = (grid * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        payload[f"examples/{label}/{attack}"] = [
            wandb.Image(g.numpy(), caption="clean | adversarial | |delta| (scaled)") for g in pixels
        ]
    return payload
