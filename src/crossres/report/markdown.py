"""``report.md`` of a run directory, shaped like the paper: Tables 1-3 (attack configuration x
model x resolution) and Figures 2-4 (DR success, hit rate and FPIR@FNIR against delta), plus
CMC and DET figures, a paired Base vs CR comparison, and the paper's three findings with a
verdict each. Everything is read from the result store, so ``crossres report RUN_DIR``
rewrites it at any time, also from a run that was interrupted.

Every rate is printed as ``value [low, high]`` in percent with its 95 % interval (Wilson for
success and hit rates, a bootstrap over identities for FPIR@FNIR, the mean norms and paired
differences; see ``report.tables``), and every column header carries its n.

The report is the concatenation of ``SECTIONS``: functions ``(Context) -> list[str]`` of
markdown lines, in order. To add a section, write such a function in its own module and add
it to the list before ``findings_section``, which stays last.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossres.metrics.plots import RatePoint, plot_cmc, plot_det, plot_rate_curves
from crossres.phases import mark
from crossres.report.comparisons import base_and_cr, paired_table
from crossres.report.drift import drift_cells, drift_pairs
from crossres.report.findings import ALPHA, Finding, findings
from crossres.report.tables import (
    CONFIDENCE,
    N_RESAMPLES,
    SEED,
    TARGET_FNIR,
    Cell,
    Interval,
    det_curve,
    group,
    hit_outcome,
    success_outcome,
    summarize,
    wilson,
)
from crossres.report.threats import threat_sections
from crossres.store import CLEAN, ResultRow, ResultStore

DR_CLASS = "DeepRepresentation"


@dataclass
class Context:
    """What every section reads: the run directory, its rows and cells, ``run.json``."""

    run_dir: Path
    rows: list[ResultRow]
    cells: list[Cell]
    fig_dir: Path
    run_info: dict[str, Any] = field(default_factory=dict)


def write_report(
    run_dir: str | Path,
    *,
    rows: list[ResultRow] | None = None,
    cells: list[Cell] | None = None,
) -> Path:
    """``report.md`` and its figures in ``run_dir``; ``rows`` (the store's) and ``cells``
    (``summarize(rows)``: a second of bootstraps) when the caller already has them."""
    mark("report")
    run_dir = Path(run_dir)
    rows = ResultStore(run_dir).rows() if rows is None else rows
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    record = run_dir / "run.json"
    ctx = Context(
        run_dir=run_dir,
        rows=rows,
        cells=summarize(rows) if cells is None else cells,
        fig_dir=fig_dir,
        run_info=json.loads(record.read_text()) if record.exists() else {},
    )
    lines = [f"# crossres report: `{run_dir.name}`", ""]
    if not ctx.cells:
        lines += run_facts(ctx) + ["No results yet."]
    else:
        for section in SECTIONS:
            lines += section(ctx)
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- formatting


def fmt(value: float | None, percent: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    value = float(value) + 0.0  # no "-0.0"
    if percent:
        return f"{100 * value + 0.0:.1f}"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def fmt_ci(value: float, interval: Interval, *, percent: bool = True) -> str:
    """``value [low, high]`` (percent by default); "-" when the value is undefined."""
    if value is None or math.isnan(value):
        return "-"
    low, high = interval
    if math.isnan(low) or math.isnan(high):
        return fmt(value, percent)
    return f"{fmt(value, percent)} [{fmt(low, percent)}, {fmt(high, percent)}]"


def fmt_p(p: float) -> str:
    if math.isnan(p):
        return "-"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def resolution_order(res: int) -> float:
    """Low to high, the original resolution (0) last, as in the paper's tables."""
    return res if res > 0 else math.inf


def _res(res: int) -> str:
    return str(res or "orig")


# --------------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Metric:
    """A table's metric: how to read a cell's value, interval and n."""

    title: str
    value: Callable[[Cell], float]
    interval: Callable[[Cell], Interval]
    n: Callable[[Cell], str]
    note: str
    percent: bool = True
    skip_clean: bool = False


WILSON_NOTE = (
    f"{100 * CONFIDENCE:g} % Wilson score interval over the cell's queries (binomial); "
    "n = queries the rate counts"
)
BOOT_NOTE = (
    f"{100 * CONFIDENCE:g} % percentile bootstrap over identities ({N_RESAMPLES} resamples, "
    f"seed {SEED})"
)

METRICS = {
    "success_rate": Metric(
        "Table 1: attack success rate (%)",
        lambda c: c.success_rate,
        lambda c: c.success_ci,
        lambda c: str(c.success_n),
        WILSON_NOTE
        + " (classification attacks: queries classified correctly when clean; DR: every query)",
        skip_clean=True,
    ),
    "hit_rate": Metric(
        "Table 2: hit rate, CMC rank 1 (%)",
        lambda c: c.hit_rate,
        lambda c: c.hit_ci,
        lambda c: str(c.hit_n),
        WILSON_NOTE + " (closed-set mated searches)",
    ),
    "fpir_at_fnir": Metric(
        f"Table 3: FPIR @ FNIR = {TARGET_FNIR:g} (%)",
        lambda c: c.fpir_at_fnir,
        lambda c: c.fpir_ci,
        lambda c: f"{c.n_mated}+{c.n_nonmated}",
        BOOT_NOTE + ", stratified; n = mated + non-mated open-set searches",
    ),
}
for _norm, _label in (
    ("l2", "L2 of the perturbation ([0, 1] scale)"),
    ("l0", "L0 of the perturbation (changed pixels)"),
    ("linf", "Linf of the perturbation ([0, 1] scale)"),
):
    METRICS[f"mean_{_norm}"] = Metric(
        f"Mean {_label}",
        lambda c, k=_norm: getattr(c, f"mean_{k}"),
        lambda c, k=_norm: c.norm_ci.get(k, (math.nan, math.nan)),
        lambda c: str(c.n),
        BOOT_NOTE + "; n = attacked queries",
        percent=False,
        skip_clean=True,
    )


def table(cells: Sequence[Cell], key: str) -> list[str]:
    """Rows: attack configurations; columns: model x resolution (as the paper's tables). The
    header carries each column's n (the most common one); a cell resting on another n says
    so."""
    metric = METRICS[key]
    models = sorted({c.model for c in cells})
    resolutions = sorted({c.resolution for c in cells}, key=resolution_order)
    by_key = {(c.attack, c.model, c.resolution): c for c in cells}
    attacks = list(
        dict.fromkeys(c.attack for c in cells if not (metric.skip_clean and c.attack == CLEAN))
    )
    if not attacks:
        return []
    head, body = ["Attack configuration"], {a: [a] for a in attacks}
    for m in models:
        for r in resolutions:
            column = [by_key.get((a, m, r)) for a in attacks]
            ns = Counter(metric.n(c) for c in column if c is not None)
            common = ns.most_common(1)[0][0] if ns else "0"
            head.append(f"{m} {_res(r)} (n={common})")
            for a, c in zip(attacks, column, strict=True):
                if c is None:
                    body[a].append("-")
                    continue
                text = fmt_ci(metric.value(c), metric.interval(c), percent=metric.percent)
                if metric.n(c) != common and text != "-":
                    text += f" (n={metric.n(c)})"
                body[a].append(text)
    out = [f"## {metric.title}", "", f"Value [low, high]: {metric.note}.", ""]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(body[a]) + " |" for a in attacks]
    return out + [""]


