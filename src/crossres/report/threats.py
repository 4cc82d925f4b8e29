"""Report sections beyond the paper, each a view of the result rows returning markdown lines:

- ``space_section``: the threat model (``space``) of every attack configuration, and, where a
  run has attacks in both spaces, one table side by side: success, hit rate, FPIR@FNIR and
  norms (each measured in its own space: model-input pixels or the low-resolution capture's).
- ``transfer_section``: the transfer matrices of ``crossres transfer`` rows (source target x
  evaluated target, per source -> evaluated resolution): attack success and hit rate with
  95% Wilson intervals. The diagonal is the attack on its own target (its own rows, or a
  self-transfer where one was evaluated).
- ``verification_section``: 1:1 verification, TAR at FAR = 1e-3 and 1e-2 per target x attack x
  resolution, with ROC figures (see its docstring for the pairs).

``threat_sections(rows, fig_dir)`` is all three, what ``report.markdown`` appends.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib
import torch
from matplotlib.figure import Figure

from crossres.metrics import tar_at_far, verification_operating_point, verification_roc
from crossres.metrics.intervals import wilson_interval
from crossres.report.tables import TARGET_FNIR, Cell, summarize
from crossres.store import CLEAN, ResultRow

FARS = (1e-3, 1e-2)
FEATURE_OBJECTIVES = ("impersonation", "dodging")
TRANSFER = "transfer"  # the params key of a transfer row (see crossres.transfer)


def threat_sections(rows: Sequence[ResultRow], fig_dir: Path) -> list[str]:
    rows = list(rows)
    return space_section(rows) + transfer_section(rows) + verification_section(rows, fig_dir)


def _order(res: int) -> float:
    return res if res > 0 else math.inf


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _num(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3g}"


def _is_transfer(row: ResultRow) -> bool:
    return TRANSFER in json.loads(row.params)


# ------------------------------------------------------------------ threat model (space)
def space_section(rows: Sequence[ResultRow]) -> list[str]:
    """The space of every attack configuration; both spaces side by side when both ran."""
    attacked = [r for r in rows if r.attack != CLEAN and not _is_transfer(r)]
    if not attacked:
        return []
    space = {}
    for r in attacked:
        space.setdefault(r.attack, set()).add(r.space)
    out = ["## Threat model per attack configuration", ""]
    out += [
        f"- {a}: {', '.join(sorted(s))}"
        + (" (perturbs the low-resolution capture)" if "low_resolution" in s else "")
        for a, s in space.items()
    ]
    out.append("")
    if {sp for s in space.values() for sp in s} != {"model_input", "low_resolution"}:
        return out
    cells = {(c.model, c.attack, c.resolution): c for c in summarize(rows)}
    out += [
        "## Model-input vs low-resolution space",
        "",
        "Norms in the space the attack worked in ([0, 1] scale): model-input pixels or the "
        "low-resolution capture's.",
        "",
        "| Model | Resolution | Attack | Space | n | Success (%) | Hit rate (%) | "
        f"FPIR @ FNIR={TARGET_FNIR:g} (%) | Mean L2 | Mean Linf |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def key(c: Cell) -> tuple:  # both spaces of one attack next to each other
        return (c.model, _order(c.resolution), json.dumps(c.params, sort_keys=True), c.attack)

    seen: set[tuple[str, int]] = set()
    for c in sorted((c for c in cells.values() if c.attack in space), key=key):
        clean = cells.get((c.model, CLEAN, c.resolution))
        if clean is not None and (c.model, c.resolution) not in seen:
            seen.add((c.model, c.resolution))
            out.append(
                f"| {c.model} | {c.resolution or 'orig'} | clean | - | {clean.n} | - | "
                f"{_pct(clean.hit_rate)} | {_pct(clean.fpir_at_fnir)} | - | - |"
            )
        out.append(
            f"| {c.model} | {c.resolution or 'orig'} | {c.attack} | "
            f"{'/'.join(sorted(space[c.attack]))} | {c.n} | {_pct(c.success_rate)} | "
            f"{_pct(c.hit_rate)} | {_pct(c.fpir_at_fnir)} | {_num(c.mean_l2)} | "
            f"{_num(c.mean_linf)} |"
        )
    return out + [""]


# ------------------------------------------------------------------ transfer
def success_counts(rows: Sequence[ResultRow]) -> tuple[int, int]:
    """(successes, trials) as ``tables.attack_success`` counts them: feature objectives over
    every search; classification objectives over the correctly classified clean samples."""
    params = json.loads(rows[0].params)
    if params.get("objective") in FEATURE_OBJECTIVES:
        return sum(bool(r.success) for r in rows), len(rows)
    correct = [r for r in rows if r.clean_top1 == r.identity]
    if params.get("objective") == "targeted":
        return sum(r.adv_top1 == r.target for r in correct), len(correct)
    return sum(r.adv_top1 != r.identity for r in correct), len(correct)


def hit_counts(rows: Sequence[ResultRow]) -> tuple[int, int]:
    """(probes whose mate ranks first, probes with a mate) = the hit rate's counts."""
    mated = [r for r in rows if r.mate_rank > 0]
    return sum(r.mate_rank == 1 for r in mated), len(mated)


