"""The softmax head (``crossres.models.heads``) against ``GalleryClassifier`` on the default data.

Builds the default run's data (configs/default.yaml: ``EmbeddedFacesDataModule`` with
resolutions 16/24/64/256, 8 single queries, at most 2 queries per identity) and dlib's
ResNet-29, trains the head on the gallery photos (never a query; no cache, so the time is the
training time), and prints its clean top-1 accuracy on the queries per resolution beside the
gallery classifier's (logits = 30 x cosine to the templates), with 95% Wilson intervals and
an exact McNemar p-value on the paired outcomes (same queries). n counts the queries whose
identity has a class (non-mated queries have none).

``--augment`` adds a variant trained on the gallery photos at full resolution and degraded
to every benchmark resolution (same l2 rule), to show what the full-resolution-only recipe
gives away at low resolution. It is not the recipe: the paper's fc saw full-resolution faces.

    PYTHONPATH=src python benchmarks/head_eval.py [--augment] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from crossres.datamodules.base import ORIGINAL
from crossres.datamodules.embedded import EmbeddedFacesDataModule
from crossres.metrics.intervals import wilson_interval
from crossres.metrics.paired import mcnemar_paired
from crossres.models.base import GalleryClassifier
from crossres.models.heads import HeadClassifier, fit_softmax, head_predictions, train_head
from crossres.models.registry import build_model
from crossres.models.templates import compute_templates

RESOLUTIONS = (16, 24, 64, 256)


def augmented_head(model, dm) -> tuple[HeadClassifier, dict]:
    """A head fitted on the gallery photos at full resolution and every benchmark resolution."""
    table = dm.gallery_table()
    ds = dm._make_dataset(table, [ORIGINAL, *RESOLUTIONS])
    loader = torch.utils.data.DataLoader(ds, batch_size=32, collate_fn=ds.collate)
    feats, ids = [], []
    with torch.no_grad():
        for b in loader:
            feats.append(model.features(b.images))
            ids.append(b.identity)
    class_ids, labels = torch.unique(torch.cat(ids), return_inverse=True)
    fit = fit_softmax(torch.cat(feats), labels, num_classes=int(class_ids.numel()))
    head = HeadClassifier(model, fit.weight, fit.bias, class_ids)
    return head, {"n_train": int(labels.numel()), "fit_seconds": fit.seconds, "l2": fit.l2}


def per_resolution(pred: dict, class_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Correct (bool) per query with a class, by resolution, in sample order."""
    out = {}
    has_class = torch.isin(pred["identity"], class_ids.cpu())
    for r in RESOLUTIONS:
        keep = (pred["resolution"] == r) & has_class
        order = torch.argsort(pred["sample_id"][keep])
        out[r] = (pred["predicted"][keep] == pred["identity"][keep])[order]
    return out


def fmt(correct: torch.Tensor) -> str:
    k, n = int(correct.sum()), int(correct.numel())
    lo, hi = wilson_interval(k, n)
    return f"{k:>2}/{n} {100 * k / n:5.1f}% [{100 * lo:4.1f}, {100 * hi:5.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--augment", action="store_true", help="also the augmented variant")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model("dlib_resnet29").eval().requires_grad_(False)
    dm = EmbeddedFacesDataModule(
        resolutions=list(RESOLUTIONS), n_single_queries=8, max_queries_per_identity=2, batch_size=16
    )
    dm.configure_for(model.pretrained_cfg)
    dm.prepare_data()
    dm.setup("test")

    t0 = time.perf_counter()
    gallery = compute_templates(
        model, dm.gallery_dataloader(), num_classes=dm.num_classes, cache=False
    )
    template_seconds = time.perf_counter() - t0
    gc = GalleryClassifier(model, gallery.features, scale=30.0)

    t0 = time.perf_counter()
    head = train_head(
        model, dm.gallery_dataloader(), query_ids=dm.query_table.sample_id, cache=False
    )
    head_seconds = time.perf_counter() - t0
    rec = head.record
    assert torch.equal(head.class_ids, gallery.ids)  # same identities, same logit order

    classifiers = {"head": (head, head.class_ids), "gallery": (gc, gallery.ids)}
    extra = {}
    if args.augment:
        aug, extra = augmented_head(model, dm)
        classifiers["head+aug"] = (aug, aug.class_ids)
    results = {}
    for name, (clf, ids) in classifiers.items():
        results[name] = per_resolution(
            head_predictions(clf, dm.test_dataloader(), class_ids=ids), ids
        )

    print(
        f"gallery: {rec['n_train']} photos, {rec['n_classes']} classes (identities); "
        f"queries: {len(dm.query_table)} photos x {len(RESOLUTIONS)} resolutions"
    )
    print(
        f"head training: {head_seconds:.1f} s = gallery features {rec['feature_seconds']:.1f} s "
        f"+ L-BFGS fit {rec['fit_seconds']:.1f} s (CPU {rec['fit_cpu_seconds']:.1f} s, {rec['n_iter']} iterations, max |grad| "
        f"{rec['grad_max']:.1e}, l2 {rec['l2']:.3g}); templates alone: {template_seconds:.1f} s"
    )
    print(f"head training accuracy (gallery photos): {100 * rec['train_accuracy']:.1f}%")
    if extra:
        print(
            f"head+aug: {extra['n_train']} training items, fit {extra['fit_seconds']:.1f} s, "
            f"l2 {extra['l2']:.3g}"
        )
    names = list(classifiers)
    header = (
        f"{'res':>4} | " + " | ".join(f"{n:^27}" for n in names) + " | McNemar p head vs gallery"
    )
    print(header)
    print("-" * len(header))
    table = {}
    for r in RESOLUTIONS:
        p = mcnemar_paired(results["head"][r].numpy(), results["gallery"][r].numpy())
        cells = " | ".join(fmt(results[n][r]) for n in names)
        print(f"{r:>4} | {cells} | {p.pvalue:.3g}")
        table[r] = {n: [int(results[n][r].sum()), int(results[n][r].numel())] for n in names}
        table[r]["mcnemar_p"] = p.pvalue
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "head_seconds": head_seconds,
                    "template_seconds": template_seconds,
                    "record": {k: v for k, v in rec.items() if k != "recipe"},
                    "augmented": extra,
                    "accuracy": table,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
