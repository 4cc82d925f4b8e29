"""Feature extraction for the gallery: templates, one per identity, the mean deep feature over its gallery images at the
original resolution (Massoli et al. 2020, Sec. 4: "a single template for each identity as the
average features vector among all the corresponding face images").

``normalize`` (L2) options: "none" (the paper's definition: plain mean of the raw features),
"before" (mean of the L2-normalised features), "after" (L2-normalised mean), "both".

Computed in batches, exactly under DDP (each gallery image once across processes: rank r takes
images r, r + W, ...; per-identity sums and counts are all-reduced in float64), cached in a file
keyed by the model's weights hash, the manifest hash and the option, written atomically with a
sha256 sidecar and checked on every load (a file made for another model or manifest is never
reused; a damaged one is recomputed), and resumable: partial sums are saved
every ``checkpoint_every`` batches, so an interrupted run (a corrupt file, a crash) restarts
where it stopped.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from crossres.io import atomic_torch_save, is_complete, sidecar_path, verify_file
from crossres.models.base import FaceModel
from crossres.models.fingerprint import model_hash, state_hash
from crossres.models.runtime import cache_directory, distributed_info, model_device
from crossres.phases import mark
from crossres.types import Gallery

__all__ = [
    "TemplateNorm",
    "compute_templates",
    "gallery_image_features",
    "load_templates",
    "templates_path",
]

TemplateNorm = Literal["none", "before", "after", "both"]
_NORMS = ("none", "before", "after", "both")
TEMPLATES_FORMAT = "crossres-templates-v1"
#: What rebuilds a templates file (``compute_templates`` recomputes a damaged one itself).
REBUILD_HINT = "delete it and run `crossres gallery --config <your config>`"


def _warn_skipped(skipped: Sequence[tuple[str, str]]) -> None:
    if skipped:
        names = ", ".join(p for p, _ in skipped[:5])
        more = " ..." if len(skipped) > 5 else ""
        warnings.warn(
            f"{len(skipped)} unreadable image(s) skipped while computing gallery templates: "
            f"{names}{more}",
            stacklevel=3,
        )


def templates_path(
    directory: str | os.PathLike, *, model_hash: str, manifest_hash: str, normalize: str
) -> Path:
    """The cache file for one (model weights, manifest, normalisation) triple."""
    name = f"templates-{model_hash[:24]}-{manifest_hash[:24]}-{normalize}.pt"
    return Path(directory) / name


def load_templates(
    path: str | os.PathLike,
    *,
    model_hash: str,
    manifest_hash: str,
    normalize: str,
    num_classes: int,
    state_hash: str | None = None,
) -> Gallery:
    """A cached gallery, after checking it was made for this model, manifest and option (and,
    given ``state_hash``, for these very weights: a model changed in memory after loading
    keeps its file's ``weights_hash`` but not its state hash)."""
    path = Path(path)
    verify_file(path, rebuild_hint=REBUILD_HINT)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != TEMPLATES_FORMAT:
        raise ValueError(f"{path} is not a crossres templates file; delete it to recompute")
    expected = {
        "model_hash": model_hash,
        "manifest_hash": manifest_hash,
        "normalize": normalize,
        "num_classes": num_classes,
    }
    if state_hash is not None:
        expected["state_hash"] = state_hash
    wrong = {k: (blob.get(k), v) for k, v in expected.items() if blob.get(k) != v}
    if wrong:
        detail = "; ".join(f"{k}: file has {a!r}, expected {b!r}" for k, (a, b) in wrong.items())
        raise ValueError(
            f"templates cache {path} was made for something else ({detail}); delete the file or "
            "use another cache directory"
        )
    return Gallery(
        features=blob["features"],
        ids=blob["ids"],
        model_hash=model_hash,
        manifest_hash=manifest_hash,
        normalized=normalize in ("after", "both"),
    )


def _reduce_device(device: torch.device) -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return device
    return torch.device("cpu")


def compute_templates(
    model: FaceModel,
    dataloader: DataLoader,
    *,
    num_classes: int,
    normalize: TemplateNorm = "none",
    cache: str | os.PathLike | bool | None = None,
    manifest_hash: str | None = None,
    checkpoint_every: int = 200,
) -> Gallery:
    """One template per identity present in ``dataloader`` (a loader of ``FaceBatch`` at the
    original resolution, e.g. ``datamodule.gallery_dataloader()``).

    Returns ``Gallery(features [N, D], ids [N])`` with the identities that have at least one
    gallery image, in increasing class index. ``num_classes`` bounds the identity indices.

    cache: a directory; None (default) uses ``cache_dir("templates")`` when a manifest hash is
        known (argument, or the dataset's ``manifest_hash``) and no cache otherwise; False never
        caches. The model is put in eval mode for the pass and its mode restored.
    """
    if normalize not in _NORMS:
        raise ValueError(f"normalize must be one of {_NORMS}, got {normalize!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    dataset = dataloader.dataset
    m_hash = model_hash(model)
    man_hash = manifest_hash if manifest_hash is not None else getattr(dataset, "manifest_hash", "")
    directory = cache_directory("templates", cache, man_hash)
    path = (
        templates_path(directory, model_hash=m_hash, manifest_hash=man_hash, normalize=normalize)
        if directory is not None
        else None
    )
    s_hash = state_hash(model) if path is not None else None
    rank, world = distributed_info()
    device = model_device(model)

    # rank 0 decides whether the cache is there, so every rank takes the same branch; a file
    # that does not match its sidecar hash (a crash, a damaged disk) is computed afresh
    complete = path is not None and is_complete(path)
    if path is not None and not complete and path.exists() and rank == 0:
        warnings.warn(
            f"recomputing the templates cache {path}: it does not match its sha256 record",
            stacklevel=2,
        )
    have = torch.tensor([1 if complete else 0], device=_reduce_device(device))
    if world > 1:
        dist.broadcast(have, src=0)
    if int(have.item()):
        assert path is not None
        return load_templates(
            path,
            model_hash=m_hash,
            manifest_hash=man_hash,
            normalize=normalize,
            num_classes=num_classes,
            state_hash=s_hash,
        )

    feature_dim, sums, counts, done, skipped = None, None, None, 0, []
    partial = path.with_name(f"{path.name}.rank{rank}of{world}.partial") if path else None
    if partial is not None and is_complete(partial):
        state = torch.load(partial, map_location="cpu", weights_only=True)
        if state.get("n_items") == len(dataset) and state.get("state_hash") == s_hash:
            sums, counts, done = (
                state["sums"].to(device),
                state["counts"].to(device),
                int(state["done"]),
            )
            skipped = [tuple(s) for s in state["skipped"]]
            feature_dim = sums.shape[1]

    mark("templates")
    mine = list(range(rank, len(dataset), world))
    loader = DataLoader(
        Subset(dataset, mine[done:]),
        batch_size=dataloader.batch_size or 1,
        num_workers=dataloader.num_workers,
        collate_fn=dataloader.collate_fn,
        shuffle=False,
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b, batch in enumerate(loader):
                skipped.extend(getattr(batch, "skipped", []))
                done += len(batch) + len(getattr(batch, "skipped", []))
                if len(batch) == 0:
                    continue
                if bool((batch.resolution != 0).any()):
                    raise ValueError(
                        "gallery templates are defined at the original resolution, but the "
                        f"dataloader yields resolutions {sorted(set(batch.resolution.tolist()))}; "
                        "use the datamodule's gallery_dataloader()"
                    )
                ids = batch.identity.to(device)
                if int(ids.min()) < 0 or int(ids.max()) >= num_classes:
                    raise ValueError(
                        f"identity index {int(ids.max())} outside [0, {num_classes}) (num_classes)"
                    )
                f = model.features(batch.images.to(device)).double()
                if normalize in ("before", "both"):
                    f = F.normalize(f, dim=1)
                if sums is None:
                    feature_dim = f.shape[1]
                    sums = torch.zeros(num_classes, feature_dim, dtype=torch.float64, device=device)
                    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
                sums.index_add_(0, ids, f)
                counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
                if partial is not None and checkpoint_every > 0 and (b + 1) % checkpoint_every == 0:
                    atomic_torch_save(
                        {
                            "sums": sums.cpu(),
                            "counts": counts.cpu(),
                            "done": done,
                            "skipped": [list(s) for s in skipped],
                            "n_items": len(dataset),
                            "state_hash": s_hash,
                        },
                        partial,
                        sidecar=True,
                    )
    finally:
        model.train(was_training)

    # ranks that saw no image still take part in the reductions
    rdev = _reduce_device(device)
    dim = torch.tensor([feature_dim or 0], device=rdev)
    if world > 1:
        dist.all_reduce(dim, op=dist.ReduceOp.MAX)
    feature_dim = int(dim.item())
    if feature_dim == 0:
        raise ValueError("the gallery dataloader yielded no readable image: no template to compute")
    if sums is None:
        sums = torch.zeros(num_classes, feature_dim, dtype=torch.float64, device=device)
        counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    sums, counts = sums.to(rdev), counts.to(rdev)
    n_seen = torch.tensor([done], dtype=torch.int64, device=rdev)
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
        dist.all_reduce(n_seen)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, skipped)
        skipped = [tuple(s) for part in gathered for s in part]
    if int(n_seen.item()) != len(dataset):
        raise RuntimeError(
            f"templates saw {int(n_seen.item())} gallery images for a dataset of {len(dataset)}"
        )
    _warn_skipped(skipped)

    ids = torch.nonzero(counts > 0).flatten()
    features = sums[ids] / counts[ids].unsqueeze(1)
    if normalize in ("after", "both"):
        features = F.normalize(features, dim=1)
    gallery = Gallery(
        features=features.float().cpu(),
        ids=ids.cpu(),
        model_hash=m_hash,
        manifest_hash=man_hash,
        normalized=normalize in ("after", "both"),
    )
    if path is not None:
        if rank == 0:
            atomic_torch_save(
                {
                    "format": TEMPLATES_FORMAT,
                    "features": gallery.features,
                    "ids": gallery.ids,
                    "counts": counts[ids].cpu().to(torch.int64),
                    "model_hash": m_hash,
                    "state_hash": s_hash,
                    "manifest_hash": man_hash,
                    "normalize": normalize,
                    "num_classes": num_classes,
                    "n_images": len(dataset) - len(skipped),
                    "skipped": [list(s) for s in skipped],
                },
                path,
                sidecar=True,
            )
        if world > 1:
            dist.barrier()
        if partial is not None:
            partial.unlink(missing_ok=True)
            sidecar_path(partial).unlink(missing_ok=True)
    return gallery


def gallery_image_features(
    model: FaceModel, dataloader: DataLoader
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image deep features of the gallery: ``(features [N, D] float32, identities [N],
    sample_ids [N])`` on the CPU, in loader order, for the readable images of ``dataloader``
    (original resolution only, as for the templates; unreadable ones skipped with a warning).

    Not sharded under DDP (every process sees every image): meant for small galleries, e.g.
    the training set of a classification head. The model is put in eval mode and restored.
    """
    device = model_device(model)
    feats, ids, sids, skipped = [], [], [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in dataloader:
                skipped.extend(getattr(batch, "skipped", []))
                if len(batch) == 0:
                    continue
                if bool((batch.resolution != 0).any()):
                    raise ValueError(
                        "gallery features are taken at the original resolution, but the "
                        f"dataloader yields resolutions {sorted(set(batch.resolution.tolist()))}; "
                        "use the datamodule's gallery_dataloader()"
                    )
                feats.append(model.features(batch.images.to(device)).float().cpu())
                ids.append(batch.identity.cpu())
                sids.append(batch.sample_id.cpu())
    finally:
        model.train(was_training)
    _warn_skipped(skipped)
    if not feats:
        raise ValueError("the gallery dataloader yielded no readable image")
    return torch.cat(feats), torch.cat(ids).long(), torch.cat(sids).long()
