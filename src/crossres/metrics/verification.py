"""Verification (1:1) metrics as definitions: the ROC and TAR at a fixed FAR.

A comparison is genuine (probe and template of the same identity) or impostor (different
identities). Scores are similarities: higher = more alike; a pair is accepted at threshold
t when its score is >= t (ties count as accepted, as ``functional`` counts a non-mate tie
against the probe and pyeer/bob.measure accept ``score >= t``).

- FAR(t) = #{impostor >= t} / N_impostor; TAR(t) = #{genuine >= t} / N_genuine.
- ROC: (FAR, TAR) at every candidate threshold: every observed score (genuine or
  impostor) and +inf, ascending. Both rates are step functions changing only at observed
  scores, so any other threshold gives the point of the smallest candidate above it.
- TAR@FAR(far): TAR at the smallest candidate t with FAR(t) <= far. FAR and TAR both
  fall as t rises, so this is the largest TAR over all real thresholds whose FAR is
  within ``far``. It is never worse than the +inf point (FAR 0, TAR 0), so it is defined
  for every far in [0, 1]. With far below 1 / N_impostor only thresholds above every
  impostor qualify: an impostor set of n pairs resolves FAR only in steps of 1 / n.

The rates are float64 (exact counts / n up to rounding), as in ``functional``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Roc",
    "VerificationPoint",
    "tar_at_far",
    "verification_operating_point",
    "verification_roc",
]


class Roc(NamedTuple):
    """FAR and TAR at ascending thresholds (the last one is +inf: FAR 0, TAR 0)."""

    far: Tensor
    tar: Tensor
    thresholds: Tensor


class VerificationPoint(NamedTuple):
    """The ROC point chosen for a FAR target: its TAR, its FAR (<= target) and threshold."""

    tar: Tensor
    far: Tensor
    threshold: Tensor


def _check_pair_scores(scores: Tensor, name: str) -> None:
    if not isinstance(scores, Tensor) or scores.ndim != 1:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"{name} must be a 1-D tensor of pair scores, got {shape}")
    if not scores.is_floating_point():
        raise ValueError(f"{name} must be floating point (similarities), got {scores.dtype}")
    if scores.shape[0] == 0:
        raise ValueError(f"{name} is empty: the verification rates need at least one {name} pair")
    bad = torch.isnan(scores)
    if bad.any():
        raise ValueError(
            f"{name} contains {int(bad.sum())} NaN scores (first at {int(torch.nonzero(bad)[0, 0])})"
        )


def _check_far(far: float) -> float:
    if isinstance(far, bool) or not (0.0 <= float(far) <= 1.0):
        raise ValueError(f"far must be in [0, 1], got {far!r}")
    return float(far)


def verification_roc(genuine: Tensor, impostor: Tensor) -> Roc:
    """(FAR, TAR, thresholds) at every observed score and +inf, ascending thresholds.

    ``genuine`` [N_genuine] and ``impostor`` [N_impostor]: 1-D floating-point scores, both
    non-empty and on the same device.
    """
    _check_pair_scores(genuine, "genuine")
    _check_pair_scores(impostor, "impostor")
    dtype = torch.promote_types(genuine.dtype, impostor.dtype)
    gen = genuine.to(dtype).sort().values
    imp = impostor.to(dtype=dtype, device=gen.device).sort().values
    inf = torch.full((1,), math.inf, dtype=dtype, device=gen.device)
    thresholds = torch.unique(torch.cat([gen, imp, inf]))  # sorted
    accepted_imp = imp.shape[0] - torch.searchsorted(imp, thresholds, side="left")
    accepted_gen = gen.shape[0] - torch.searchsorted(gen, thresholds, side="left")
    return Roc(
        far=accepted_imp.to(torch.float64) / imp.shape[0],
        tar=accepted_gen.to(torch.float64) / gen.shape[0],
        thresholds=thresholds,
    )


def verification_operating_point(roc: Roc, far: float) -> VerificationPoint:
    """The point of ``roc`` at the smallest threshold with FAR <= ``far``."""
    far = _check_far(far)
    # FAR never increases with the threshold and is 0 at +inf: the first index that meets
    # the target exists and starts the run of thresholds that do
    i = int(torch.nonzero(roc.far <= far)[0, 0])
    return VerificationPoint(roc.tar[i], roc.far[i], roc.thresholds[i])


def tar_at_far(genuine: Tensor, impostor: Tensor, far: float) -> Tensor:
    """TAR at the smallest observed score (or +inf) t with FAR(t) <= ``far`` (0-d float64).

    See the module docstring; ``genuine`` / ``impostor`` as in ``verification_roc``.
    """
    _check_far(far)
    return verification_operating_point(verification_roc(genuine, impostor), far).tar
