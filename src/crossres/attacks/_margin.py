"""Pieces shared by the CW-L2 and EAD attacks: the margin loss, the search's success test,
the per-sample binary search over the constant c and the best-example keeper.

Everything here is per sample: a sample's margin, constant, bounds and best example depend on
that sample alone, so a batch attacked together and each sample attacked alone agree.
The margin never builds one-hot matrices or ``torch.eye(n_classes)``: the true (or target)
logit is gathered and the others' maximum is taken with the true one masked by -inf, which
is right for logits of any sign (``max(one_hot * logits)`` is not: with all logits negative
it returns 0).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from crossres.attacks.objectives import Misclassification, TargetedMisclassification
from crossres.errors import ConfigValueError

#: Carlini's sentinel for "no successful constant yet" (upper bound) and its test threshold.
UPPER_UNSET = 1e10
UPPER_SET_BELOW = 1e9
#: With this many binary-search steps or more, the last one reruns at c = upper bound.
REPEAT_FROM = 10


def class_targets(objective: Any) -> tuple[torch.Tensor, bool]:
    """(classes [B], targeted) of a classification objective: the true labels (untargeted)
    or the target classes (targeted)."""
    if isinstance(objective, TargetedMisclassification):
        return objective.targets, True
    if isinstance(objective, Misclassification):
        return objective.labels, False
    raise TypeError(
        "CW and EAD attack classification objectives (Misclassification, "
        f"TargetedMisclassification), got {type(objective).__name__}"
    )


def margin_terms(logits: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Z_c, max_{i != c} Z_i) per sample, with c = ``classes``; differentiable in logits."""
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [B, n_classes >= 2], got {tuple(logits.shape)}")
    index = classes.view(-1, 1)
    real = logits.gather(1, index).squeeze(1)
    other = logits.scatter(1, index, float("-inf")).amax(1)
    return real, other


def margin_loss(
    logits: torch.Tensor, classes: torch.Tensor, *, targeted: bool, confidence: float
) -> torch.Tensor:
    """Carlini and Wagner's f_6 per sample:
    untargeted max(Z_y - max_{i != y} Z_i + kappa, 0), targeted max(max_{i != t} Z_i - Z_t + kappa, 0).
    """
    real, other = margin_terms(logits, classes)
    diff = other - real if targeted else real - other
    return (diff + confidence).clamp_min(0.0)


def search_success(
    logits: torch.Tensor, classes: torch.Tensor, *, targeted: bool, confidence: float
) -> torch.Tensor:
    """Whether an iterate counts as a success during the search: the objective's own test
    (top-1 differs from the label / equals the target) and, when kappa > 0, the margin beyond
    kappa (Carlini's ``compare`` with the true logit raised, or the target's lowered, by kappa).
    """
    pred = logits.argmax(1)
    hit = pred == classes if targeted else pred != classes
    if confidence > 0:
        real, other = margin_terms(logits, classes)
        hit = hit & ((real - other > confidence) if targeted else (other - real > confidence))
    return hit


@dataclass
class ConstSearch:
    """Per-sample binary search over c, with Carlini's rules: on success
    upper = min(upper, c); on failure lower = max(lower, c); then c = (lower + upper) / 2 once
    an upper bound exists, else c * 10 after a failure (float64 bookkeeping)."""

    lower: torch.Tensor
    upper: torch.Tensor
    const: torch.Tensor

    @classmethod
    def start(cls, n: int, initial_const: float, device: torch.device) -> ConstSearch:
        kw = {"dtype": torch.float64, "device": device}
        return cls(
            lower=torch.zeros(n, **kw),
            upper=torch.full((n,), UPPER_UNSET, **kw),
            const=torch.full((n,), float(initial_const), **kw),
        )

    def update(self, found: torch.Tensor) -> None:
        """``found`` [B]: whether the sample's last binary-search step had a success."""
        self.upper = torch.where(found, torch.minimum(self.upper, self.const), self.upper)
        self.lower = torch.where(found, self.lower, torch.maximum(self.lower, self.const))
        bounded = self.upper < UPPER_SET_BELOW
        mid = (self.lower + self.upper) / 2
        grown = torch.where(found, self.const, self.const * 10)
        self.const = torch.where(bounded, mid, grown)

    def repeat_upper(self) -> torch.Tensor:
        """Carlini's last step with >= 10 binary-search steps: c = upper bound. Returns which
        samples need it run: those with no upper bound yet (c = 1e10, a last try); for the
        others c is a constant already run from the same start, so the rerun would only
        reproduce its result and is skipped."""
        self.const = self.upper.clone()
        return self.upper >= UPPER_UNSET


