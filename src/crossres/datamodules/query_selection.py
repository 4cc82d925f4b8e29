"""Query selection: the one step that runs the target models over the data, and the only
writer of query manifests (``crossres select-queries``; ``crossres test`` runs it first when
the manifest is missing). Datamodules only read what it wrote.

The paper's rule (VGGFace2): identities in a seeded order, each identity's query-split images
in their seeded order, keeping those that every target model classifies correctly at full
resolution until ``n_images`` are found; identities with fewer are passed over (listed in the
manifest as ``rejected_identities``), until ``n_identities`` are chosen. Half of the chosen
identities (seeded) are left out of the open-set gallery. The manifest (``manifest.py``)
freezes the outcome; it is written atomically by one process and read by every process of a
run (under DDP the launching process selects before the others start or join it). A manifest
that fails its sha256 sidecar (damaged, or a write stopped before the sidecar) is selected
again, with a warning naming it: the same step as for a missing one.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from crossres.datamodules.base import SkippedItem, seeded_order, stable_id, warn_skipped
from crossres.datamodules.cr_data import CrossResolutionDataModule
from crossres.datamodules.manifest import QueryManifest, QueryRecord, digest_lines, model_hash
from crossres.datamodules.vggface2 import VGGFace2DataModule
from crossres.datamodules.vggface2_layout import name_id, read_boxes
from crossres.io import SIDECAR_SUFFIX, recorded_hash, sha256_file
from crossres.models.base import FaceModel
from crossres.models.runtime import model_device

__all__ = ["manifest_reader", "prepare_queries", "select_queries"]


def manifest_reader(datamodule: object) -> VGGFace2DataModule | None:
    """The datamodule (or the source a training datamodule wraps) that reads a query
    manifest, or None when the data need none (embedded and synthetic faces)."""
    if isinstance(datamodule, CrossResolutionDataModule):
        datamodule = datamodule.source
    return datamodule if isinstance(datamodule, VGGFace2DataModule) else None


def prepare_queries(
    datamodule: object,
    models: Iterable[FaceModel],
    *,
    device: torch.device | str | None = None,
    select: bool = True,
) -> Path | None:
    """Point ``datamodule`` at the manifest of ``models`` (selecting it first when it does not
    exist and ``select``); returns its path, or None when the datamodule reads no manifest.

    ``select=False`` (the processes of a DDP run other than the launching one) never selects:
    the launching process does, before they read it."""
    dm = manifest_reader(datamodule)
    if dm is None:
        return None
    models = list(models)
    hashes = [model_hash(m) for m in models]
    path = dm.manifest_path(hashes)
    if path is None:  # no manifest given and no model to name the default one
        return None
    if select and models and not _intact(path):
        return select_queries(dm, models, device=device, path=path)
    dm.use_manifest(path, model_hashes=hashes)
    return path


def _intact(path: Path) -> bool:
    """True when ``path`` is a manifest that matches its sidecar; False when it is missing,
    or (with a warning naming it) damaged: either way the queries are selected (again)."""
    if not path.is_file():
        return False
    expected, got = recorded_hash(path), sha256_file(path)
    if got == expected:
        return True
    why = (
        f"no {SIDECAR_SUFFIX} record beside it"
        if expected is None
        else f"sha256 {got[:16]}... differs from the recorded {expected[:16]}..."
    )
    warnings.warn(
        f"query manifest {path} is damaged or incomplete ({why}); selecting the queries again",
        stacklevel=3,
    )
    return False


def select_queries(
    datamodule: object,
    models: FaceModel | Iterable[FaceModel],
    *,
    device: torch.device | str | None = None,
    path: str | os.PathLike | None = None,
) -> Path:
    """Select the queries with the target model(s), write the manifest atomically and point the
    datamodule at it; returns the manifest's path (``path``, else the datamodule's own).

    A query image must be classified correctly at full resolution by every model given, so
    several targets (e.g. Base and CR) share one query set. ``device``: where the models run
    during the selection (their own device by default; restored afterwards).
    """
    dm = manifest_reader(datamodule)
    if dm is None:
        raise TypeError(
            f"{type(datamodule).__name__} selects no queries (only VGGFace2DataModule does)"
        )
    models = [models] if isinstance(models, nn.Module) else list(models)
    if not models:
        raise ValueError("select_queries needs at least one model")
    hashes = [model_hash(m) for m in models]
    out = Path(path) if path is not None else dm.manifest_path(hashes)
    assert out is not None
    manifest = _select(dm, models, device)
    manifest.save(out)
    dm.use_manifest(out, model_hashes=hashes)
    return out


def _select(
    dm: VGGFace2DataModule, models: list[FaceModel], device: torch.device | str | None
) -> QueryManifest:
    dm._read_classes()
    for m in models:
        if m.num_classes != len(dm.class_ids):
            raise ValueError(
                f"{type(m).__name__} classifies {m.num_classes} classes but {dm.meta_path} "
                f"lists {len(dm.class_ids)} training identities; query selection needs the "
                "target's classifier over exactly these identities"
            )
    dm.listing()  # checks the layout before any model runs
    index = {c: i for i, c in enumerate(dm.class_ids)}
    eligible = [c for c in dm.class_ids if len(dm.split(c)[0]) >= dm.n_images]
    if len(eligible) < dm.n_identities:
        raise ValueError(
            f"only {len(eligible)} identities have {dm.n_images} or more query-split images "
            f"(query_fraction={dm.query_fraction}); lower n_identities ({dm.n_identities}) "
            "or n_images, or raise query_fraction"
        )
    order = [eligible[i] for i in seeded_order(eligible, dm.seed, "identity")]
    states = [(m, m.training, model_device(m)) for m in models]
    run_device = torch.device(device) if device is not None else states[0][2]
    selected: list[QueryRecord] = []
    chosen: list[str] = []
    rejected: list[dict] = []
    skipped: list[tuple[str, str]] = []
    try:
        for m, _, _ in states:
            m.eval().to(run_device)
        window = max(2 * dm.n_identities, 8)
        pos = 0
        while len(chosen) < dm.n_identities and pos < len(order):
            block = order[pos : pos + window]
            pos += window
            cand = {c: dm.split(c)[0] for c in block}
            files = [f for c in block for f in cand[c]]
            boxes = (
                read_boxes(dm.boxes_path, [name_id(f) for f in files])
                if dm.crop_margin is not None
                else None
            )
            row = {f: i for i, f in enumerate(files)}
            for c in block:
                if len(chosen) == dm.n_identities:
                    break
                picked, seen = _select_identity(
                    dm, cand[c], boxes, row, models, run_device, skipped
                )
                if len(picked) < dm.n_images:
                    rejected.append({"class_id": c, "correct": len(picked), "candidates": seen})
                    continue
                chosen.append(c)
                for f in picked:
                    b = boxes[row[f]].tolist() if boxes is not None else None
                    selected.append(QueryRecord(f, c, index[c], stable_id(f"vggface2/{f}"), box=b))
    finally:
        for m, training, dev in states:
            m.train(training).to(dev)
    if len(chosen) < dm.n_identities:
        raise ValueError(
            f"only {len(chosen)} of {len(eligible)} identities have {dm.n_images} query "
            f"images that every target classifies correctly at full resolution (needed "
            f"{dm.n_identities}); lower n_identities/n_images or check the weights"
        )
    warn_skipped(skipped, "selecting the queries")
    opened = [chosen[i] for i in seeded_order(chosen, dm.seed, "open-set")]
    non_mated = sorted(index[c] for c in opened[: len(chosen) // 2])
    mated = sorted(index[c] for c in opened[len(chosen) // 2 :])
    gallery_files = dm._gallery_files()
    return QueryManifest(
        root=str(dm.root),
        model_hashes=[model_hash(m) for m in models],
        num_classes=len(dm.class_ids),
        class_ids_digest=dm._class_digest(),
        queries=selected,
        open_set={"mated": mated, "non_mated": non_mated},
        gallery={"n_images": len(gallery_files), "digest": digest_lines(gallery_files)},
        skipped=[{"path": p, "error": e} for p, e in skipped],
        rejected_identities=rejected,
        **dm._settings(),
    )


def _select_identity(
    dm: VGGFace2DataModule,
    candidates: list[str],
    boxes: np.ndarray | None,
    row: dict[str, int],
    models: Sequence[FaceModel],
    device: torch.device,
    skipped: list[tuple[str, str]],
) -> tuple[list[str], int]:
    """The first ``n_images`` candidates (in order) every model classifies correctly, and how
    many candidates were read to find them."""
    picked: list[str] = []
    seen = 0
    step = max(dm.batch_size, dm.n_images)
    for start in range(0, len(candidates), step):
        chunk = candidates[start : start + step]
        table = dm._table(
            chunk, boxes=boxes[[row[f] for f in chunk]] if boxes is not None else None
        )
        ds = dm._make_dataset(table, [0])
        items = [ds[i] for i in range(len(ds))]
        for f, it in zip(chunk, items, strict=True):
            if isinstance(it, SkippedItem):
                skipped.append((f, it.error))
        batch = ds.collate(items)
        seen += len(items)
        if len(batch) == 0:
            continue
        x = batch.images.to(device)
        ok = torch.ones(len(batch), dtype=torch.bool, device=device)
        with torch.no_grad():
            for m in models:
                ok &= m(x).argmax(1) == batch.identity.to(device)
        good = [p for p, k in zip(batch.paths, ok.tolist(), strict=True) if k]
        picked.extend(good[: dm.n_images - len(picked)])
        if len(picked) == dm.n_images:
            break
    return picked, seen
