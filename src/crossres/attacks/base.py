"""Base class of every attack: the contract the callbacks and tests rely on.

An attack is given the model at call time, takes images in [0, 1], and returns adversarial
images in [0, 1] with a per-sample success mask. The base class, not each algorithm:
- validates the input and builds the objective (what success means);
- freezes the model's parameters and puts it in eval mode, restoring both afterwards;
- enables grad (the Lightning test loop may run under no_grad or inference_mode);
- enforces the budget: pixel range [0, 1] and, where the attack has one, the L-infinity bound;
- recomputes ``success`` from the model's output on the returned images, so it is never a
  claim of the algorithm.
It never calls ``.to()`` on the model, never seeds the global RNG: device and dtype come from
the inputs.

Mixed precision is an option, never a default: an attack built with ``autocast="bfloat16"``
(or ``"float16"``) runs its model calls under ``torch.autocast`` for the inputs' device type
and hands their outputs to the algorithm in the images' dtype, so losses, budgets and
projections stay in full precision. The final success check runs outside the attack's
autocast: the verdict is the model's own at its own precision. Attacks that stop at their
first success (JSMA, DR) confirm it at full precision before a sample stops (``confirm``);
CW and EAD keep the best reduced-precision success, which at confidence 0 sits on the
decision boundary and may fail the full-precision check: give them a ``confidence`` above
the autocast logit error (tests/test_autocast.py measures it) for the same verdicts.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from crossres.attacks.objectives import (
    Dodging,
    Impersonation,
    Misclassification,
    TargetedMisclassification,
)
from crossres.errors import ConfigValueError


@dataclass
class AttackResult:
    """adversarial: [B, 3, H, W] in [0, 1]; success: bool [B] (what the model says about
    ``adversarial``); iterations: int64 [B], the iterations each sample used (its last
    useful step); seconds: wall time of the whole call."""

    adversarial: torch.Tensor
    success: torch.Tensor
    iterations: torch.Tensor
    seconds: float = 0.0
    #: "logits" (and "features" for crossres models) on ``adversarial``; attacks may add more
    extra: dict[str, Any] = field(default_factory=dict)

    def norms(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample L0 (pixels changed, any channel), L2 and L-infinity of the perturbation
        on the [0, 1] scale."""
        d = (self.adversarial - images).flatten(2)  # [B, C, HW]
        changed = (d.abs() > 0).any(1)
        flat = d.flatten(1)
        return {
            "l0": changed.sum(1),
            "l2": flat.norm(dim=1),
            "linf": flat.abs().amax(dim=1),
        }


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; both restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, training in modes.items():
            m.train(training)
        for p, flag in flags.items():
            p.requires_grad_(flag)


