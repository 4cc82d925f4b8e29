"""Attack callbacks: craft adversarial examples from every test batch, on every target.

One callback per attack configuration (a list in the YAML). Classification attacks
(``objective="untargeted"``/``"targeted"``) attack the logits; feature attacks
(``"impersonation"``/``"dodging"``) attack the deep features against the target's gallery.
Targets of targeted and impersonation attacks are drawn per sample from a generator seeded
with (seed, sample_id): the same on one process or many, in any batch.

What a callback reads is the frozen target's typed output (``TargetOutput`` per target: the
classifier, galleries, clean predictions, attack labels, and how to score features into
rows); its rows go to the run's ``ResultStoreCallback`` (found among the trainer's
callbacks), and it keeps the first few clean/adversarial pairs per target in ``examples``.
Two attack callbacks of one run may not share a name: that is an error at set-up, before
anything is crafted.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pytorch_lightning as pl
import torch

from crossres.attacks.base import Attack
from crossres.callbacks.store import ResultStoreCallback, find_writer, subset, target_outputs
from crossres.errors import CrossresError
from crossres.lightning_modules.frozen_target import TargetOutput
from crossres.phases import mark
from crossres.store import CLEAN, params_json
from crossres.types import FaceBatch

Objective = Literal["untargeted", "targeted", "impersonation", "dodging"]


class AttackCallback(pl.Callback):
    """attack: any crossres Attack (class_path/init_args in YAML).
    name: the configuration's name in tables, e.g. "CW-L2 (10-100)"; by default the class name
        and its parameters.
    objective: what the attack pursues (see module docstring).
    models: labels of the targets to attack (None: all).

    ``examples`` keeps the first ``n_examples`` clean/adversarial pairs per target (the report
    callback logs them to W&B). Not a constructor knob: every init argument is part of the
    configuration hash of the run directory, and this one does not change the results.
    """

    n_examples = 4

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
        self.examples: dict[str, Examples] = {}  # target label -> the first few pairs
        self.writer: ResultStoreCallback | None = None  # the run's, found in setup

    def draw_targets(self, sample_ids: torch.Tensor, identities: torch.Tensor, pool: torch.Tensor):
        """A target identity != own per sample, from ``pool``, seeded by (seed, sample_id)."""
        out = []
        for sid, own in zip(sample_ids.tolist(), identities.tolist(), strict=True):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(sid))
            choices = pool[pool != own]
            out.append(int(choices[torch.randint(len(choices), (1,), generator=g)]))
        return torch.tensor(out, dtype=torch.long)

    # ---------------------------------------------------------------- lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "test":
            return
        check_unique_names(trainer.callbacks)  # before any crafting or gallery building
        self.writer = find_writer(trainer, f"AttackCallback {self.name!r}")
        self.examples = {}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.writer = None

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch: FaceBatch, batch_idx, dataloader_idx=0
    ):
        if self.writer is None:
            raise RuntimeError(f"AttackCallback {self.name!r} was not set up for testing")
        outputs = target_outputs(outputs, f"AttackCallback {self.name!r}")
        unknown = sorted(set(self.models or ()) - outputs.keys())
        if unknown:
            raise CrossresError(
                f"AttackCallback {self.name!r}: models {unknown} are no target of this run "
                f"(targets: {sorted(outputs)})"
            )
        for label, out in outputs.items():
            if self.models is not None and label not in self.models:
                continue
            todo = self.writer.pending(label, self.name, batch)
            if not todo.any():
                continue
            index = todo.nonzero().squeeze(1)
            self.attack_target(out.select(index), subset(batch, index))

    def attack_target(self, clean: TargetOutput, batch: FaceBatch) -> None:
        """Craft, score and write the rows of ``batch`` on ``clean.target``."""
        mark("craft")
        start = time.perf_counter()
        target = clean.target
        images, identities = batch.images, batch.identity
        kwargs, targets = {}, None
        if self.objective in ("untargeted", "targeted"):
            if self.objective == "targeted":
                targets = self.draw_targets(batch.sample_id, identities, target.class_ids.cpu())
                kwargs["targets"] = target.class_index(targets.to(identities.device))
            result = self.attack(target.model, images, clean.attack_labels, **kwargs)
        else:
            kwargs["gallery"] = target.gallery
            if self.objective == "impersonation":
                targets = self.draw_targets(batch.sample_id, identities, target.gallery.ids.cpu())
                kwargs["targets"] = targets.to(identities.device)
            else:
                kwargs["labels"] = identities
            result = self.attack(target.model, images, **kwargs)
        features, logits = result.extra["features"], result.extra["logits"]
        norms = result.norms(images)
        seconds = (time.perf_counter() - start) / len(batch)
        rows = target.rows(
            batch,
            self.name,
            features,
            target.predict(logits),
            params=params_json(self.params),
            success=result.success.cpu(),
            target=targets.tolist() if targets is not None else [None] * len(batch),
            l0=norms["l0"].float().cpu(),
            l2=norms["l2"].cpu(),
            linf=norms["linf"].cpu(),
            iterations=result.iterations.cpu(),
            clean_top1=clean.top1.cpu(),
            seconds=seconds,
        )
        self.writer.write(rows)
        self.keep_examples(target.label, images, result.adversarial)

    def keep_examples(self, label: str, clean: torch.Tensor, adversarial: torch.Tensor) -> None:
        """Keep the first ``n_examples`` clean/adversarial pairs per target (for W&B)."""
        have = self.examples.get(label)
        n = self.n_examples - (0 if have is None else len(have.clean))
        if n <= 0:
            return
        pair = Examples(clean[:n].detach().cpu(), adversarial[:n].detach().cpu())
        if have is not None:
            pair = Examples(
                torch.cat([have.clean, pair.clean]), torch.cat([have.adversarial, pair.adversarial])
            )
        self.examples[label] = pair


@dataclass
class Examples:
    """Clean images [N, 3, H, W] and their adversarial counterparts, in [0, 1] on the CPU."""

    clean: torch.Tensor
    adversarial: torch.Tensor


def check_unique_names(callbacks: Sequence[pl.Callback]) -> None:
    """Attack configurations are keyed by name in the store: two with one name (or one named
    like the clean rows) would silently lose the second one's rows."""
    names = Counter(c.name for c in callbacks if isinstance(c, AttackCallback))
    clashes = sorted(n for n, k in names.items() if k > 1)
    if clashes:
        raise CrossresError(
            f"attack callbacks with the same name: {clashes}; every attack configuration of a "
            "run needs its own name (init_args.name), its rows are stored under it"
        )
    if CLEAN in names:
        raise CrossresError(
            f"an attack callback is named {CLEAN!r}, the name of the unattacked rows; rename it"
        )


def attack_params(attack: Attack) -> dict:
    """The attack's public knobs (what its constructor set), for keys and tables."""
    return {
        k: v
        for k, v in sorted(vars(attack).items())
        if not k.startswith("_") and isinstance(v, int | float | str | bool | None)
    }