def _with_interval(k: int, n: int) -> str:
    if n == 0:
        return "-"
    low, high = wilson_interval(k, n)
    return f"{100 * k / n:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def transfer_section(rows: Sequence[ResultRow]) -> list[str]:
    """Per source attack and (source -> evaluated resolution): a matrix of source target
    (rows) x evaluated target (columns), cells "success % [95% CI] / hit % [95% CI]"."""
    cells: dict[tuple, list[ResultRow]] = defaultdict(list)
    own: dict[tuple, list[ResultRow]] = defaultdict(list)
    for r in rows:
        params = json.loads(r.params)
        info = params.get(TRANSFER)
        if info:
            key = (info["source_attack"], info["source_resolution"], r.resolution)
            cells[key + (info["source_model"], r.model)].append(r)
        elif r.attack != CLEAN:
            own[(r.attack, r.resolution, r.resolution, r.model, r.model)].append(r)
    if not cells:
        return []
    out = [
        "## Transfer of stored adversarials (`crossres transfer`)",
        "",
        "Cells: attack success (%) / hit rate (%), each with its 95% Wilson interval; rows: "
        "the target the adversarials were crafted on, columns: the target they were "
        "evaluated on. The diagonal is the attack on its own target.",
        "",
    ]
    blocks = sorted({k[:3] for k in cells}, key=lambda t: (t[0], _order(t[1]), _order(t[2])))
    for k, v in own.items():  # the diagonal, where no self-transfer was evaluated
        cells.setdefault(k, v)
    for attack, r_src, r_eval in blocks:
        here = {
            (s, e): v
            for (a, rs, re, s, e), v in cells.items()
            if (a, rs, re) == (attack, r_src, r_eval)
        }
        sources = sorted({s for s, _ in here})
        evaluated = sorted({e for _, e in here})
        out += [
            f"### {attack}: crafted at {r_src or 'orig'} px, evaluated at {r_eval or 'orig'} px",
            "",
            "| source \\ evaluated | " + " | ".join(evaluated) + " |",
            "|---|" + "---|" * len(evaluated),
        ]
        for s in sources:
            vals = []
            for e in evaluated:
                members = here.get((s, e))
                if not members:
                    vals.append("-")
                    continue
                vals.append(
                    f"{_with_interval(*success_counts(members))} / "
                    f"{_with_interval(*hit_counts(members))}"
                )
            out.append(f"| {s} | " + " | ".join(vals) + " |")
        out.append("")
    return out


