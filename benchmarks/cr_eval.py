"""Base versus cross-resolution (CR) dlib embedder on the embedded photos, before and after.

Measured on the held-out query photos (never trained on): for each model,

- the mean Euclidean distance between a photo's embedding at 16 / 24 px (the benchmark's PIL
  pipeline) and the same model's embedding of the full-resolution photo (lower: more
  resolution-invariant; dlib's same-person threshold is 0.6), and the distance to the Base
  model's full-resolution embedding (what CR training pulls towards); beside them the mean
  distance between full-resolution photos of different people ("spread"), since a model
  could shrink every distance by shrinking its embedding space;
- the close-set rank-1 hit rate of the mated queries at each resolution, against gallery
  templates made by the same model at full resolution (cosine and Euclidean scoring).

The same distances on the training (gallery) photos show how much of a gain is fitting.
Paired tests (Wilcoxon on the per-photo distances; discordant pairs for the hit rates) say
whether a difference is more than noise on this little data.

    python benchmarks/cr_eval.py                      # trains the CR weights once if absent
    python benchmarks/cr_eval.py --weights student.pt --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from scipy import stats

from crossres.cli import run_lightning
from crossres.datamodules.base import ORIGINAL
from crossres.datamodules.embedded import EmbeddedFacesDataModule
from crossres.lightning_modules.cr_recipe import CR_DLIB_RECIPE, ensure_cr_dlib_weights
from crossres.metrics.functional import cmc_from_ranks
from crossres.metrics.scoring import search
from crossres.models.registry import build_model
from crossres.models.templates import compute_templates

RESOLUTIONS = (16, 24, 64, 256)


def features_by_resolution(model, dm, table_kind: str, resolutions) -> tuple[dict, torch.Tensor]:
    """{resolution: features [N, D]} of the query (or gallery) photos, and their identities."""
    src = dm.query_dataset() if table_kind == "query" else dm.gallery_dataset()
    table = src.table
    ds = dm._make_dataset(table, list(resolutions))  # resolution-major items
    loader = torch.utils.data.DataLoader(ds, batch_size=32, collate_fn=ds.collate)
    feats: dict[int, list[torch.Tensor]] = {int(r): [] for r in resolutions}
    with torch.no_grad():
        for b in loader:
            f = model.features(b.images)
            for r in torch.unique(b.resolution).tolist():
                feats[int(r)].append(f[b.resolution == r])
    return {r: torch.cat(v) for r, v in feats.items()}, torch.as_tensor(table.identity)


def evaluate(model, dm, base_full: dict[str, torch.Tensor] | None) -> dict:
    model.eval()
    res = [*RESOLUTIONS, ORIGINAL]
    q, q_ids = features_by_resolution(model, dm, "query", res)
    g, _ = features_by_resolution(model, dm, "gallery", [16, 24, ORIGINAL])
    gallery = compute_templates(
        model, dm.gallery_dataloader(), num_classes=dm.num_classes, cache=False
    )
    out: dict = {"query_dist": {}, "query_dist_to_base": {}, "gallery_dist": {}, "hit": {}}
    for r in (16, 24):
        out["query_dist"][r] = (q[r] - q[ORIGINAL]).norm(dim=1)
        out["gallery_dist"][r] = (g[r] - g[ORIGINAL]).norm(dim=1)
        if base_full is not None:
            out["query_dist_to_base"][r] = (q[r] - base_full["query"]).norm(dim=1)
    for r in RESOLUTIONS:
        for metric in ("cosine", "neg_euclidean"):
            s = search(q[r], gallery.features, gallery.ids, q_ids, k=1, metric=metric).summary
            mated = s.mated
            out["hit"][(r, metric)] = (
                s.mate_rank[mated] == 1,
                float(cmc_from_ranks(s.mate_rank[mated], 1)[0]),
            )
    full = q[ORIGINAL]
    other = q_ids[:, None] != q_ids[None, :]
    out["spread"] = float(torch.cdist(full, full)[other].mean())  # between different people
    out["full"] = {"query": full, "gallery": g[ORIGINAL]}
    out["n_mated"] = int(mated.sum())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--weights", type=Path, help="CR weights (default: ensure_cr_dlib_weights())")
    p.add_argument("--faces-cache", default=None)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    src = dict(CR_DLIB_RECIPE["data"]["init_args"]["source"]["init_args"])
    src.update(faces_cache=args.faces_cache, input_size=150, resize_shortest=None)
    dm = EmbeddedFacesDataModule(**src)
    dm.setup("test")
    weights = (
        args.weights or ensure_cr_dlib_weights(fit=run_lightning, faces_cache=args.faces_cache).path
    )
    t0 = time.perf_counter()
    base = evaluate(build_model("dlib_resnet29"), dm, None)
    cr = evaluate(build_model("dlib_resnet29", weights=str(weights)), dm, base["full"])
    n_q = len(dm.query_table)
    print(f"CR weights: {weights}")
    print(
        f"held-out queries: {n_q} photos ({base['n_mated']} with a template), gallery "
        f"(training) photos: {len(dm.gallery_table())}; eval {time.perf_counter() - t0:.0f} s\n"
    )
    record: dict = {"weights": str(weights), "n_queries": n_q, "n_mated": base["n_mated"]}
    print("mean distance of the r-px embedding to the same model's full-resolution embedding")
    print(f"{'':24s}{'Base':>8s}{'CR':>8s}{'CR-Base':>9s}  Wilcoxon p (paired)")
    for kind, key in (("query (held out)", "query_dist"), ("gallery (trained on)", "gallery_dist")):
        for r in (16, 24):
            a, b = base[key][r], cr[key][r]
            pval = stats.wilcoxon(a.numpy(), b.numpy()).pvalue
            print(
                f"{kind + f' {r}px':24s}{a.mean():8.4f}{b.mean():8.4f}{(b - a).mean():+9.4f}  {pval:.2g}"
            )
            record[f"{key}_r{r}"] = {
                "base": float(a.mean()),
                "cr": float(b.mean()),
                "p": float(pval),
            }
    print(
        f"{'(spread: different people)':24s}{base['spread']:8.4f}{cr['spread']:8.4f}"
        "  mean full-resolution distance between query photos of different identities"
    )
    record["spread"] = {"base": base["spread"], "cr": cr["spread"]}
    for r in (16, 24):
        d = cr["query_dist_to_base"][r]
        record[f"query_dist_to_base_full_r{r}"] = float(d.mean())
        print(
            f"{f'query {r}px to Base full':24s}{base['query_dist'][r].mean():8.4f}{d.mean():8.4f}"
        )
    print("\nrank-1 hit rate of the mated held-out queries (templates: each model's own)")
    print(f"{'':24s}{'Base':>8s}{'CR':>8s}  discordant (CR only / Base only)")
    for (r, metric), (hits_b, rate_b) in base["hit"].items():
        hits_c, rate_c = cr["hit"][(r, metric)]
        only_c = int((hits_c & ~hits_b).sum())
        only_b = int((hits_b & ~hits_c).sum())
        print(f"{f'{r}px {metric}':24s}{rate_b:8.3f}{rate_c:8.3f}  {only_c} / {only_b}")
        record[f"hit_r{r}_{metric}"] = {
            "base": rate_b,
            "cr": rate_c,
            "cr_only": only_c,
            "base_only": only_b,
        }
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
