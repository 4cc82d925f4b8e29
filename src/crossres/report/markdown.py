"""``report.md`` of a run directory, shaped like the paper: Tables 1-3 (attack configuration x
model x resolution) and Figures 2-4 (DR success, hit rate and FPIR@FNIR against delta), plus
CMC and DET figures. Everything is read from the result store, so ``crossres report RUN_DIR``
rewrites it at any time, also from a run that was interrupted."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from crossres.metrics.plots import plot_cmc, plot_det
from crossres.report.tables import TARGET_FNIR, Cell, det_curve, group, summarize
from crossres.report.threats import threat_sections
from crossres.store import CLEAN, ResultStore

DR_CLASS = "DeepRepresentation"


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    rows = ResultStore(run_dir).rows()
    cells = summarize(rows)
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# crossres report: `{run_dir.name}`", ""]
    lines += run_facts(run_dir, rows)
    if not cells:
        lines += ["No results yet."]
    else:
        lines += table(cells, "success_rate", "Table 1: attack success rate (%)", skip_clean=True)
        lines += table(cells, "hit_rate", "Table 2: hit rate, CMC rank 1 (%)")
        lines += table(cells, "fpir_at_fnir", f"Table 3: FPIR @ FNIR = {TARGET_FNIR:g} (%)")
        lines += table(
            cells,
            "mean_l2",
            "Mean L2 of the perturbation ([0, 1] scale)",
            skip_clean=True,
            percent=False,
        )
        lines += dr_figures(cells, fig_dir)
        lines += identification_figures(rows, cells, fig_dir)
        lines += threat_sections(rows, fig_dir)
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_facts(run_dir: Path, rows) -> list[str]:
    out = []
    record = run_dir / "run.json"
    if record.exists():
        info = json.loads(record.read_text())
        out.append(f"- configuration hash: `{info.get('config_hash', '?')[:16]}`")
        for key in ("weights", "manifest_hash", "data"):
            if key in info:
                out.append(f"- {key}: `{json.dumps(info[key], sort_keys=True)}`")
        versions = info.get("versions", {})
        if versions:
            out.append("- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    out.append(f"- rows in the result store: {len(rows)}")
    return out + [""]


def fmt(value: float, percent: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.3g}"


def table(
    cells: list[Cell], field: str, title: str, *, skip_clean: bool = False, percent: bool = True
) -> list[str]:
    """Rows: attack configurations; columns: model x resolution (as the paper's tables)."""
    models = sorted({c.model for c in cells})
    resolutions = sorted({c.resolution for c in cells}, key=resolution_order)
    by_key = {(c.attack, c.model, c.resolution): c for c in cells}
    attacks = list(dict.fromkeys(c.attack for c in cells if not (skip_clean and c.attack == CLEAN)))
    if not attacks:
        return []
    head = ["Attack configuration"] + [f"{m} {r or 'orig'}" for m in models for r in resolutions]
    out = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in attacks:
        vals = []
        for m in models:
            for r in resolutions:
                c = by_key.get((a, m, r))
                vals.append(fmt(getattr(c, field), percent) if c else "-")
        out.append(f"| {a} | " + " | ".join(vals) + " |")
    return out + [""]


def dr_figures(cells: list[Cell], fig_dir: Path) -> list[str]:
    """Figures 2-4: DR success, hit rate and FPIR@FNIR against delta (0-255 levels), one panel
    per resolution, one line per (model, steps)."""
    dr = [c for c in cells if c.params.get("class") == DR_CLASS]
    if not dr:
        return []
    resolutions = sorted({c.resolution for c in dr}, key=resolution_order)
    out = ["## Figures 2-4: DR against delta", ""]
    for number, (field, label) in enumerate(
        [
            ("success_rate", "attack success rate"),
            ("hit_rate", "hit rate"),
            ("fpir_at_fnir", f"FPIR @ FNIR={TARGET_FNIR:g}"),
        ],
        start=2,
    ):
        fig = Figure(figsize=(3.2 * len(resolutions), 3.0))
        for i, res in enumerate(resolutions):
            ax = fig.add_subplot(1, len(resolutions), i + 1)
            lines = defaultdict(list)
            for c in dr:
                if c.resolution == res:
                    lines[(c.model, c.params.get("steps"))].append(
                        (255 * float(c.params.get("epsilon", 0)), getattr(c, field))
                    )
            for (model, steps), pts in sorted(lines.items(), key=str):
                pts.sort()
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker="o",
                    label=f"{model}, {steps} steps",
                )
            ax.set(title=f"{res or 'orig'} px", xlabel="delta (0-255 levels)", ylim=(-0.02, 1.02))
            if i == 0:
                ax.set_ylabel(label)
                ax.legend(fontsize=7)
        name = f"figure{number}_dr_{field}.png"
        fig.savefig(fig_dir / name, dpi=120, bbox_inches="tight")
        out += [f"![Figure {number}: DR {label}](figures/{name})", ""]
    return out


def identification_figures(rows, cells: list[Cell], fig_dir: Path) -> list[str]:
    """CMC and DET (log-log, FNIR = 1e-2 marked) per model and resolution, one line per attack."""
    out = ["## Identification curves", ""]
    groups = group(rows)
    for model in sorted({c.model for c in cells}):
        for res in sorted({c.resolution for c in cells if c.model == model}, key=resolution_order):
            here = [c for c in cells if c.model == model and c.resolution == res]
            cmc = {c.attack: _tensor(c.cmc) for c in here if c.cmc}
            dets = {c.attack: d for c in here if (d := det_curve(groups[(model, c.attack, res)]))}
            stem = f"{_slug(model)}_r{res}"
            if cmc:
                plot_cmc(cmc, fig_dir / f"cmc_{stem}.png", title=f"CMC {model} {res or 'orig'} px")
                out.append(f"![CMC {model} {res}](figures/cmc_{stem}.png)")
            if dets:
                plot_det(
                    dets,
                    fig_dir / f"det_{stem}.png",
                    target_fnir=TARGET_FNIR,
                    title=f"DET {model} {res or 'orig'} px",
                )
                out.append(f"![DET {model} {res}](figures/det_{stem}.png)")
    return out + [""]


def resolution_order(res: int) -> float:
    """Low to high, the original resolution (0) last, as in the paper's tables."""
    return res if res > 0 else math.inf


def _tensor(values):
    import torch

    return torch.tensor(values, dtype=torch.float64)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-").lower()
