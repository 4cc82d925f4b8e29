"""Any torchattacks attack behind crossres' attack interface.

``TorchattacksAttack("PGD", eps=8/255, alpha=2/255, steps=10)(model, images, labels)`` builds
torchattacks' attack around the model given at call time and returns an ``AttackResult`` via
the base class: the model frozen and in eval mode (its mode and ``requires_grad`` flags
restored afterwards), grad enabled under ``no_grad``/``inference_mode``, the output clipped
to [0, 1] and ``success`` recomputed from the model's logits on the returned images.

torchattacks' habits the adapter handles:
- it takes the device from the model's parameters (and prints an error for a model without
  any): the device is set from the images, and the message is swallowed;
- it calls ``model.eval()`` and restores train mode itself: the model is already in eval
  mode inside the base class, which restores every submodule's own mode afterwards;
- targeted runs: ``set_mode_targeted_by_label`` and the targets passed as labels;
- APGD, APGDT, FAB, Square and AutoAttack reseed the global RNG (``torch.manual_seed(seed)``):
  for attacks with a ``seed`` the global RNG state is forked, so the caller's is untouched.
``iterations`` is the attack's nominal budget (``steps``, ``max_iterations``, ``n_queries``
or ``max_iter``; 1 when it has none): torchattacks does not report per-sample work.

Our own attacks are the ones used for results, because of torchattacks 3.5.1's defects:
- ``CW``: no binary search over c (one fixed c); ``torch.eye(n_classes)`` built on every step
  (8631 x 8631 floats at VGGFace2 scale); the margin takes ``max(one_hot * logits)``, which is
  0 instead of the true logit when logits are negative, so the attack stalls there; the early
  stop is decided for the whole batch by the summed cost.
- ``EADL1``/``EADEN``: ``iteration % (max_iterations // 10)`` divides by zero with fewer than
  10 steps; the slack variable is ``nn.Parameter(images)``, sharing memory with the (cloned)
  reference image, so the first in-place gradient step moves the reference too; the slack is
  not reset between binary-search steps; one-hot margins as CW (with -1e4 on the true class).
- ``JSMA``: one image at a time, one backward pass per class (hours per image at 8631
  classes), a Jacobian of O(pixels^2) memory (84 GiB at 224x224), and the untargeted mode
  hard-codes the target ``(label + 1) % 10``.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
from torch import nn

from crossres.attacks._margin import class_targets
from crossres.attacks.base import Attack
from crossres.errors import ConfigValueError

#: Attributes torchattacks' attacks use for their iteration budget, in order of preference.
BUDGET_ATTRIBUTES = ("steps", "max_iterations", "n_queries", "max_iter")


def resolve_torchattacks(name_or_class: str | type) -> type:
    """The torchattacks attack class named (``"PGD"``) or given."""
    import torchattacks

    base = torchattacks.attack.Attack
    if isinstance(name_or_class, str):
        found = getattr(torchattacks, name_or_class, None)
        if not (isinstance(found, type) and issubclass(found, base)):
            known = sorted(
                n for n in dir(torchattacks) if isinstance(getattr(torchattacks, n), type)
            )
            raise ConfigValueError(
                f"torchattacks has no attack named {name_or_class!r}; known: {', '.join(known)}"
            )
        return found
    if isinstance(name_or_class, type) and issubclass(name_or_class, base):
        return name_or_class
    raise TypeError(
        f"expected a torchattacks attack name or class, got {name_or_class!r} "
        f"({type(name_or_class).__name__})"
    )


class TorchattacksAttack(Attack):
    """A torchattacks attack (by name or class, with its constructor's keyword arguments)
    called as ``attack(model, images, labels)`` or ``attack(model, images, targets=...)``."""

    reads = "logits"

    def __init__(self, name_or_class: str | type, **kwargs: Any) -> None:
        self.attack_class = resolve_torchattacks(name_or_class)
        self.kwargs = dict(kwargs)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"TorchattacksAttack({self.attack_class.__name__!r}{', ' if args else ''}{args})"

    def build(self, model: nn.Module, device: torch.device) -> Any:
        """torchattacks' attack around ``model``, its device set to the images' device."""
        with contextlib.redirect_stdout(io.StringIO()):  # "Failed to set device" for no params
            attack = self.attack_class(model, **self.kwargs)
        attack.set_device(device)
        attack.set_model_training_mode(model_training=False)
        return attack

    def run(
        self, model: nn.Module, images: torch.Tensor, objective: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        classes, targeted = class_targets(objective)
        classes = classes.to(images.device).clone()
        attack = self.build(model, images.device)
        if targeted:
            try:
                attack.set_mode_targeted_by_label(quiet=True)
            except ValueError as error:
                raise ValueError(
                    f"torchattacks' {self.attack_class.__name__} has no targeted mode; "
                    "call it without targets="
                ) from error
        seeded = hasattr(attack, "seed")
        devices = [images.device.index or 0] if images.device.type == "cuda" else []
        rng = torch.random.fork_rng(devices=devices) if seeded else contextlib.nullcontext()
        with rng:
            adversarial = attack(images, classes)
        if isinstance(adversarial, tuple | list):
            adversarial = adversarial[0]
        budget = next(
            (
                getattr(attack, a)
                for a in BUDGET_ATTRIBUTES
                if isinstance(getattr(attack, a, None), int)
            ),
            1,
        )
        iterations = torch.full(
            (images.shape[0],), int(budget), dtype=torch.int64, device=images.device
        )
        return adversarial.detach().to(images.device, images.dtype), iterations