class Attack(ABC):
    """Subclasses set ``reads`` ("logits" or "features") and implement ``run``.

    ``run(model, images, objective)`` receives a detached copy of the images and an objective
    with ``achieved(output)``; it returns (adversarial, iterations). Helpers ``output`` and
    ``project`` give the model's output the objective reads and the budget projection.
    """

    reads: str = "logits"
    #: L-infinity bound on the [0, 1] scale, or None for unbounded attacks (CW, EAD, JSMA)
    epsilon: float | None = None
    #: dtype name for the model calls under torch.autocast, or None (full precision)
    autocast: str | None = None

    def __call__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        targets: torch.Tensor | None = None,
        gallery: Any = None,
        k: int | None = None,
    ) -> AttackResult:
        check_images(images)
        objective = self.make_objective(images, labels, targets=targets, gallery=gallery, k=k)
        start = time.perf_counter()
        source = images.detach().clone()
        with frozen_eval(model), torch.inference_mode(False), torch.enable_grad():
            adversarial, iterations = self.run(model, source.clone(), objective)
            adversarial = self.project(source, adversarial.detach())
            with torch.no_grad():
                outputs = final_outputs(model, adversarial, self.reads)
                read = outputs["logits"] if self.reads == "logits" else outputs["features"]
                success = objective.achieved(read)
        if iterations.shape != (images.shape[0],):
            raise RuntimeError(f"{type(self).__name__}.run returned iterations of wrong shape")
        return AttackResult(
            adversarial=adversarial,
            success=success.to(torch.bool),
            iterations=iterations.to(torch.int64),
            seconds=time.perf_counter() - start,
            extra=outputs,
        )

    def make_objective(self, images, labels, *, targets, gallery, k):
        n = images.shape[0]
        for name, t in (("labels", labels), ("targets", targets)):
            if t is not None and (t.ndim != 1 or t.shape[0] != n):
                raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")
        if self.reads == "logits":
            if targets is not None:
                return TargetedMisclassification(targets)
            if labels is None:
                raise ValueError(f"{type(self).__name__} needs labels (untargeted) or targets=")
            return Misclassification(labels)
        if gallery is None:
            raise ValueError(f"{type(self).__name__} attacks features: pass gallery=")
        k = k or getattr(self, "k", 1)
        metric = getattr(self, "metric", "euclidean")
        if targets is not None:
            return Impersonation(gallery, targets, k=k, metric=metric)
        if labels is None:
            raise ValueError(f"{type(self).__name__} needs targets= (impersonation) or labels")
        return Dodging(gallery, labels, k=k, metric=metric)

    def output(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What the objective reads: logits, or deep features (``model.features``), under
        autocast when the attack has one, returned in the dtype of ``x``."""
        with self.precision(x):
            out = model(x) if self.reads == "logits" else model.features(x)
        return out if self.autocast is None else out.to(x.dtype)

    def precision(self, x: torch.Tensor) -> contextlib.AbstractContextManager:
        """torch.autocast for ``x``'s device type and the attack's dtype, or nothing."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=getattr(torch, self.autocast))

    def confirm(
        self, model: nn.Module, x: torch.Tensor, claimed: torch.Tensor, objective: Any
    ) -> torch.Tensor:
        """Under autocast, the samples whose reduced-precision output met the objective
        (``claimed`` [B] bool, ``objective`` for these B samples) are checked again at full
        precision, so an attack that stops at its first success never stops on a point only
        bf16 accepts (those lie on the decision boundary). One full-precision forward of
        the claimed samples, which each stop about once. Returns the confirmed mask."""
        if self.autocast is None:
            return claimed
        rows = torch.nonzero(claimed).squeeze(1)
        if rows.numel() == 0:
            return claimed
        with torch.no_grad():
            out = model(x[rows]) if self.reads == "logits" else model.features(x[rows])
            ok = objective.subset(rows).achieved(out)
        return claimed.index_put((rows,), ok)

    def project(self, source: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The budget, in one place: the epsilon ball around the source, then [0, 1]."""
        if self.epsilon is not None:
            x = torch.minimum(torch.maximum(x, source - self.epsilon), source + self.epsilon)
        return x.clamp(0.0, 1.0)

    @abstractmethod
    def run(
        self, model: nn.Module, images: torch.Tensor, objective: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Craft adversarial examples; return (adversarial [B, ...], iterations int [B])."""


def final_outputs(model: nn.Module, x: torch.Tensor, reads: str) -> dict[str, torch.Tensor]:
    """The model's outputs on the returned images, computed once: for crossres models with a
    classifier both logits and features from one pass (callers need not run the model
    again), otherwise what the attack reads."""
    if getattr(model, "num_classes", 0) > 0 and hasattr(model, "features_and_logits"):
        features, logits = model.features_and_logits(x)
        return {"features": features, "logits": logits}
    if reads == "features":
        return {"features": model.features(x)}
    return {"logits": model(x)}


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [B, C, H, W], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    # one host synchronisation for both bounds
    if images.numel() and bool(torch.logical_or(images.min() < 0, images.max() > 1)):
        raise ValueError(
            f"images must lie in [0, 1], got range [{images.min().item():.4g}, "
            f"{images.max().item():.4g}]; pass unnormalised images (models normalise inside)"
        )


AUTOCAST_DTYPES = ("bfloat16", "float16")


def check_autocast(value: str | None) -> str | None:
    """Validate the autocast knob: None, "bfloat16" or "float16" (a clear error naming it)."""
    if value is not None and value not in AUTOCAST_DTYPES:
        raise ConfigValueError(f"autocast must be None or one of {AUTOCAST_DTYPES}, got {value!r}")
    return value


def positive(name: str, value: float, *, strict: bool = True) -> float:
    """Validate a knob at construction: a clear error naming it."""
    if value is None or (value <= 0 if strict else value < 0):
        raise ConfigValueError(f"{name} must be {'> 0' if strict else '>= 0'}, got {value!r}")
    return value
