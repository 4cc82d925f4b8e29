"""EAD, the elastic-net attack (Chen, Sharma, Zhang, Yi, Hsieh 2018, "EAD: Elastic-Net Attacks
to Deep Neural Networks via Adversarial Examples"), batched with every sample on its own.

As the paper's Algorithm 1 and the authors' code (``en_attack.py``), in pixel space (no tanh):
FISTA on g(x) = c * f(x) + ||x - x0||^2 with the slack (momentum) point y, the projected
shrinkage-thresholding operator S_beta onto [0, 1] (threshold beta, as the paper and every
implementation write it), learning rate lr * (1 - k / steps)^0.5 at iteration k = 0..steps-1
(never zero, so any steps >= 1 works), momentum (k + 1) / (k + 4) (the authors' global step
after its increment), a per-sample binary search over c (with 10 steps or more the last runs
at c = the upper bound found, only for samples that never succeeded: for the others it would
repeat a run), and the best successful example by the EN (beta * L1 + L2^2) or L1 decision
rule.

One forward and one backward per iteration: the model sees only the slack point y_k, so y_k is
the candidate whose success its logits decide (the authors' code runs a second forward on x_k;
foolbox 3 decides x_k's success from y_k's logits, which can store an image that is not
adversarial). y_k is projected onto [0, 1] so that every candidate is an image. Early abort
per sample on its elastic-net loss at y_k (threshold 0.999999 as the authors'), checked every
``steps // 10`` iterations (at least 1). Unlike torchattacks' ``EADL1``: no division by zero
below 10 steps, no shared memory with the input, no one-hot margin.
"""

from __future__ import annotations

from typing import Any, Literal

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
from crossres.errors import ConfigValueError

#: The authors' early-abort test: stop when loss > ABORT_RATIO * the previous check's loss.
ABORT_RATIO = 0.999999
DecisionRule = Literal["EN", "L1"]


def shrink(u: torch.Tensor, origin: torch.Tensor, beta: float) -> torch.Tensor:
    """Projected shrinkage-thresholding S_beta onto [0, 1]: move ``u`` towards ``origin`` by
    beta per pixel, to ``origin`` when within beta, and clip to the box."""
    diff = u - origin
    return torch.where(
        diff > beta,
        (u - beta).clamp_max(1.0),
        torch.where(diff < -beta, (u + beta).clamp_min(0.0), origin),
    )


class ElasticNet(Attack):
    """EAD with FISTA and per-sample binary search over c.

    binary_search_steps: restarts, each with its own c per sample.
    steps: FISTA iterations per binary-search step (any >= 1).
    beta: weight of the L1 term (shrinkage threshold) on the [0, 1] pixel scale.
    decision_rule: "EN" keeps the successful example of least beta * L1 + L2^2, "L1" of least L1.
    learning_rate: initial step size, decayed as lr * (1 - k / steps)^0.5.
    initial_const: c of the first binary-search step.
    confidence: kappa, the margin the logits must clear.
    abort_early: stop a sample's binary-search step when its loss stalls.
    autocast: None (full precision) or "bfloat16"/"float16": the model calls under
        torch.autocast, the attack's own arithmetic in full precision.

    ``iterations`` of the result: FISTA steps each sample ran, summed over binary-search steps.
    """

    reads = "logits"

    def __init__(
        self,
        *,
        binary_search_steps: int = 10,
        steps: int = 100,
        beta: float = 0.1,
        decision_rule: DecisionRule = "EN",
        learning_rate: float = 1e-2,
        initial_const: float = 1e-3,
        confidence: float = 0.0,
        abort_early: bool = True,
        autocast: str | None = None,
    ) -> None:
        self.autocast = check_autocast(autocast)
        if decision_rule not in ("EN", "L1"):
            raise ConfigValueError(f"decision_rule must be 'EN' or 'L1', got {decision_rule!r}")
        self.binary_search_steps = count("binary_search_steps", binary_search_steps)
        self.steps = count("steps", steps)
        self.beta = float(positive("beta", beta, strict=False))
        self.decision_rule = decision_rule
        self.learning_rate = float(positive("learning_rate", learning_rate))
        self.initial_const = float(positive("initial_const", initial_const))
        self.confidence = float(positive("confidence", confidence, strict=False))
        self.abort_early = bool(abort_early)

    def __repr__(self) -> str:
        return (
            f"ElasticNet(binary_search_steps={self.binary_search_steps}, steps={self.steps}, "
            f"beta={self.beta}, decision_rule={self.decision_rule!r}, "
            f"learning_rate={self.learning_rate}, initial_const={self.initial_const}, "
            f"confidence={self.confidence}, abort_early={self.abort_early}, "
            f"autocast={self.autocast!r})"
        )

    def run(
        self, model: nn.Module, images: torch.Tensor, objective: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        classes, targeted = class_targets(objective)
        beta = self.beta
        kw = {"targeted": targeted, "confidence": self.confidence}

        def start(active: torch.Tensor) -> dict[str, torch.Tensor]:
            ref = images[active]
            # x_k, the shrinkage iterate, and y_k, the slack point the model sees
            return {"x": ref.clone(), "y": ref.clone(), "ref": ref}

        def step(state, cls, const, k):
            ref = state["ref"]
            y = state["y"].detach().requires_grad_(True)
            logits = self.output(model, y)
            l2 = (y - ref).flatten(1).pow(2).sum(1)
            smooth = l2 + const * margin_loss(logits.to(images.dtype), cls, **kw)
            (grad,) = torch.autograd.grad(smooth.sum(), y)
            y = y.detach()
            l1 = (y - ref).abs().flatten(1).sum(1)
            loss = smooth.detach() + beta * l1
            score = l2.detach() + beta * l1 if self.decision_rule == "EN" else l1
            success = search_success(logits.detach(), cls, **kw)

            lr = self.learning_rate * (1 - k / self.steps) ** 0.5
            x_next = shrink(y - lr * grad, ref, beta)
            momentum = (k + 1) / (k + 4)
            state["y"] = (x_next + momentum * (x_next - state["x"])).clamp_(0.0, 1.0)
            state["x"] = x_next
            return loss, y, score, success

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
