"""Base versus cross-resolution (CR) dlib embedder on the embedded photos, with paired tests.

Measured on the held-out queries (the uncapped split's queries, a superset of the default run's
and the full embedded set's; never trained on), for Base and each CR model:

1. feature distance: ``||f(x_r) - f(x_full)||``, the r-px photo's embedding to the same
   model's embedding of the full-resolution photo, r = 16, 24, 64 (lower: more
   resolution-invariant; dlib's same-person threshold is 0.6), mean with a bootstrap 95%
   interval; beside it the same divided by the model's "spread" (mean full-resolution
   distance between query photos of different people), since a model could shrink every
   distance by shrinking its space. Paired Wilcoxon signed-rank test CR vs Base (Holm over
   the resolutions). The same on the holdout: the training photos kept out of training, on
   which recipes are to be compared (never on the queries).
2. clean rank-1 hit rate of the mated queries per resolution (templates: each model's own, at
   full resolution; Euclidean scoring as dlib's), Wilson 95% intervals, exact McNemar p
   (Holm over the resolutions).
3. DR impersonation success against delta (Figure 2 style): ``DeepRepresentation`` with
   ``--dr-steps`` L-BFGS-B steps at delta in ``--deltas`` /255, on the mated queries at
   ``--dr-resolutions``; the target identity of each query is drawn once (seeded by its sample
   id) from the other gallery identities and is the same for every model, delta and
   resolution, so outcomes pair up. Wilson intervals, McNemar p per (resolution, delta),
   Holm over all of them.

    python benchmarks/cr_eval.py --out cr_eval.json   # trains the CR weights once if absent
    python benchmarks/cr_eval.py --weights student.pt --compare old=old.pt --out out.json

``--compare LABEL=PATH`` adds more CR weights (distances and hit rates; DR only for
``--weights``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from crossres.attacks.dr import DeepRepresentation
from crossres.cli import run_lightning
from crossres.datamodules.base import FaceTable
from crossres.datamodules.cr_data import CrossResolutionDataModule
from crossres.datamodules.embedded import EmbeddedFacesDataModule
from crossres.datamodules.resolution import ORIGINAL
from crossres.lightning_modules.cr_recipe import CR_DLIB_RECIPE, ensure_cr_dlib_weights
from crossres.metrics import bootstrap_mean_interval, holm, mcnemar_paired, wilson_interval
from crossres.metrics.scoring import search
from crossres.models.registry import build_model
from crossres.models.templates import compute_templates

DIST_RESOLUTIONS = (16, 24, 64)
HIT_RESOLUTIONS = (16, 24, 64, 256)
SEED = 0


@dataclass
class Embedded:
    """One model's figures: features per resolution of the queries and the holdout, the
    gallery templates, and the query images kept for DR."""

    label: str
    model: Any
    query: dict[int, torch.Tensor] = field(default_factory=dict)
    holdout: dict[int, torch.Tensor] = field(default_factory=dict)
    gallery: Any = None


def rows(table: FaceTable, index: list[int]) -> FaceTable:
    i = np.asarray(index, dtype=np.int64)
    return FaceTable(
        paths=[table.paths[k] for k in index],
        identity=table.identity[i],
        sample_id=table.sample_id[i],
    )


class Loaded(torch.utils.data.Dataset):
    """The items of a crossres dataset, read (and degraded) once and shared by every model."""

    def __init__(self, dataset) -> None:
        self.items = [dataset[k] for k in range(len(dataset))]
        self.collate = dataset.collate

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        return self.items[k]

    def loader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self, batch_size=32, collate_fn=self.collate)


def features(model, items: Loaded, keep: tuple[int, ...] = ()):
    """{r: features [N, D]} of the photos of ``items`` (resolution-major: table order within a
    resolution), and {r: images} for the resolutions in ``keep``."""
    feats: dict[int, list[torch.Tensor]] = {}
    images: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for b in items.loader():
            f = model.features(b.images)
            for r in torch.unique(b.resolution).tolist():
                feats.setdefault(int(r), []).append(f[b.resolution == r])
                if int(r) in keep:
                    images.setdefault(int(r), []).append(b.images[b.resolution == r])
    return {r: torch.cat(v) for r, v in feats.items()}, {r: torch.cat(v) for r, v in images.items()}


def interval(values: np.ndarray) -> dict:
    low, high = bootstrap_mean_interval(values, seed=SEED)
    return {"mean": float(values.mean()), "ci": [float(low), float(high)], "n": int(len(values))}


def rate(outcomes: np.ndarray) -> dict:
    k, n = int(outcomes.sum()), int(len(outcomes))
    low, high = wilson_interval(k, n)
    return {"k": k, "n": n, "rate": k / n, "ci": [low, high]}


def spread(full: torch.Tensor, ids: torch.Tensor) -> float:
    other = ids[:, None] != ids[None, :]
    return float(torch.cdist(full, full)[other].mean())


def distance_section(models: list[Embedded], ids: torch.Tensor, where: str) -> dict:
    """Per resolution: each model's distance low -> own full (mean, CI, relative to its
    spread) and the Wilcoxon p of each CR model against Base, Holm over the resolutions."""
    out: dict = {}
    base = models[0]
    per_model_d = {
        m.label: {
            r: (getattr(m, where)[r] - getattr(m, where)[ORIGINAL]).norm(dim=1).numpy()
            for r in DIST_RESOLUTIONS
        }
        for m in models
    }
    spreads = {m.label: spread(getattr(m, where)[ORIGINAL], ids) for m in models}
    for r in DIST_RESOLUTIONS:
        cell: dict = {}
        for m in models:
            d = per_model_d[m.label][r]
            cell[m.label] = {**interval(d), "relative": float(d.mean() / spreads[m.label])}
        out[f"r{r}"] = cell
    for m in models[1:]:
        ps = [
            float(stats.wilcoxon(per_model_d[m.label][r], per_model_d[base.label][r]).pvalue)
            for r in DIST_RESOLUTIONS
        ]
        for r, p, ph in zip(DIST_RESOLUTIONS, ps, holm(ps), strict=True):
            out[f"r{r}"][m.label].update(wilcoxon_p=p, wilcoxon_p_holm=float(ph))
    out["spread"] = spreads
    return out


def hit_section(models: list[Embedded], ids: torch.Tensor) -> tuple[dict, np.ndarray]:
    out: dict = {}
    hits: dict[str, dict[int, np.ndarray]] = {}
    mated = None
    for m in models:
        hits[m.label] = {}
        for r in HIT_RESOLUTIONS:
            s = search(
                m.query[r], m.gallery.features, m.gallery.ids, ids, k=1, metric="neg_euclidean"
            ).summary
            mated = s.mated.numpy()
            hits[m.label][r] = (s.mate_rank[s.mated] == 1).numpy()
    for r in HIT_RESOLUTIONS:
        out[f"r{r}"] = {m.label: rate(hits[m.label][r]) for m in models}
    for m in models[1:]:
        tests = [
            mcnemar_paired(hits[m.label][r], hits[models[0].label][r]) for r in HIT_RESOLUTIONS
        ]
        adjusted = holm([t.pvalue for t in tests])
        for r, t, ph in zip(HIT_RESOLUTIONS, tests, adjusted, strict=True):
            out[f"r{r}"][m.label].update(
                cr_only=t.b, base_only=t.c, mcnemar_p=t.pvalue, mcnemar_p_holm=float(ph)
            )
    return out, mated


def draw_targets(sample_ids: torch.Tensor, own: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """One impersonation target per query, != its own identity, seeded by (SEED, sample id)."""
    out = []
    for sid, ident in zip(sample_ids.tolist(), own.tolist(), strict=True):
        choices = pool[pool != ident]
        g = np.random.default_rng([SEED, int(sid) & 0x7FFFFFFF])
        out.append(int(choices[int(g.integers(len(choices)))]))
    return torch.as_tensor(out, dtype=torch.long)


def dr_section(
    pair: list[Embedded], images: dict[int, torch.Tensor], targets: torch.Tensor, args
) -> dict:
    out: dict = {}
    tests, keys = [], []
    for r in args.dr_resolutions:
        for delta in args.deltas:
            cell, succ = {}, {}
            for m in pair:
                attack = DeepRepresentation(epsilon=delta / 255, steps=args.dr_steps)
                t0 = time.perf_counter()
                res = attack(m.model, images[r], targets=targets, gallery=m.gallery)
                succ[m.label] = res.success.numpy()
                cell[m.label] = {**rate(succ[m.label]), "seconds": time.perf_counter() - t0}
            t = mcnemar_paired(succ[pair[1].label], succ[pair[0].label])
            cell[pair[1].label].update(cr_only=t.b, base_only=t.c, mcnemar_p=t.pvalue)
            out.setdefault(f"r{r}", {})[f"d{delta:g}"] = cell
            tests.append(t.pvalue)
            keys.append((r, delta))
            print(
                f"  DR r={r} delta={delta:g}/255: "
                + ", ".join(f"{m.label} {cell[m.label]['k']}/{cell[m.label]['n']}" for m in pair),
                flush=True,
            )
    for (r, delta), ph in zip(keys, holm(tests), strict=True):
        out[f"r{r}"][f"d{delta:g}"][pair[1].label]["mcnemar_p_holm"] = float(ph)
    return out


def pct(cell: dict) -> str:
    lo, hi = cell["ci"]
    return f"{100 * cell['rate']:5.1f} [{100 * lo:4.1f}, {100 * hi:5.1f}]"


def print_tables(record: dict, labels: list[str]) -> None:
    crs = labels[1:]
    for where, title in (
        ("distance_queries", "held-out queries"),
        ("distance_holdout", "holdout (validation)"),
    ):
        sec = record[where]
        print(
            f"\nfeature distance r px -> own full resolution, {title} (mean [95% CI]; /spread; Wilcoxon p vs Base, Holm)"
        )
        for r in DIST_RESOLUTIONS:
            cells = sec[f"r{r}"]
            line = f"  {r:3d}px n={cells[labels[0]]['n']:3d}"
            for lab in labels:
                c = cells[lab]
                line += f" | {lab} {c['mean']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}] /{c['relative']:.2f}"
                if "wilcoxon_p" in c:
                    line += f" p={c['wilcoxon_p']:.2g} ({c['wilcoxon_p_holm']:.2g})"
            print(line)
        print("  spread: " + ", ".join(f"{k} {v:.3f}" for k, v in sec["spread"].items()))
    print(
        "\nclean rank-1 hit rate, mated held-out queries (% [Wilson 95%]; McNemar p vs Base, Holm)"
    )
    for r in HIT_RESOLUTIONS:
        cells = record["hit_rate"][f"r{r}"]
        line = f"  {r:3d}px n={cells[labels[0]]['n']:3d}"
        for lab in labels:
            c = cells[lab]
            line += f" | {lab} {pct(c)}"
            if lab in crs:
                line += f" +{c['cr_only']}/-{c['base_only']} p={c['mcnemar_p']:.2g} ({c['mcnemar_p_holm']:.2g})"
        print(line)
    if "dr" in record:
        a, b = record["dr_models"]
        print(
            f"\nDR impersonation success vs delta ({record['dr_steps']} steps; % [Wilson 95%]; McNemar p {b} vs {a}, Holm over all cells)"
        )
        for rk, row in record["dr"].items():
            for dk, c in row.items():
                print(
                    f"  {rk:>4s} delta={dk[1:]:>3s}/255 n={c[a]['n']:3d} | {a} {pct(c[a])} | {b} {pct(c[b])}"
                    f" +{c[b]['cr_only']}/-{c[b]['base_only']} p={c[b]['mcnemar_p']:.2g} ({c[b]['mcnemar_p_holm']:.2g})"
                )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--weights", type=Path, help="CR weights (default: ensure_cr_dlib_weights())")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="more CR weights to compare with Base (no DR)",
    )
    p.add_argument("--faces-cache", default=None)
    p.add_argument("--deltas", type=float, nargs="+", default=[1, 2, 4, 8], help="in /255")
    p.add_argument("--dr-steps", type=int, default=5)
    p.add_argument("--dr-resolutions", type=int, nargs="*", default=[16, 64])
    p.add_argument("--out", "--json", dest="out", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    torch.manual_seed(SEED)
    t_start = time.perf_counter()

    recipe_data = CR_DLIB_RECIPE["data"]["init_args"]
    src = dict(recipe_data["source"]["init_args"])
    src.update(faces_cache=args.faces_cache, input_size=150, resize_shortest=None)
    dm = EmbeddedFacesDataModule(**src)
    dm.setup("test")
    cr_dm = CrossResolutionDataModule(dm, holdout=recipe_data["holdout"], seed=recipe_data["seed"])
    holdout = rows(dm.gallery_table(), cr_dm.holdout_rows())
    weights = (
        args.weights
        or ensure_cr_dlib_weights(
            fit=run_lightning,
            faces_cache=args.faces_cache,
        ).path
    )
    specs = [("Base", None), ("CR", str(weights))]
    for item in args.compare:
        label, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--compare wants LABEL=PATH, got {item!r}")
        specs.append((label, path))

    q_ids = torch.as_tensor(dm.query_table.identity)
    h_ids = torch.as_tensor(holdout.identity)
    res = sorted({*DIST_RESOLUTIONS, *HIT_RESOLUTIONS, ORIGINAL})
    query_items = Loaded(dm._make_dataset(dm.query_table, res))
    holdout_items = Loaded(dm._make_dataset(holdout, [*DIST_RESOLUTIONS, ORIGINAL]))
    gallery_items = Loaded(dm.gallery_dataset())
    models: list[Embedded] = []
    images: dict[int, torch.Tensor] = {}
    for label, path in specs:
        model = build_model("dlib_resnet29", weights=path).eval()
        m = Embedded(label, model)
        m.query, imgs = features(model, query_items, keep=tuple(args.dr_resolutions))
        images = images or imgs
        m.holdout, _ = features(model, holdout_items)
        m.gallery = compute_templates(
            model, gallery_items.loader(), num_classes=dm.num_classes, cache=False
        )
        models.append(m)
    labels = [m.label for m in models]
    record: dict = {
        "command": "python benchmarks/cr_eval.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "weights": {lab: path for lab, path in specs},
        "n_queries": len(dm.query_table),
        "n_holdout": len(holdout),
        "n_training_pool": len(dm.gallery_table()),
        "distance_queries": distance_section(models, q_ids, "query"),
        "distance_holdout": distance_section(models, h_ids, "holdout"),
    }
    record["hit_rate"], mated = hit_section(models, q_ids)
    if args.dr_resolutions:
        keep = torch.as_tensor(mated)
        pool = torch.unique(models[0].gallery.ids)
        targets = draw_targets(torch.as_tensor(dm.query_table.sample_id)[keep], q_ids[keep], pool)
        record.update(dr_models=labels[:2], dr_steps=args.dr_steps, deltas=args.deltas)
        record["dr"] = dr_section(
            models[:2], {r: images[r][keep] for r in args.dr_resolutions}, targets, args
        )
    record["seconds"] = round(time.perf_counter() - t_start, 1)
    print(f"weights: {specs}")
    print(
        f"held-out queries: {record['n_queries']} photos ({int(mated.sum())} mated); training "
        f"pool {record['n_training_pool']} photos, of which holdout {record['n_holdout']}; "
        f"{record['seconds']:.0f} s"
    )
    print_tables(record, labels)
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
