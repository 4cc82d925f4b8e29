"""What an attack pursues, separate from the algorithm that pursues it.

An objective decides, from the model's output on a candidate image, whether the attack has
met its goal for each sample. Classification objectives read logits; feature objectives read
deep features and a gallery (any object with ``.features`` [N, D] and ``.ids`` [N]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

Metric = Literal["euclidean", "cosine"]


def knn_predict(
    features: torch.Tensor, gallery: Any, *, k: int = 1, metric: Metric = "euclidean"
) -> torch.Tensor:
    """Identity a k-NN classifier fitted on the gallery templates assigns to each feature.

    Majority vote over the k nearest templates; ties go to the identity whose nearest member
    is closest (what scikit-learn's KNeighborsClassifier does with uniform weights is to take
    the smallest label; nearest-first is the better-defined choice and equal for k = 1).
    """
    templates = gallery.features.to(features.device, features.dtype)
    ids = gallery.ids.to(features.device)
    if k < 1 or k > templates.shape[0]:
        raise ValueError(f"k must be in [1, {templates.shape[0]}] (gallery size), got {k}")
    dist = pairwise_distance(features, templates, metric=metric)
    nearest = dist.topk(k, dim=1, largest=False).indices  # [B, k], nearest first
    votes = ids[nearest]
    if k == 1:
        return votes[:, 0]
    # count votes per candidate; the stable descending sort keeps the nearest among equals
    counts = (votes.unsqueeze(2) == votes.unsqueeze(1)).sum(1)  # [B, k]
    best = counts.sort(dim=1, descending=True, stable=True).indices[:, 0]
    return votes.gather(1, best.unsqueeze(1)).squeeze(1)


def pairwise_distance(a: torch.Tensor, b: torch.Tensor, *, metric: Metric) -> torch.Tensor:
    if metric == "euclidean":
        return torch.cdist(a, b)
    if metric == "cosine":
        return 1.0 - F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")


@dataclass
class Misclassification:
    """Untargeted: the top-1 class differs from ``labels``."""

    labels: torch.Tensor
    reads: str = "logits"

    def achieved(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1) != self.labels.to(logits.device)

    def subset(self, index: torch.Tensor) -> Misclassification:
        return Misclassification(self.labels[index])


@dataclass
class TargetedMisclassification:
    """Targeted: the top-1 class equals ``targets``."""

    targets: torch.Tensor
    reads: str = "logits"

    def achieved(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1) == self.targets.to(logits.device)

    def subset(self, index: torch.Tensor) -> TargetedMisclassification:
        return TargetedMisclassification(self.targets[index])


@dataclass
class Impersonation:
    """Feature objective: the gallery k-NN assigns the ``targets`` identity."""

    gallery: Any
    targets: torch.Tensor
    k: int = 1
    metric: Metric = "euclidean"
    reads: str = "features"

    def achieved(self, features: torch.Tensor) -> torch.Tensor:
        pred = knn_predict(features, self.gallery, k=self.k, metric=self.metric)
        return pred == self.targets.to(pred.device)

    def anchor(self) -> torch.Tensor:
        """Template each sample moves towards: the target identity's (first) template."""
        return templates_of(self.gallery, self.targets)

    def subset(self, index: torch.Tensor) -> Impersonation:
        return Impersonation(self.gallery, self.targets[index], self.k, self.metric)


@dataclass
class Dodging:
    """Feature objective: the gallery k-NN assigns any identity but ``labels``."""

    gallery: Any
    labels: torch.Tensor
    k: int = 1
    metric: Metric = "euclidean"
    reads: str = "features"

    def achieved(self, features: torch.Tensor) -> torch.Tensor:
        pred = knn_predict(features, self.gallery, k=self.k, metric=self.metric)
        return pred != self.labels.to(pred.device)

    def anchor(self) -> torch.Tensor:
        """Template each sample moves away from: its own identity's template."""
        return templates_of(self.gallery, self.labels)

    def subset(self, index: torch.Tensor) -> Dodging:
        return Dodging(self.gallery, self.labels[index], self.k, self.metric)


def templates_of(gallery: Any, identities: torch.Tensor) -> torch.Tensor:
    """The first template of each identity in ``identities`` ([B] -> [B, D])."""
    ids = gallery.ids.to(identities.device)
    match = ids.unsqueeze(0) == identities.unsqueeze(1)  # [B, N]
    missing = ~match.any(1)
    if missing.any():
        raise ValueError(
            f"identities {identities[missing].tolist()} have no template in the gallery "
            f"({ids.numel()} templates)"
        )
    return gallery.features.to(identities.device)[match.float().argmax(1)]
