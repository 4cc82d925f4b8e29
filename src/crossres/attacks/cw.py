"""Carlini and Wagner's L2 attack (Carlini & Wagner 2017, "Towards Evaluating the Robustness
of Neural Networks"), batched with every sample on its own.

As the authors' code (``nn_robust_attacks/l2_attack.py``): the image is written
x = (tanh(w) + 1) / 2 so that any w is a valid image; w starts at
atanh((2 x0 - 1) * (1 - 1e-6)) (the shrink keeps atanh finite at pixels of exactly 0 or 1) and
the distance is measured to that start, (tanh(w0) + 1) / 2; Adam minimises
||x - x0||^2 + c * f(x) with f the margin of ``_margin.margin_loss``; every binary-search
step restarts from w0 with a fresh Adam; c follows a per-sample binary search (with 10 steps
or more, the last runs at c = the upper bound found); a sample stops early when its loss has not gone below 0.9999 of its value ``steps // 10`` iterations before;
the smallest-L2 successful iterate is kept. An iterate's success is read from the logits of
the forward pass that gives its gradient (the iterate before the Adam update), so each step
costs one forward and one backward of the model.

Beyond the authors' code: per-sample early abort (theirs stops the whole batch on the batch's
summed loss), samples that stopped drop out of the batch the model sees, and a sample whose
start is already adversarial is finished at once (its start, at distance 0, is optimal), and
the last-step rerun at c = upper bound is skipped where it would repeat a constant already run
(the same deterministic trajectory, so the same result): only samples that never succeeded
make the last try with c = 1e10.
Unlike torchattacks' ``CW``: a binary search over c, no ``torch.eye(n_classes)``, and a margin
that is right for negative logits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from crossres.attacks._margin import (
    binary_search_attack,
    class_targets,
    count,
    margin_loss,
    search_success,
)
from crossres.attacks.base import Attack, check_autocast, positive

#: Adam's constants (torch's and TensorFlow's defaults, as Carlini used).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
#: Carlini's early-abort test: stop when loss > ABORT_RATIO * the previous check's loss.
ABORT_RATIO = 0.9999
#: Shrink before atanh so that pixels at exactly 0 or 1 map to finite w.
TANH_SHRINK = 1 - 1e-6


class CarliniWagnerL2(Attack):
    """CW-L2 with a per-sample binary search over c.

    binary_search_steps: restarts, each with its own c per sample.
    steps: Adam iterations per binary-search step.
    confidence: kappa, the margin the logits must clear (0: the top-1 decides).
    learning_rate: Adam's step size in w (tanh) space.
    initial_const: c of the first binary-search step.
    abort_early: stop a sample's binary-search step when its loss stalls.
    autocast: None (full precision) or "bfloat16"/"float16": the model calls under
        torch.autocast, the attack's own arithmetic in full precision.

    ``iterations`` of the result: optimisation steps each sample ran, summed over
    binary-search steps (at most binary_search_steps * steps).
    """

    reads = "logits"

    def __init__(
        self,
        *,
        binary_search_steps: int = 10,
        steps: int = 100,
        confidence: float = 0.0,
        learning_rate: float = 1e-2,
        initial_const: float = 1e-3,
        abort_early: bool = True,
        autocast: str | None = None,
    ) -> None:
        self.autocast = check_autocast(autocast)
        self.binary_search_steps = count("binary_search_steps", binary_search_steps)
        self.steps = count("steps", steps)
        self.confidence = float(positive("confidence", confidence, strict=False))
        self.learning_rate = float(positive("learning_rate", learning_rate))
        self.initial_const = float(positive("initial_const", initial_const))
        self.abort_early = bool(abort_early)

    def __repr__(self) -> str:
        return (
            f"CarliniWagnerL2(binary_search_steps={self.binary_search_steps}, "
            f"steps={self.steps}, confidence={self.confidence}, "
            f"learning_rate={self.learning_rate}, initial_const={self.initial_const}, "
            f"abort_early={self.abort_early}, autocast={self.autocast!r})"
        )

    def run(
        self, model: nn.Module, images: torch.Tensor, objective: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        classes, targeted = class_targets(objective)
        w_start = torch.atanh((images * 2 - 1) * TANH_SHRINK)
        origin = (torch.tanh(w_start) + 1) / 2  # the start image, what L2 is measured to
        beta1, beta2 = ADAM_BETAS
        kw = {"targeted": targeted, "confidence": self.confidence}

        def start(active: torch.Tensor) -> dict[str, torch.Tensor]:
            # every binary-search step restarts from w0 with a fresh Adam
            w = w_start[active]
            return {
                "w": w,
                "m": torch.zeros_like(w),
                "v": torch.zeros_like(w),
                "ref": origin[active],
            }

        def step(state, cls, const, k):
            w = state["w"].detach().requires_grad_(True)
            x = (torch.tanh(w) + 1) / 2
            logits = self.output(model, x)
            l2 = (x - state["ref"]).flatten(1).pow(2).sum(1)
            loss = l2 + const * margin_loss(logits.to(images.dtype), cls, **kw)
            (grad,) = torch.autograd.grad(loss.sum(), w)
            success = search_success(logits.detach(), cls, **kw)
            # Adam, elementwise: every active sample started this binary step together
            t, m, v = k + 1, state["m"], state["v"]
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(ADAM_EPS)
            state["w"] = w.detach().addcdiv(m, denom, value=-self.learning_rate / (1 - beta1**t))
            return loss.detach(), x.detach(), l2.detach(), success

        return binary_search_attack(
            images,
            classes,
            binary_search_steps=self.binary_search_steps,
            steps=self.steps,
            initial_const=self.initial_const,
            abort_early=self.abort_early,
            abort_ratio=ABORT_RATIO,
            start=start,
            step=step,
        )
