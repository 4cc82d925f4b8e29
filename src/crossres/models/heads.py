"""A classification head apart from identification, as in the paper.

Massoli et al. (2020) attack two uses of one network: its softmax classifier (the 8631-way fc
of the Base model, trained with cross-entropy on full-resolution VGGFace2) and its deep
features (identification against gallery templates). A pure embedder (dlib's ResNet-29: 128-d,
no classifier) has only the second; ``GalleryClassifier`` gives it logits from the templates
themselves, which makes a classification attack an identification attack. This module gives it
a classifier of its own instead: a linear softmax layer fitted on fixed backbone features.

Recipe (``HEAD_RECIPE``; every item is in the cache key):
- training data: the per-image features of the enrolled gallery photos at full resolution,
  never a query (``train_head`` checks the sample ids are disjoint and raises otherwise). No
  low-resolution augmentation: the paper's fc was trained on full-resolution faces, so the
  head, like the Base model's fc, meets degraded faces only at test time.
- classes: every identity with a gallery photo, single-photo people (distractors) included,
  i.e. the same identities, in the same order, as the gallery templates; a class with one
  photo is a class as in VGGFace2's fc. Queries of identities without a gallery photo
  (non-mated) have no class.
- objective: multinomial logistic regression, mean cross-entropy + (l2 / 2) ||W||_F^2 (bias
  not penalised). Rule for l2 (fixed by the training set alone, never tuned on queries):
  ``l2 = mean ||f_i||^2 / (n K)`` for n photos of K classes. Why: at the optimum a class seen
  once has ``w_c ~ a f / ||f||^2`` with logit margin ``a = (1 - p_c) ||f||^2 / (n l2)``; with
  this l2, ``a = K (1 - p_c)``, which settles a little below ``2 ln K`` (10.6 for K = 630)
  with a training probability p_c near 1, as a trained fc fits its training set.
  scikit-learn's default (C = 1, i.e. K times this l2) caps such a margin near 1, below the
  ``ln K`` needed to beat K - 1 rivals: 21% training accuracy on separable synthetic
  features with K = 630. The mean squared norm makes the logits independent of the
  features' scale.
- optimiser: full-batch L-BFGS (torch.optim.LBFGS, strong-Wolfe line search) in float64
  from W = 0, b = 0, stopping at max |gradient| <= 1e-6 on unit-RMS features. The objective
  is strictly convex in W; the bias stays in the sum(b) = 0 plane (its gradient sums to
  zero over classes). Nothing is random: no seed.

Heads are cached by (backbone weights hash, state hash, manifest hash, recipe hash) under
``cache_dir("heads")`` with a sha256 sidecar; a damaged file is recomputed with a warning.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from crossres.io import atomic_torch_save, json_hash, verify_file
from crossres.models.base import FaceModel, PretrainedConfig
from crossres.models.fingerprint import model_hash, state_hash
from crossres.models.runtime import cache_directory, distributed_info
from crossres.models.templates import gallery_image_features

__all__ = [
    "HEAD_RECIPE",
    "HeadClassifier",
    "LinearHead",
    "QueryLeakError",
    "SoftmaxFit",
    "default_l2",
    "fit_softmax",
    "fit_softmax_head",
    "head_accuracy",
    "head_path",
    "head_predictions",
    "train_head",
]

HEAD_FORMAT = "crossres-head-v1"
#: What a head is trained on and how (part of the cache key; see the module docstring).
HEAD_RECIPE: dict[str, Any] = {
    "format": HEAD_FORMAT,
    "data": "gallery photos, full resolution, no augmentation",
    "classes": "every gallery identity, singles included",
    "loss": "mean softmax cross-entropy + l2/2 ||W||^2, bias free",
    "l2": "mean ||f||^2 / (n K)",
    "optimizer": "torch L-BFGS (strong Wolfe, history 20), float64, from zero",
    "max_iter": 2000,
    "gtol": 1e-6,
}


class QueryLeakError(ValueError):
    """A classification head would be trained on (or was trained on) a query image."""


# ---------------------------------------------------------------------------- the model


class LinearHead(nn.Module):
    """``logits = features @ weight.T + bias``; frozen (buffers, not parameters), computed in
    the dtype and on the device of the features."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"head weight must be [C, D], got shape {tuple(weight.shape)}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"head bias must be [C] = [{weight.shape[0]}], got shape {tuple(bias.shape)}"
            )
        if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
            raise ValueError("head weight and bias must be finite")
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", bias.detach().float().clone())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"head expects features [B, {self.weight.shape[1]}], got shape "
                f"{tuple(features.shape)}"
            )
        w = self.weight.to(device=features.device, dtype=features.dtype)
        b = self.bias.to(device=features.device, dtype=features.dtype)
        return F.linear(features, w, b)