def tables_section(ctx: Context) -> list[str]:
    out: list[str] = []
    for key in METRICS:
        out += table(ctx.cells, key)
    return out


# ---------------------------------------------------------------------------- run facts


def run_facts(ctx: Context) -> list[str]:
    out = []
    info = ctx.run_info
    if info:
        out.append(f"- configuration hash: `{str(info.get('config_hash', '?'))[:16]}`")
        for key in ("weights", "manifest_hash", "data"):
            if key in info:
                out.append(f"- {key}: `{json.dumps(info[key], sort_keys=True)}`")
        versions = info.get("versions", {})
        if versions:
            out.append("- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    out.append(f"- rows in the result store: {len(ctx.rows)}")
    queries = {r.sample_id for r in ctx.rows}
    identities = {r.identity for r in ctx.rows}
    out.append(f"- queries: {len(queries)} of {len(identities)} identities")
    seconds = defaultdict(float)
    for r in ctx.rows:
        if r.attack != CLEAN:
            seconds[r.attack] += r.seconds
    if seconds:
        out.append(
            "- attack seconds (sum over targets and resolutions): "
            + ", ".join(f"{a} {s:.1f}" for a, s in seconds.items())
        )
    return out + [""]


# ------------------------------------------------------------------------ classifier hook

CLASSIFIER_KEY = "classifiers"  # run.json: {label: {"kind": ..., "clean_accuracy": {res: x}}}


def classifier_section(ctx: Context) -> list[str]:
    """Which classifier each target's classification attacks (JSMA, CW, EAD) attacked, and its
    clean top-1 accuracy per resolution (from the clean rows: queries whose identity is a
    class, i.e. closed-set mated ones; Wilson interval).

    The kind ("softmax head" or "GalleryClassifier") is read from ``run.json`` under
    ``"classifiers"``: ``{"<target label>": {"kind": "...", ...}}``, written by the target
    when it records it; "not recorded" otherwise. A ``"clean_accuracy"`` mapping there
    (resolution -> accuracy, e.g. on held-out gallery photos) is shown beside the queries'."""
    recorded = ctx.run_info.get(CLASSIFIER_KEY, {}) if isinstance(ctx.run_info, dict) else {}
    models = sorted({r.model for r in ctx.rows})
    resolutions = sorted({r.resolution for r in ctx.rows}, key=resolution_order)
    clean = [r for r in ctx.rows if r.attack == CLEAN and r.mate_rank > 0]
    if not clean:
        return []
    out = [
        "## Classifier under the classification attacks",
        "",
        "Clean top-1 accuracy (%) of the classifier on the queries of enrolled identities, "
        "value [low, high] with the Wilson interval; n = those queries.",
        "",
        "| Target | classifier | " + " | ".join(f"{_res(r)} px" for r in resolutions) + " |",
        "|" + "---|" * (2 + len(resolutions)),
    ]
    for m in models:
        entry = recorded.get(m, {}) if isinstance(recorded, dict) else {}
        kind = entry.get("kind", "not recorded") if isinstance(entry, dict) else str(entry)
        cells = []
        for res in resolutions:
            here = [r for r in clean if r.model == m and r.resolution == res]
            k, n = sum(r.clean_top1 == r.identity for r in here), len(here)
            text = fmt_ci(k / n, wilson(k, n)) + f" (n={n})" if n else "-"
            extra = entry.get("clean_accuracy", {}) if isinstance(entry, dict) else {}
            if str(res) in extra:
                text += f"; recorded {fmt(float(extra[str(res)]))}"
            cells.append(text)
        out.append(f"| {m} | {kind} | " + " | ".join(cells) + " |")
    return out + [""]


# ----------------------------------------------------------------------------- Base vs CR


def base_vs_cr_section(ctx: Context) -> list[str]:
    pair = base_and_cr(r.model for r in ctx.rows)
    if pair is None:
        return []
    first, second = pair
    resolutions = sorted({r.resolution for r in ctx.rows}, key=resolution_order)
    out = [
        f"## {first} vs {second} (paired)",
        "",
        f"The same queries hit both targets; only queries whose outcome counts on both are "
        f"paired (n pairs). {second} - {first}: difference of the rates in percentage points "
        f"with a bootstrap interval over identities; p: exact two-sided McNemar test on the "
        f"paired outcomes; Holm: adjusted over the table's tests.",
        "",
    ]
    for name, outcome, with_clean in (
        ("attack success", success_outcome, False),
        ("rank-1 hit", hit_outcome, True),
    ):
        attacks = [a for a in dict.fromkeys(r.attack for r in ctx.rows) if with_clean or a != CLEAN]
        rows = paired_table(
            ctx.rows, first, second, outcome, attacks=attacks, resolutions=resolutions
        )
        if not rows:
            continue
        out += [
            f"### {name.capitalize()}",
            "",
            f"| Attack | resolution | n pairs | {first} (%) | {second} (%) | "
            f"{second} - {first} (pp) | p | p (Holm) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in rows:
            ka, kb = round(p.rate_first * p.n), round(p.rate_second * p.n)
            out.append(
                f"| {p.attack} | {_res(p.resolution)} | {p.n} | "
                f"{fmt_ci(p.rate_first, wilson(ka, p.n))} | "
                f"{fmt_ci(p.rate_second, wilson(kb, p.n))} | "
                f"{fmt_ci(p.difference, p.difference_ci)} | {fmt_p(p.pvalue)} | "
                f"{fmt_p(p.pvalue_holm)} |"
            )
        out.append("")
    return out


def feature_drift_section(ctx: Context) -> list[str]:
    """Mean ``||f(x_r) - f(x_original)||`` per target and resolution, and the paired
    comparison of the two targets (``report.drift``)."""
    cells = drift_cells(ctx.rows)
    if not cells:
        return []
    models = list(dict.fromkeys(c.model for c in cells))
    resolutions = sorted({c.resolution for c in cells}, key=resolution_order)
    at = {(c.model, c.resolution): c for c in cells}
    out = [
        "## Feature drift: r px -> the same face at the original resolution",
        "",
        "Mean L2 distance between a clean query's features at r px and the same face's at the "
        "original resolution, in each model's own feature space, with a bootstrap interval over "
        "identities (n = queries). Lower: the model sees a small face where it sees the large "
        "one, the cross-resolution claim. Distances are in each model's units "
        "(`benchmarks/cr_eval.py` also scales them by the distance between different people).",
        "",
        "| Target | " + " | ".join(f"{_res(r)} px" for r in resolutions) + " |",
        "|---|" + "---|" * len(resolutions),
    ]
    for m in models:
        cols = []
        for r in resolutions:
            c = at.get((m, r))
            cols.append("-" if c is None else f"{fmt_ci(c.mean, c.interval, percent=False)} "
                        f"(n={c.n})")  # fmt: skip
        out.append(f"| {m} | " + " | ".join(cols) + " |")
    out.append("")
    pair = base_and_cr(models)
    pairs = drift_pairs(ctx.rows, *pair) if pair else []
    pairs.sort(key=lambda p: resolution_order(p.resolution))
    if pairs:
        first, second = pair
        out += [
            f"{second} - {first} on the same queries: mean difference with a bootstrap interval "
            "over identities; p: two-sided Wilcoxon signed-rank test; Holm: adjusted over the "
            "resolutions tested.",
            "",
            f"| resolution | n pairs | {first} | {second} | {second} - {first} | p | p (Holm) |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in pairs:
            out.append(
                f"| {_res(p.resolution)} | {p.n} | {fmt(p.mean_first, False)} | "
                f"{fmt(p.mean_second, False)} | "
                f"{fmt_ci(p.difference, p.difference_ci, percent=False)} | {fmt_p(p.pvalue)} | "
                f"{fmt_p(p.pvalue_holm)} |"
            )
        out.append("")
    return out


# -------------------------------------------------------------------------------- figures


def dr_figures(ctx: Context) -> list[str]:
    """Figures 2-4: DR success, hit rate and FPIR@FNIR against delta (0-255 levels), one panel
    per resolution, one line per (model, steps), each point with its interval."""
    dr = [c for c in ctx.cells if c.params.get("class") == DR_CLASS]
    if not dr:
        return []
    resolutions = sorted({c.resolution for c in dr}, key=resolution_order)
    out = [
        "## Figures 2-4: DR against delta",
        "",
        "Error bars and bands: 95 % intervals (Wilson for the success and hit rates, bootstrap "
        "over identities for FPIR@FNIR).",
        "",
    ]
    specs = [
        ("success_rate", "attack success rate", lambda c: c.success_ci, "success_n"),
        ("hit_rate", "hit rate", lambda c: c.hit_ci, "hit_n"),
        ("fpir_at_fnir", f"FPIR @ FNIR={TARGET_FNIR:g}", lambda c: c.fpir_ci, "n"),
    ]
    for number, (key, label, interval, n_field) in enumerate(specs, start=2):
        panels: dict[str, dict[str, list[RatePoint]]] = {}
        for res in resolutions:
            lines: dict[str, list[RatePoint]] = defaultdict(list)
            ns: dict[str, set[int]] = defaultdict(set)
            for c in dr:
                value = getattr(c, key)
                if c.resolution != res or math.isnan(value):
                    continue
                name = f"{c.model}, {c.params.get('steps')} steps"
                low, high = interval(c)
                lines[name].append(
                    RatePoint(255 * float(c.params.get("epsilon", 0)), value, low, high)
                )
                ns[name].add(getattr(c, n_field))
            panels[f"{_res(res)} px"] = {
                f"{k} (n={'/'.join(map(str, sorted(ns[k])))})": v for k, v in lines.items()
            }
        name = f"figure{number}_dr_{key}.png"
        plot_rate_curves(
            panels,
            ctx.fig_dir / name,
            xlabel="delta (0-255 levels)",
            ylabel=label,
            title=f"Figure {number}: DR {label} against delta",
        )
        out += [f"![Figure {number}: DR {label}](figures/{name})", ""]
    return out


def identification_figures(ctx: Context) -> list[str]:
    """CMC and DET (log-log, FNIR = 1e-2 marked) per model and resolution, one line per attack."""
    out = ["## Identification curves", ""]
    groups = group(ctx.rows)
    cells = ctx.cells
    for model in sorted({c.model for c in cells}):
        for res in sorted({c.resolution for c in cells if c.model == model}, key=resolution_order):
            here = [c for c in cells if c.model == model and c.resolution == res]
            cmc = {c.attack: _tensor(c.cmc) for c in here if c.cmc}
            dets = {c.attack: d for c in here if (d := det_curve(groups[(model, c.attack, res)]))}
            stem = f"{_slug(model)}_r{res}"
            if cmc:
                plot_cmc(cmc, ctx.fig_dir / f"cmc_{stem}.png", title=f"CMC {model} {_res(res)} px")
                out.append(f"![CMC {model} {res}](figures/cmc_{stem}.png)")
            if dets:
                plot_det(
                    dets,
                    ctx.fig_dir / f"det_{stem}.png",
                    target_fnir=TARGET_FNIR,
                    title=f"DET {model} {_res(res)} px",
                )
                out.append(f"![DET {model} {res}](figures/det_{stem}.png)")
    return out + [""]


# ------------------------------------------------------------------------------- findings


def findings_section(ctx: Context) -> list[str]:
    """The paper's three findings, each with its test, cells, and verdict
    (``report.findings`` holds the decision rule)."""
    found = findings(ctx.rows)
    out = [
        "## Findings of the paper",
        "",
        f"Each finding is decided by paired comparisons of the stored outcomes: an exact "
        f"one-sided McNemar test per comparison in each direction, Holm-adjusted over all of "
        f"the finding's tests (alpha = {ALPHA:g}). **reproduced**: at least one comparison, and "
        f"at least half of the decidable ones, significant in the paper's direction and none "
        f"against; **not reproduced**: some comparison significant against; **undecided at "
        f"this n** otherwise. A comparison is decidable when its number of discordant pairs "
        f"could give a significant result at all (2^-(b+c) < alpha / number of tests).",
        "",
    ]
    for f in found:
        out += finding_lines(f)
    return out


def finding_lines(f: Finding) -> list[str]:
    out = [
        f"### Finding {f.number}: {f.title}: **{f.verdict}**",
        "",
        f"- test: {f.test}",
        f"- decided by: {f.reason}",
        "",
    ]
    if not f.comparisons:
        return out
    significant = [c for c in f.comparisons if c.significant_for or c.significant_against]
    if significant:
        out.append(
            "- significant cells: "
            + "; ".join(
                f"{c.label} ({c.outcome}, {'for' if c.significant_for else 'against'}, "
                f"Holm p {fmt_p(c.p_for_holm if c.significant_for else c.p_against_holm)})"
                for c in significant
            )
        )
        out.append("")
    out += [
        "<details><summary>every comparison</summary>",
        "",
        "| Comparison | outcome | n pairs | paper's higher side (%) | other side (%) | b | c | "
        "p for | Holm | p against | Holm | decidable |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in f.comparisons:
        ka, kb = round(c.rate_a * c.n), round(c.rate_b * c.n)
        out.append(
            f"| {c.label} | {c.outcome} | {c.n} | {fmt_ci(c.rate_a, wilson(ka, c.n))} | "
            f"{fmt_ci(c.rate_b, wilson(kb, c.n))} | {c.b} | {c.c} | {fmt_p(c.p_for)} | "
            f"{fmt_p(c.p_for_holm)} | {fmt_p(c.p_against)} | {fmt_p(c.p_against_holm)} | "
            f"{'yes' if c.decidable else 'no'} |"
        )
    return out + ["", "</details>", ""]


def threats_section(ctx: Context) -> list[str]:
    """Threat models beyond the paper: the low-resolution space, transfer, verification."""
    return threat_sections(ctx.rows, ctx.fig_dir)


SECTIONS: list[Callable[[Context], list[str]]] = [
    run_facts,
    classifier_section,
    tables_section,
    base_vs_cr_section,
    feature_drift_section,
    dr_figures,
    identification_figures,
    threats_section,
    # new sections go here; the findings stay last
    findings_section,
]


def _tensor(values):
    import torch

    return torch.tensor(values, dtype=torch.float64)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-").lower()