# ------------------------------------------------------------------ verification (1:1)
def verification_pairs(
    attacked: Sequence[ResultRow], clean: dict[tuple, ResultRow]
) -> dict[str, torch.Tensor | str]:
    """The pair scores of one (target, attack, resolution) cell.

    Genuine pairs: each probe with an enrolled identity against its own mate template
    (``mate_score``), clean and attacked. Impostor pairs: each probe against the impersonation
    target's template (``clean_target_score`` / ``target_score``) when the attack has targets,
    else against its best non-mate template (``best_nonmate_score``: the identity an untargeted
    attack most likely lands on), clean and attacked. Probes whose clean row is missing are left
    out; NaN scores (no template) are dropped pair by pair.
    """
    pairs = [(r, clean.get((r.model, r.sample_id, r.resolution))) for r in attacked]
    pairs = [(a, c) for a, c in pairs if c is not None]
    has_target = any(not math.isnan(a.target_score) for a, _ in pairs)

    def scores(values: Iterable[float]) -> torch.Tensor:
        t = torch.tensor(list(values), dtype=torch.float64)
        return t[~torch.isnan(t)]

    genuine = [(a, c) for a, c in pairs if a.mate_rank > 0 and c.mate_rank > 0]
    if has_target:
        imp_clean = scores(a.clean_target_score for a, _ in pairs)
        imp_adv = scores(a.target_score for a, _ in pairs)
        kind = "impersonation target"
    else:
        imp_clean = scores(c.best_nonmate_score for _, c in pairs)
        imp_adv = scores(a.best_nonmate_score for a, _ in pairs)
        kind = "best non-mate"
    return {
        "genuine_clean": scores(c.mate_score for _, c in genuine),
        "genuine_attacked": scores(a.mate_score for a, _ in genuine),
        "impostor_clean": imp_clean,
        "impostor_attacked": imp_adv,
        "impostor": kind,
    }


def verification_rates(pairs: dict) -> dict[str, float]:
    """TAR@FAR for each FAR in ``FARS``: clean (clean genuine vs clean impostor pairs),
    dodging (attacked genuine pairs at the threshold the clean impostors set) and
    impersonation (clean genuine pairs at the threshold the attacked impostors set), plus the
    share of attacked impostors accepted at the clean threshold (FAR under attack)."""
    gc, ga = pairs["genuine_clean"], pairs["genuine_attacked"]
    ic, ia = pairs["impostor_clean"], pairs["impostor_attacked"]
    out: dict[str, float] = {}
    if min(len(gc), len(ga), len(ic), len(ia)) == 0:
        return out
    clean_roc = verification_roc(gc, ic)
    for far in FARS:
        out[f"clean@{far:g}"] = float(tar_at_far(gc, ic, far))
        out[f"dodging@{far:g}"] = float(tar_at_far(ga, ic, far))
        out[f"impersonation@{far:g}"] = float(tar_at_far(gc, ia, far))
        threshold = verification_operating_point(clean_roc, far).threshold
        out[f"attacked_far@{far:g}"] = float((ia >= threshold).double().mean())
    return out