class HeadClassifier(FaceModel):
    """An embedder with a linear softmax head: ``features(x)`` are the backbone's,
    ``forward(x)`` the head's logits, logit i belonging to identity ``class_ids[i]``.

    ``record`` holds how the head was made (``train_head`` fills it: training size, fit
    diagnostics, cache file) for the run record and the report.
    """

    def __init__(
        self,
        backbone: FaceModel,
        weight: torch.Tensor,
        bias: torch.Tensor,
        class_ids: torch.Tensor | Iterable[int],
    ) -> None:
        ids = torch.as_tensor(class_ids).detach().cpu()
        if ids.ndim != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"class_ids must be a 1-d integer tensor, got {ids.dtype} {ids.shape}")
        if ids.shape[0] != weight.shape[0]:
            raise ValueError(
                f"class_ids has {ids.shape[0]} entries for a head of {weight.shape[0]} classes"
            )
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError("class_ids must be unique (one logit per identity)")
        cfg = backbone.pretrained_cfg
        dim = cfg.feature_dim
        if dim and weight.ndim == 2 and weight.shape[1] != dim:
            raise ValueError(
                f"head weight is [C, {weight.shape[1]}] but the backbone's features have "
                f"{dim} dimensions"
            )
        super().__init__(PretrainedConfig(**{**cfg.to_dict(), "num_classes": int(ids.numel())}))
        self.normalize = backbone.normalize
        self.backbone = backbone
        self.head = LinearHead(weight, bias)
        self.register_buffer("class_ids", ids.long().clone())
        self.record: dict[str, Any] = {}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.embed(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


# ---------------------------------------------------------------------------- the fit


@dataclass
class SoftmaxFit:
    """A fitted head with its diagnostics (float64 weight [C, D] and bias [C])."""

    weight: torch.Tensor
    bias: torch.Tensor
    l2: float
    n_iter: int
    converged: bool
    grad_max: float  # largest |gradient| entry at the returned point, on unit-RMS features
    train_accuracy: float
    seconds: float  # wall clock
    cpu_seconds: float  # this process's CPU time (steadier on a shared machine)


def default_l2(features: torch.Tensor, num_classes: int) -> float:
    """The recipe's rule: ``mean ||f_i||^2 / (n K)`` for n features of K classes (module
    docstring)."""
    f = torch.as_tensor(features).double()
    if f.ndim != 2 or f.shape[0] == 0:
        raise ValueError(f"features must be a non-empty [N, D], got shape {tuple(f.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    ms = float((f * f).sum(1).mean())
    if not ms > 0:
        raise ValueError("features are all zero: no scale to regularise against")
    return ms / (f.shape[0] * num_classes)


def _check_fit_input(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    x = torch.as_tensor(features).detach().cpu().double()
    y = torch.as_tensor(labels).detach().cpu()
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be a non-empty [N, D], got shape {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels must be [N] = [{x.shape[0]}], got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {y.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or infinity")
    c = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if int(y.min()) < 0 or int(y.max()) >= c:
        raise ValueError(f"labels must lie in [0, {c}), got [{int(y.min())}, {int(y.max())}]")
    if c < 2:
        raise ValueError(f"a softmax head needs >= 2 classes, got {c}")
    return x, y.long(), c


def fit_softmax(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    l2: float | None = None,
    num_classes: int | None = None,
    max_iter: int = HEAD_RECIPE["max_iter"],
    gtol: float = HEAD_RECIPE["gtol"],
) -> SoftmaxFit:
    """Multinomial logistic regression on fixed features: minimises
    ``mean_i CE(softmax(W f_i + b), y_i) + l2 / 2 ||W||_F^2`` by full-batch L-BFGS in float64
    from zero (``l2=None``: ``default_l2(features, K)``). Warns when it stops before
    ``max |gradient| <= gtol``, the gradient taken on the features rescaled to unit
    root-mean-square norm (the same problem, whatever the scale)."""
    x, y, c = _check_fit_input(features, labels, num_classes)
    lam = default_l2(x, c) if l2 is None else float(l2)
    if not (lam > 0 and np.isfinite(lam)):
        raise ValueError(f"l2 must be a positive finite number, got {l2!r}")
    n, d = x.shape
    # solved on features of unit root-mean-square norm (W' = W rms, l2' = l2 / rms^2, the
    # same logits), so that gtol means the same whatever the features' scale
    rms = float((x * x).sum(1).mean().sqrt())
    if not rms > 0:
        raise ValueError("features are all zero: nothing to fit")
    xu = x / rms
    lam_unit = lam / rms**2

    onehot = F.one_hot(y, c).double()
    w = torch.zeros(c, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(c, dtype=torch.float64, requires_grad=True)

    def closure() -> torch.Tensor:
        # loss and its closed-form gradient in one pass (autograd costs twice as much here)
        with torch.no_grad():
            logp = torch.log_softmax(torch.addmm(b, xu, w.T), dim=1)
            loss = -(logp * onehot).sum() / n + 0.5 * lam_unit * (w * w).sum()
            g = (logp.exp() - onehot) / n  # d loss / d logits
            w.grad = g.T @ xu + lam_unit * w
            b.grad = g.sum(0)
        return loss

    start, cpu_start = time.perf_counter(), time.process_time()
    # torch's L-BFGS: scipy's L-BFGS-B spent 0.25 s per step in its own bookkeeping at this
    # size (81k variables), 5x the loss and gradient
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=int(max_iter),
        max_eval=int(max_iter) * 2,
        tolerance_grad=float(gtol),
        tolerance_change=0.0,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    opt.step(closure)
    closure()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    n_iter = int(opt.state[w].get("n_iter", 0))  # LBFGS keeps its state under the first param
    grad_max = float(max(w.grad.abs().max(), b.grad.abs().max()))
    converged = grad_max <= gtol
    if not converged:
        warnings.warn(
            f"softmax head: L-BFGS stopped after {n_iter} iterations with max |gradient| "
            f"{grad_max:.2e} > gtol {gtol:.0e}",
            stacklevel=2,
        )
    w, b = w.detach() / rms, b.detach().clone()
    acc = float(((x @ w.T + b).argmax(1) == y).double().mean())
    return SoftmaxFit(w, b, lam, n_iter, converged, grad_max, acc, seconds, cpu_seconds)


def fit_softmax_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    l2: float | None = None,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [C, D], bias [C])`` in float64 of ``fit_softmax`` (see there)."""
    fit = fit_softmax(features, labels, l2=l2, num_classes=num_classes)
    return fit.weight, fit.bias


# ---------------------------------------------------------------------------- training + cache


def head_path(
    directory: str | os.PathLike,
    *,
    model_hash: str,
    state_hash: str,
    manifest_hash: str,
    recipe: dict[str, Any],
) -> Path:
    """The cache file of one (backbone weights, manifest, recipe)."""
    parts = (model_hash.removeprefix("state-"), state_hash, manifest_hash, json_hash(recipe))
    return Path(directory) / ("head-" + "-".join(p[:16] for p in parts) + ".pt")


def _query_set(query_ids: Any) -> set[int]:
    q = np.asarray(query_ids.cpu() if isinstance(query_ids, torch.Tensor) else query_ids)
    if q.size and not np.issubdtype(q.dtype, np.integer):
        raise ValueError(f"query_ids must be integer sample ids, got dtype {q.dtype}")
    return set(int(i) for i in q.reshape(-1).tolist())


def _check_disjoint(train_ids: torch.Tensor, queries: set[int], where: str) -> None:
    leaked = sorted(set(int(i) for i in train_ids.tolist()) & queries)
    if leaked:
        raise QueryLeakError(
            f"{len(leaked)} of the {where} are query images (sample ids {leaked[:5]}"
            f"{' ...' if len(leaked) > 5 else ''}): a classification head must never be "
            "trained on a query; pass the gallery loader, and the query sample ids as query_ids"
        )


def _load(path: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The cached blob, or None (with a warning) when it is damaged or made for another key."""
    try:
        verify_file(path)
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged cache entry: the head is cheap to recompute
        warnings.warn(f"recomputing the classification head {path}: {e}", stacklevel=3)
        return None
    wrong = [k for k, v in expected.items() if not isinstance(blob, dict) or blob.get(k) != v]
    if wrong:
        warnings.warn(
            f"recomputing the classification head {path}: made for another {', '.join(wrong)}",
            stacklevel=3,
        )
        return None
    return blob


def _train(
    model: FaceModel, gallery_loader: DataLoader, queries: set[int], l2: float | None
) -> dict[str, Any]:
    start = time.perf_counter()
    features, identities, sample_ids = gallery_image_features(model, gallery_loader)
    _check_disjoint(sample_ids, queries, "training (gallery) images")
    feature_seconds = time.perf_counter() - start
    class_ids, labels = torch.unique(identities, sorted=True, return_inverse=True)
    fit = fit_softmax(features, labels, l2=l2, num_classes=int(class_ids.numel()))
    return {
        "weight": fit.weight.float(),
        "bias": fit.bias.float(),
        "class_ids": class_ids.long(),
        "train_sample_ids": sample_ids.long(),
        "n_train": int(sample_ids.numel()),
        "l2": fit.l2,
        "n_iter": fit.n_iter,
        "converged": fit.converged,
        "grad_max": fit.grad_max,
        "train_accuracy": fit.train_accuracy,
        "fit_seconds": fit.seconds,
        "fit_cpu_seconds": fit.cpu_seconds,
        "feature_seconds": feature_seconds,
    }


def train_head(
    model: FaceModel,
    gallery_loader: DataLoader,
    *,
    query_ids: Any,
    l2: float | None = None,
    cache: str | os.PathLike | bool | None = None,
    manifest_hash: str | None = None,
) -> HeadClassifier:
    """``model`` with a softmax head fitted on the per-image features of the gallery photos
    of ``gallery_loader`` (original resolution), one class per gallery identity (recipe:
    module docstring).

    query_ids: sample ids of every query image; ``QueryLeakError`` when a training image (or,
        for a cached head, an image it was trained on) is among them. Sample ids, not paths,
        are compared: one photo can hold a gallery face and a query face of different people.
    l2: None applies the recipe's rule; a number overrides it (and keys the cache).
    cache: a directory; None uses ``cache_dir("heads")`` when a manifest hash is known
        (argument, or the dataset's ``manifest_hash``); False never caches.
    Under DDP, rank 0 trains (or loads) the head and broadcasts it, so every rank attacks the
    same logits. The result's ``record`` says how it was made and whether it came from cache.
    """
    queries = _query_set(query_ids)
    dataset = gallery_loader.dataset
    man_hash = manifest_hash if manifest_hash is not None else getattr(dataset, "manifest_hash", "")
    directory = cache_directory("heads", cache, man_hash)
    recipe = {**HEAD_RECIPE, "l2": HEAD_RECIPE["l2"] if l2 is None else float(l2)}
    rank, world = distributed_info()
    blob: dict[str, Any] | None = None
    if rank == 0:
        path = None
        if directory is not None:
            m_hash, s_hash = model_hash(model), state_hash(model)
            keys = {
                "format": HEAD_FORMAT,
                "model_hash": m_hash,
                "state_hash": s_hash,
                "manifest_hash": man_hash,
                "recipe": recipe,
            }
            path = head_path(
                directory,
                model_hash=m_hash,
                state_hash=s_hash,
                manifest_hash=man_hash,
                recipe=recipe,
            )
            if path.exists():
                blob = _load(path, keys)
        if blob is not None:
            blob["cached"] = True
        else:
            blob = {**_train(model, gallery_loader, queries, l2), "cached": False}
            if path is not None:
                atomic_torch_save({**keys, **blob}, path, sidecar=True)
        blob["path"] = str(path) if path is not None else ""
    if world > 1:
        box = [blob]
        dist.broadcast_object_list(box, src=0)
        blob = box[0]
    assert blob is not None
    _check_disjoint(blob["train_sample_ids"], queries, "images the cached head was trained on")
    head = HeadClassifier(model, blob["weight"], blob["bias"], blob["class_ids"])
    head.record = {
        k: blob[k]
        for k in (
            "n_train",
            "l2",
            "n_iter",
            "converged",
            "grad_max",
            "train_accuracy",
            "fit_seconds",
            "fit_cpu_seconds",
            "feature_seconds",
            "cached",
            "path",
        )
    }
    head.record["n_classes"] = int(blob["class_ids"].numel())
    head.record["recipe"] = recipe
    return head.to(_device_of(model))


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------- accuracy


def _class_ids(model: nn.Module, class_ids: Any) -> torch.Tensor:
    ids = class_ids if class_ids is not None else getattr(model, "class_ids", None)
    if ids is None:
        raise ValueError(
            f"{type(model).__name__} has no class_ids: pass class_ids= (the identity of each logit)"
        )
    return torch.as_tensor(ids).cpu().long()


def head_predictions(
    model: FaceModel, loader: DataLoader, *, class_ids: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Top-1 identity of every sample of ``loader``: ``{"predicted", "identity",
    "resolution", "sample_id"}`` (CPU tensors in loader order). ``class_ids`` maps logit to
    identity (default: ``model.class_ids``; a ``GalleryClassifier`` needs its gallery's ids).
    The model is put in eval mode for the pass and its mode restored."""
    ids = _class_ids(model, class_ids)
    device = _device_of(model)
    out: dict[str, list[torch.Tensor]] = {
        "predicted": [],
        "identity": [],
        "resolution": [],
        "sample_id": [],
    }
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                if len(batch) == 0:
                    continue
                logits = model(batch.images.to(device))
                if logits.shape[1] != ids.numel():
                    raise ValueError(
                        f"the model gives {logits.shape[1]} logits for {ids.numel()} class_ids"
                    )
                out["predicted"].append(ids[logits.argmax(1).cpu()])
                out["identity"].append(batch.identity.cpu())
                out["resolution"].append(batch.resolution.cpu())
                out["sample_id"].append(batch.sample_id.cpu())
    finally:
        model.train(was_training)
    return {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for k, v in out.items()}


def head_accuracy(
    model: FaceModel, loader: DataLoader, *, class_ids: torch.Tensor | None = None
) -> dict[int, tuple[int, int]]:
    """Clean top-1 accuracy per resolution: ``{resolution: (correct, n)}``, n counting the
    samples whose identity has a class (a non-mated query cannot be classified correctly and
    is left out), in increasing resolution (0 = original)."""
    ids = _class_ids(model, class_ids)
    p = head_predictions(model, loader, class_ids=ids)
    has_class = torch.isin(p["identity"], ids)
    correct = (p["predicted"] == p["identity"]) & has_class
    return {
        int(r): (
            int(correct[p["resolution"] == r].sum()),
            int(has_class[p["resolution"] == r].sum()),
        )
        for r in torch.unique(p["resolution"]).tolist()
    }