class BestKeeper:
    """Smallest-score successful example per sample, in full-size tensors; samples never
    successful keep their start image. ``offer`` works on an active subset by index and does
    not synchronise with the device."""

    def __init__(self, start: torch.Tensor) -> None:
        self.adv = start.detach().clone()
        dtype = torch.promote_types(start.dtype, torch.float32)
        self.score = torch.full((start.shape[0],), float("inf"), dtype=dtype, device=start.device)

    def offer(
        self,
        index: torch.Tensor,
        candidates: torch.Tensor,
        score: torch.Tensor,
        success: torch.Tensor,
    ) -> None:
        current = self.score[index]
        better = success & (score.to(current.dtype) < current)
        self.score[index] = torch.where(better, score.to(current.dtype), current)
        keep = better.view(-1, *([1] * (candidates.ndim - 1)))
        self.adv[index] = torch.where(keep, candidates.to(self.adv.dtype), self.adv[index])


def count(name: str, value: int) -> int:
    """Validate an integer knob >= 1 (a clear error naming it)."""
    try:
        number = operator.index(value)  # int, numpy integers; not floats
    except TypeError:
        number = None
    if isinstance(value, bool) or number is None or number < 1:
        raise ConfigValueError(f"{name} must be an integer >= 1, got {value!r}")
    return number


def abort_period(steps: int) -> int:
    """Iterations between two early-abort checks: steps // 10 as in Carlini's code, at least 1
    (his code divides by zero below 10 steps)."""
    return max(1, steps // 10)


#: One optimisation step of a sample set: (state, classes, constants, k) -> (loss, the point
#: the logits were taken at, its score for the best keeper, success there). It updates state.
Step = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, int], tuple]


def binary_search_attack(
    images: torch.Tensor,
    classes: torch.Tensor,
    *,
    binary_search_steps: int,
    steps: int,
    initial_const: float,
    abort_early: bool,
    abort_ratio: float,
    start: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    step: Step,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The driver CW and EAD share: per-sample binary search over c (with 10 steps or more
    the last runs at the upper bound, where that is new), per-sample early abort every
    ``steps // 10`` iterations, a start that is already adversarial finished at once, and the
    active set compacted whenever samples stop, so stopped samples cost nothing more.

    ``start(active)`` gives the algorithm's state for the active samples (tensors indexed like
    ``active``); ``step`` is one iteration. Returns (best adversarial, iterations per sample).
    """
    n, device, dtype = images.shape[0], images.device, images.dtype
    classes = classes.to(device).clone()  # a normal tensor even if made in inference mode
    best = BestKeeper(images)  # samples never successful return their source
    search = ConstSearch.start(n, initial_const, device)
    iterations = torch.zeros(n, dtype=torch.int64, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    period = abort_period(steps)
    for outer in range(binary_search_steps):
        pending = ~done
        if outer == binary_search_steps - 1 and binary_search_steps >= REPEAT_FROM:
            pending &= search.repeat_upper()
        active = pending.nonzero().squeeze(1)
        if active.numel() == 0:
            break
        # state of the active samples only; per-sample results live in full-size tensors
        state = start(active)
        cls, const = classes[active], search.const[active].to(dtype)
        prev = torch.full((active.numel(),), float("inf"), dtype=dtype, device=device)
        found = torch.zeros(n, dtype=torch.bool, device=device)
        for k in range(steps):
            loss, point, score, success = step(state, cls, const, k)
            iterations[active] += 1
            best.offer(active, point, score, success)
            found[active] |= success
            stop = None
            if abort_early and k % period == 0:
                stop = loss > prev * abort_ratio
                prev = loss
            if outer == 0 and k == 0:
                # adversarial at the start: distance 0, nothing can do better
                done[active] = success
                stop = success if stop is None else stop | success
            if stop is not None and bool(stop.any()):
                keep = ~stop
                active = active[keep]
                state = {name: t[keep] for name, t in state.items()}
                cls, const, prev = cls[keep], const[keep], prev[keep]
                if active.numel() == 0:
                    break
        search.update(found)
    return best.adv, iterations