def verification_section(rows: Sequence[ResultRow], fig_dir: Path) -> list[str]:
    """TAR@FAR per target x attack x resolution (see ``verification_rates``) and one ROC
    figure per target x resolution (clean, and per attack its dodging and impersonation)."""
    rows = [r for r in rows if not _is_transfer(r)]
    clean = {(r.model, r.sample_id, r.resolution): r for r in rows if r.attack == CLEAN}
    groups: dict[tuple, list[ResultRow]] = defaultdict(list)
    for r in rows:
        if r.attack != CLEAN:
            groups[(r.model, r.resolution, r.attack)].append(r)
    if not groups:
        return []
    heads = [f"{k}@{far:g}" for far in FARS for k in ("clean", "dodging", "impersonation")]
    heads += [f"attacked_far@{far:g}" for far in FARS]
    out = [
        "## Verification (1:1): TAR @ FAR",
        "",
        "Genuine pairs: probe vs its own mate template; impostor pairs: probe vs the "
        "impersonation target's template (attacks with a target) or its best non-mate "
        "template (others). clean: clean pairs; dodging: attacked genuine pairs at the "
        "threshold the clean impostors set; impersonation: clean genuine pairs at the "
        "threshold the attacked impostors set; attacked FAR: attacked impostors accepted at "
        "the clean threshold. With n impostor pairs FAR resolves only in steps of 1/n.",
        "",
        "| Model | Resolution | Attack | impostor pairs | n gen / imp | "
        + " | ".join(f"{h.replace('_', ' ')} (%)" for h in heads)
        + " |",
        "|" + "---|" * (5 + len(heads)),
    ]
    curves: dict[tuple, dict[str, tuple]] = defaultdict(dict)
    for (model, res, attack), members in sorted(
        groups.items(), key=lambda kv: (kv[0][0], _order(kv[0][1]), kv[0][2])
    ):
        pairs = verification_pairs(members, clean)
        rates = verification_rates(pairs)
        n = f"{len(pairs['genuine_clean'])} / {len(pairs['impostor_clean'])}"
        out.append(
            f"| {model} | {res or 'orig'} | {attack} | {pairs['impostor']} | {n} | "
            + " | ".join(_pct(rates.get(h, math.nan)) for h in heads)
            + " |"
        )
        if rates:
            gc, ga = pairs["genuine_clean"], pairs["genuine_attacked"]
            ic, ia = pairs["impostor_clean"], pairs["impostor_attacked"]
            curves[(model, res)][f"clean ({pairs['impostor']})"] = verification_roc(gc, ic)
            curves[(model, res)][f"{attack}: dodging"] = verification_roc(ga, ic)
            curves[(model, res)][f"{attack}: impersonation"] = verification_roc(gc, ia)
    out.append("")
    fig_dir.mkdir(parents=True, exist_ok=True)
    for (model, res), rocs in sorted(curves.items(), key=lambda kv: (kv[0][0], _order(kv[0][1]))):
        name = f"roc_{_slug(model)}_r{res}.png"
        plot_rocs(rocs, fig_dir / name, title=f"ROC {model} {res or 'orig'} px")
        out.append(f"![ROC {model} {res}](figures/{name})")
    return out + [""]


def plot_rocs(rocs: dict[str, tuple], path: Path, *, title: str) -> None:
    """TAR against FAR (log x axis; FAR = 0 points drawn at the axis floor, which comes from the
    data: half the smallest non-zero FAR, at most 1e-3 so both marked FARs show). One colour
    per attack configuration (clean in black), solid for dodging, dashed for impersonation;
    the legend sits outside the axes so that it never covers a curve."""
    fig = Figure(figsize=(6.5, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    nonzero = [float(r.far[r.far > 0].min()) for r in rocs.values() if bool((r.far > 0).any())]
    floor = min([1e-3, *(f / 2 for f in nonzero)])
    attacks = list(dict.fromkeys(label.split(":")[0] for label in rocs if ":" in label))
    cmap = matplotlib.colormaps["tab20"]
    colours = {a: cmap(i % 20) for i, a in enumerate(attacks)}
    for label, roc in rocs.items():
        attack, _, kind = label.partition(":")
        colour = colours.get(attack, "black")
        style = "--" if "impersonation" in kind or "impersonation" in attack else "-"
        far = roc.far.clamp(min=floor).numpy()
        ax.step(far, roc.tar.numpy(), where="post", label=label, color=colour, ls=style, lw=1.2)
    for far in FARS:
        ax.axvline(far, color="grey", lw=0.5, ls=":")
    ax.set(xscale="log", xlim=(floor, 1.0), ylim=(-0.02, 1.02), xlabel="FAR", ylabel="TAR")
    ax.set_title(title)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-").lower()
