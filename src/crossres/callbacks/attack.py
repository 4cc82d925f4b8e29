"""Attack callbacks: craft adversarial examples from every test batch, on every target.

One callback per attack configuration (a list in the YAML). Classification attacks
(``objective="untargeted"``/``"targeted"``) attack the logits; feature attacks
(``"impersonation"``/``"dodging"``) attack the deep features against the target's gallery.
Targets of targeted and impersonation attacks are drawn per sample from a generator seeded
with (seed, sample_id): the same on one process or many, in any batch.
"""

from __future__ import annotations

import time
from typing import Literal

import pytorch_lightning as pl
import torch

from crossres.attacks.base import Attack
from crossres.phases import mark
from crossres.store import params_json
from crossres.types import FaceBatch

Objective = Literal["untargeted", "targeted", "impersonation", "dodging"]


class AttackCallback(pl.Callback):
    """attack: any crossres Attack (class_path/init_args in YAML).
    name: the configuration's name in tables, e.g. "CW-L2 (10-100)"; by default the class name
        and its parameters.
    objective: what the attack pursues (see module docstring).
    models: labels of the targets to attack (None: all).
    """

    def __init__(
        self,
        attack: Attack,
        *,
        name: str | None = None,
        objective: Objective = "untargeted",
        seed: int = 0,
        models: list[str] | None = None,
    ) -> None:
        if not isinstance(attack, Attack):
            raise TypeError(f"attack must be a crossres Attack, got {type(attack).__name__}")
        if objective not in ("untargeted", "targeted", "impersonation", "dodging"):
            raise ValueError(f"unknown objective {objective!r}")
        feature_attack = attack.reads == "features"
        if feature_attack != (objective in ("impersonation", "dodging")):
            raise ValueError(
                f"{type(attack).__name__} reads {attack.reads}: objective {objective!r} does not "
                "apply (classification attacks: untargeted/targeted; DR: impersonation/dodging)"
            )
        self.attack = attack
        self.objective = objective
        self.seed = int(seed)
        self.models = models
        self.params = {
            "class": type(attack).__name__,
            "objective": objective,
            **attack_params(attack),
        }
        self.name = name or f"{type(attack).__name__} {params_json(attack_params(attack))}"

    def draw_targets(self, sample_ids: torch.Tensor, identities: torch.Tensor, pool: torch.Tensor):
        """A target identity != own per sample, from ``pool``, seeded by (seed, sample_id)."""
        out = []
        for sid, own in zip(sample_ids.tolist(), identities.tolist(), strict=True):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(sid))
            choices = pool[pool != own]
            out.append(int(choices[torch.randint(len(choices), (1,), generator=g)]))
        return torch.tensor(out, dtype=torch.long)

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch: FaceBatch, batch_idx, dataloader_idx=0
    ):
        for label, target in pl_module.targets.items():
            if self.models is not None and label not in self.models:
                continue
            todo = torch.tensor(
                [
                    (label, self.name, int(s), int(r)) not in pl_module.done_keys
                    for s, r in zip(batch.sample_id, batch.resolution, strict=True)
                ],
                dtype=torch.bool,
            )
            if not todo.any():
                continue
            sub = subset(batch, todo.nonzero().squeeze(1))
            clean_top1 = outputs[label]["top1"][todo.to(outputs[label]["top1"].device)]
            self.attack_target(pl_module, label, target, sub, clean_top1)

    def attack_target(self, pl_module, label, target, batch: FaceBatch, clean_top1) -> None:
        mark("craft")
        start = time.perf_counter()
        images, identities = batch.images, batch.identity
        kwargs, targets = {}, None
        if self.objective in ("untargeted", "targeted"):
            labels = pl_module.attack_labels(label, identities, clean_top1)
            if self.objective == "targeted":
                targets = self.draw_targets(batch.sample_id, identities, target.class_ids.cpu())
                kwargs["targets"] = pl_module.class_index(label, targets.to(identities.device))
            result = self.attack(target.model, images, labels, **kwargs)
        else:
            kwargs["gallery"] = target.gallery
            if self.objective == "impersonation":
                targets = self.draw_targets(batch.sample_id, identities, target.gallery.ids.cpu())
                kwargs["targets"] = targets.to(identities.device)
            else:
                kwargs["labels"] = identities
            result = self.attack(target.model, images, **kwargs)
        features, logits = result.extra["features"], result.extra["logits"]
        top1 = target.class_ids[logits.argmax(1)]
        norms = result.norms(images)
        seconds = (time.perf_counter() - start) / len(batch)
        rows = pl_module.make_rows(
            label,
            self.name,
            batch,
            features,
            top1,
            params=params_json(self.params),
            success=result.success.cpu(),
            target=targets.tolist() if targets is not None else [None] * len(batch),
            l0=norms["l0"].float().cpu(),
            l2=norms["l2"].cpu(),
            linf=norms["linf"].cpu(),
            iterations=result.iterations.cpu(),
            clean_top1=clean_top1.cpu(),
            seconds=seconds,
        )
        pl_module.record(rows)
        pl_module.log_adversarial(label, self.name, batch, result.adversarial)


def subset(batch: FaceBatch, index: torch.Tensor) -> FaceBatch:
    idx = index.to(batch.images.device)
    return FaceBatch(
        images=batch.images[idx],
        identity=batch.identity[idx],
        sample_id=batch.sample_id[idx],
        resolution=batch.resolution[idx],
        paths=[batch.paths[i] for i in index.tolist()] if batch.paths else [],
    )


def attack_params(attack: Attack) -> dict:
    """The attack's public knobs (what its constructor set), for keys and tables."""
    return {
        k: v
        for k, v in sorted(vars(attack).items())
        if not k.startswith("_") and isinstance(v, int | float | str | bool | None)
    }
