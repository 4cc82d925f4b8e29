"""Jacobian saliency map attack (Papernot et al. 2016), as foolbox 2.x ran it for the paper.

The paper used foolbox 2.x's ``SaliencyMapAttack`` with its defaults apart from
``max_iter=1000``, ``theta`` in {0.1, 0.3, 0.5} and ``max_perturbations_per_pixel=10``. This
module reproduces that code path step for step (foolbox 2.0-2.4 share it), batched:

- **Variant: foolbox's ``fast=True`` (its default).** With ``fast`` the "other classes" term
  of the saliency map is the constant ``beta = -1``, so the map ``|alpha| |beta|
  sign(alpha beta)`` is ``-alpha``, where ``alpha`` is the gradient of the *cross-entropy
  loss* of the target class with respect to the input (foolbox 2's ``gradient_one``
  differentiates the loss, not the logit). One gradient per iteration, whatever the number
  of classes: one forward and one backward of the batch.
- **Single input component, not pixel pairs, channels separate.** Each iteration takes the
  argmin of the map, i.e. the component (channel, row, column) with the largest *signed*
  ``alpha`` (components out of the search domain count as 0; first index on ties), and adds
  ``-sign(alpha) * theta`` (``theta`` a fraction of the [0, 1] range). So foolbox's fast
  variant in effect only lowers components (those whose loss gradient is positive, largest
  first); a component that would have to be raised (negative ``alpha``) is taken only when
  no positive or zero entry is left. A quirk of the original, kept: the paper's numbers come
  from it. Nothing of size pixels^2 or classes x pixels is ever built.
- **Search domain and counter.** A component leaves the domain when the step takes it to or
  past a bound (0 or 1; it is then clipped) or when it has been changed
  ``max_perturbations_per_pixel`` times. So each component moves by at most
  ``max_perturbations_per_pixel * theta``.
- **Stop.** Before each of the ``max_iter`` iterations the current image is checked against
  the goal; the attack stops at the first image that meets it. As in foolbox, the image
  after the last (``max_iter``-th) change is never checked, so a sample that exhausts its
  budget returns the last *checked* image (after ``max_iter - 1`` changes) and fails; the
  useless last gradient is skipped. When the chosen entry is 0 (e.g. a masked one, all others
  negative) the step is zero, the image can never change again (foolbox loops on it until
  ``max_iter``): the sample stops there, with the same result.
- **Untargeted target class (``num_random_targets=0``, foolbox's default).** foolbox first
  runs its ``GradientAttack``: the gradient of the loss of the true label, scaled to unit
  RMS, is added with step sizes 0.001, 0.002, ..., 1 (clipped to [0, 1]) until the image is
  misclassified; if that happens within the first 20 steps, a finer scan
  ``linspace(0, eps, 21)[1:]`` looks for a smaller one. The target is the class the model
  predicts on the smallest misclassified image found. Only when no step up to 1 misclassifies
  does foolbox draw a random class (!= label); here that draw comes from a generator seeded
  with ``(seed, label)``, so it is reproducible and independent of the batch. The attack
  itself then still succeeds on *any* misclassification (foolbox's ``Misclassification``
  criterion), not only on reaching that target. A targeted call (``targets=``) skips all
  this and stops when the target is predicted. Cost of the choice: one backward, then the
  scan's forwards (no grad), batched across samples and step sizes.

Checked against foolbox 2.4.0 itself (``benchmarks/jsma_dr.py --foolbox2 DIR``): same images
and verdicts, sample for sample.

Batching: every sample keeps its own target, domain, counters and stop; all live samples go
through one forward and one backward per iteration, and finished samples (success, budget or
stuck) leave the batch, at one host synchronisation per iteration (the compaction).
``iterations`` reports the changes applied to the returned image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crossres.attacks.base import Attack, check_autocast, positive
from crossres.attacks.objectives import Misclassification, TargetedMisclassification
from crossres.errors import ConfigValueError

#: foolbox 2's GradientAttack defaults: 1000 step sizes in (0, 1], refined when the first
#: success comes within the first 20 of them.
_GRADIENT_EPSILONS = 1000
_GRADIENT_REFINE_BELOW = 20


class JSMA(Attack):
    """Saliency map attack, foolbox 2.x ``SaliencyMapAttack(fast=True)`` batched.

    max_iter: changes per sample at most (the paper: 1000).
    theta: size of one change as a fraction of the pixel range [0, 1] (0.1, 0.3, 0.5).
    max_perturbations_per_pixel: times one input component may be changed (10).
    untargeted_target: "foolbox" (the paper's: foolbox 2's GradientAttack scan, up to 1000
        forwards per sample) or "runner_up" (the most likely other class, one forward).
    autocast: None (full precision) or "bfloat16"/"float16": the model calls under
        torch.autocast, the attack's own arithmetic in full precision.
    seed: only for foolbox's random-target fallback (untargeted, when its gradient scan
        finds no misclassification); never touches the global RNG.
    """

    reads = "logits"

    def __init__(
        self,
        *,
        max_iter: int = 1000,
        theta: float = 0.1,
        max_perturbations_per_pixel: int = 10,
        seed: int = 0,
        untargeted_target: str = "foolbox",
        autocast: str | None = None,
    ) -> None:
        self.autocast = check_autocast(autocast)
        if int(max_iter) != max_iter or max_iter < 1:
            raise ConfigValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
        if int(max_perturbations_per_pixel) != max_perturbations_per_pixel or (
            max_perturbations_per_pixel < 1
        ):
            raise ConfigValueError(
                "max_perturbations_per_pixel must be an integer >= 1, "
                f"got {max_perturbations_per_pixel!r}"
            )
        self.max_iter = int(max_iter)
        self.theta = float(positive("theta", theta))
        if self.theta > 1:
            raise ConfigValueError(
                f"theta is a fraction of the pixel range: must be <= 1, got {theta}"
            )
        self.max_perturbations_per_pixel = int(max_perturbations_per_pixel)
        self.seed = int(seed)
        if untargeted_target not in ("foolbox", "runner_up"):
            raise ConfigValueError(
                f"untargeted_target must be 'foolbox' or 'runner_up', got {untargeted_target!r}"
            )
        self.untargeted_target = untargeted_target

    def __repr__(self) -> str:
        return (
            f"JSMA(max_iter={self.max_iter}, theta={self.theta}, "
            f"max_perturbations_per_pixel={self.max_perturbations_per_pixel}, "
            f"autocast={self.autocast!r})"
        )

    # ------------------------------------------------------------------ main loop
    def run(
        self, model: nn.Module, images: torch.Tensor, objective
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = images.shape[0]
        device = images.device
        iterations = torch.zeros(n, dtype=torch.int64, device=device)
        if isinstance(objective, TargetedMisclassification):
            targets = objective.targets.to(device)
            active = torch.arange(n, device=device)
        elif isinstance(objective, Misclassification) and self.untargeted_target == "runner_up":
            targets, active = self._runner_up_targets(model, images, objective)
        elif isinstance(objective, Misclassification):
            targets, active = self._untargeted_targets(model, images, objective)
        else:
            raise TypeError(
                "JSMA pursues Misclassification or TargetedMisclassification, "
                f"got {type(objective).__name__}"
            )

        x = images.contiguous()  # a private copy (the base class passes a clone); changed in place
        flat = x.view(n, -1)
        # per-sample search domain and change counter, linear in the number of components
        domain = torch.ones_like(flat, dtype=torch.bool)
        counts = torch.zeros_like(flat, dtype=torch.int32)
        # a sample whose chosen change was 0 can never change again; it leaves the batch at
        # the next iteration's compaction, so each iteration synchronises with the device once
        stuck = torch.zeros(n, dtype=torch.bool, device=device)
        for step in range(self.max_iter):
            if active.numel() == 0:
                break
            xa = x[active].requires_grad_(True)
            logits = self.output(model, xa)
            with torch.no_grad():
                if step == self.max_iter - 1:  # the next change would never be checked
                    done = torch.ones_like(active, dtype=torch.bool)
                else:
                    done = objective.subset(active).achieved(logits.detach())
                    done = self.confirm(model, xa.detach(), done, objective.subset(active))
                was_stuck = stuck[active]
                finished = iterations[active]
                iterations[active] = torch.where(done & ~was_stuck, step, finished)
                keep = torch.nonzero(~(done | was_stuck)).squeeze(1)  # the one sync
            if keep.numel() == 0:
                break
            rows = active[keep]
            loss = F.cross_entropy(logits[keep], targets[rows], reduction="sum")
            (grad,) = torch.autograd.grad(loss, xa)
            with torch.no_grad():
                alpha = grad[keep].reshape(rows.numel(), -1)
                alpha = alpha * domain[rows]
                # fast=True: saliency = alpha * beta = -alpha; its argmin is the largest signed
                # alpha, masked components counting as 0 (first on ties, as np.argmin)
                idx = alpha.argmax(1)
                value = alpha.gather(1, idx[:, None]).squeeze(1)
                moves = value != 0  # sign(0) = 0: a stuck sample's image stays as it is
                stuck[rows] = ~moves
                iterations[rows] = torch.where(moves, iterations[rows], step)
                new = flat[rows, idx] - torch.sign(value).to(flat.dtype) * self.theta
                changed = counts[rows, idx] + moves.to(counts.dtype)
                counts[rows, idx] = changed
                leaves = (new <= 0) | (new >= 1) | (changed >= self.max_perturbations_per_pixel)
                domain[rows, idx] = torch.where(moves, ~leaves, domain[rows, idx])
                flat[rows, idx] = new.clamp(0.0, 1.0)
                active = rows
        return x, iterations

    # ------------------------------------------------------------ target choice
    @torch.no_grad()
    def _runner_up_targets(
        self, model: nn.Module, images: torch.Tensor, objective: Misclassification
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cheap choice (one forward): the most likely class other than the label."""
        logits = self.output(model, images)
        labels = objective.labels.to(images.device)
        masked = logits.scatter(1, labels.unsqueeze(1), -torch.inf)
        todo = torch.nonzero(~objective.achieved(logits)).squeeze(1)
        return masked.argmax(1), todo

    def _untargeted_targets(
        self, model: nn.Module, images: torch.Tensor, objective: Misclassification
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """foolbox 2's target for ``num_random_targets=0``: the class its GradientAttack
        lands on. Returns (targets [B], indices of the samples still to attack)."""
        n = images.shape[0]
        device = images.device
        labels = objective.labels.to(device)
        targets = labels.clone()
        xg = images.detach().clone().requires_grad_(True)
        logits = self.output(model, xg)
        with torch.no_grad():
            done = objective.achieved(logits.detach())  # already misclassified: distance 0
        todo = torch.nonzero(~done).squeeze(1)
        if todo.numel() == 0:
            return targets, todo
        loss = F.cross_entropy(logits[todo], labels[todo], reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
        with torch.no_grad():
            x0 = images[todo]
            g = grad[todo]
            rms = g.pow(2).flatten(1).mean(1).sqrt()
            g = g / (rms + 1e-8).view(-1, *([1] * (g.ndim - 1)))  # times the range (max - min = 1)
            eps = torch.from_numpy(np.linspace(0, 1, num=_GRADIENT_EPSILONS + 1)[1:])
            table = eps.to(device).expand(todo.numel(), -1)
            forward = lambda x: self.output(model, x)  # noqa: E731
            found, where, pred = _first_misclassified(forward, x0, g, labels[todo], table, n)
            chosen = pred.clone()
            fine = found & (where < _GRADIENT_REFINE_BELOW)
            if fine.any():
                sel = torch.nonzero(fine).squeeze(1)
                top = table[sel, where[sel]].cpu().numpy()
                fine_table = torch.from_numpy(
                    np.stack([np.linspace(0, e, num=_GRADIENT_REFINE_BELOW + 1)[1:] for e in top])
                ).to(device)
                f2, _, p2 = _first_misclassified(
                    forward, x0[sel], g[sel], labels[todo][sel], fine_table, n
                )
                chosen[sel[f2]] = p2[f2]
            for i in torch.nonzero(~found).squeeze(1).tolist():  # foolbox's random fallback
                chosen[i] = self._random_target(int(labels[todo][i]), logits.shape[1])
            targets[todo] = chosen
        return targets, todo

    def _random_target(self, label: int, num_classes: int) -> int:
        rng = np.random.default_rng([self.seed, label])
        draw = int(rng.integers(num_classes - 1))
        return draw + (draw >= label)


@torch.no_grad()
def _first_misclassified(
    model: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    direction: torch.Tensor,
    labels: torch.Tensor,
    table: torch.Tensor,
    batch: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each sample i, the first j with argmax(model(clip(x0_i + table[i, j] * d_i))) !=
    labels_i, scanned in order as foolbox does, in forwards of about ``batch`` images.

    Returns (found [n] bool, j [n], predicted class there [n])."""
    n, length = table.shape
    device = x0.device
    found = torch.zeros(n, dtype=torch.bool, device=device)
    where = torch.zeros(n, dtype=torch.int64, device=device)
    pred = labels.clone()
    start = torch.zeros(n, dtype=torch.int64, device=device)
    live = torch.arange(n, device=device)
    while live.numel():
        chunk = max(1, -(-max(batch, 8) // live.numel()))
        cols = start[live, None] + torch.arange(chunk, device=device)  # [L, chunk]
        valid = cols < length
        cols = cols.clamp(max=length - 1)
        eps = table[live[:, None], cols].to(x0.dtype)  # [L, chunk]
        view = (-1, chunk) + (1,) * (x0.ndim - 1)
        cand = x0[live].unsqueeze(1) + direction[live].unsqueeze(1) * eps.view(view)
        cand = cand.clamp(0.0, 1.0).flatten(0, 1)
        p = model(cand).argmax(1).view(-1, chunk)
        hit = (p != labels[live, None]) & valid
        any_hit = hit.any(1)
        first = hit.float().argmax(1)  # first True (argmax returns the first maximum)
        rows = live[any_hit]
        found[rows] = True
        where[rows] = cols[any_hit, first[any_hit]]
        pred[rows] = p[any_hit, first[any_hit]]
        start[live] += chunk
        live = live[~any_hit & (start[live] < length)]
    return found, where, pred
