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

Two threat models (``space``, see ``crossres.models.low_resolution``):

- ``"model_input"`` (default, the paper's): the attack perturbs the model's input, the
  low-resolution face already upsampled; budgets and norms are measured there.
- ``"low_resolution"``: the adversary owns the capture itself. The callback asks the
  datamodule for the low-resolution images (``hand_out_low_resolution``, same sample ids) and
  crafts on them through ``LowResolutionInput``, one wrapper per (original size, resolution)
  group of the batch; budgets (epsilon, the [0, 1] box) and the stored norms are measured on
  the low-resolution pixels. At resolution 0 or r >= the image's shortest side nothing is
  degraded: the capture is the original image, so the attack works on the original pixels
  before the model's resize; where the original already is the model input (the default's
  150x150 dlib chips at 256 px) the two spaces are the same and so are the attacks.
The rows record the space (``ResultRow.space``).

Adversarial images are kept (``keep_adversarials``, on by default) through
``crossres.adversarial_store``, keyed like the rows, in the space the attack worked in. They
are written before the batch's rows: a run killed between the two recrafts the batch on
resume and keeps the first images (the built-in attacks are deterministic, so they are the
same up to float summation order); a stored row always has its image.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pytorch_lightning as pl
import torch

from crossres.adversarial_store import AdversarialImageStore, AdversarialWriter
from crossres.attacks.base import Attack, AttackResult
from crossres.callbacks.store import ResultStoreCallback, find_writer, target_outputs
from crossres.errors import CrossresError
from crossres.lightning_modules.frozen_target import ClassifierTarget, TargetOutput
from crossres.metrics.scoring import similarity
from crossres.models.low_resolution import LowResolutionInput
from crossres.phases import mark
from crossres.store import CLEAN, params_json
from crossres.types import FaceBatch, Gallery

Objective = Literal["untargeted", "targeted", "impersonation", "dodging"]
Space = Literal["model_input", "low_resolution"]
SPACES = ("model_input", "low_resolution")


class AttackCallback(pl.Callback):
    """attack: any crossres Attack (class_path/init_args in YAML).
    name: the configuration's name in tables, e.g. "CW-L2 (10-100)"; by default the class name
        and its parameters.
    objective: what the attack pursues (see module docstring).
    models: labels of the targets to attack (None: all).
    space: "model_input" (the paper's threat model) or "low_resolution" (see module docstring).
    keep_adversarials: keep every adversarial image in ``<run_dir>/adversarials`` (for
        ``crossres transfer``).

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
        space: Space = "model_input",
        keep_adversarials: bool = True,
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
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        self.space = space
        self.keep_adversarials = bool(keep_adversarials)
        self.attack = attack
        self.objective = objective
        self.seed = int(seed)
        self.models = models
        self.params = {
            "class": type(attack).__name__,
            "objective": objective,
            **attack_params(attack),
        }
        default = f"{type(attack).__name__} {params_json(attack_params(attack))}"
        if space != "model_input":
            default += f" [{space}]"
        self.name = name or default
        self.examples: dict[str, Examples] = {}  # target label -> the first few pairs
        self.writer: ResultStoreCallback | None = None  # the run's, found in setup
        self.adversarials: AdversarialWriter | None = None  # this process's, made in setup

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
        if self.space == "low_resolution":
            dm = trainer.datamodule
            if not hasattr(dm, "hand_out_low_resolution"):
                raise CrossresError(
                    f"AttackCallback {self.name!r} attacks in the low-resolution space, but the "
                    f"datamodule {type(dm).__name__} cannot hand out low-resolution images "
                    "(use a crossres MultiResolutionDataModule)"
                )
            dm.hand_out_low_resolution()
        if self.keep_adversarials:
            store = AdversarialImageStore(self.writer.resolve_dir(trainer))
            self.adversarials = store.writer(trainer.global_rank)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.writer = None
        self.adversarials = None

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
            self.attack_target(out.select(index), batch.select(index))

    def draw_for(self, target: ClassifierTarget, batch: FaceBatch) -> torch.Tensor | None:
        """The target identity of each sample ([B] on the CPU), None for untargeted/dodging."""
        if self.objective == "targeted":
            return self.draw_targets(batch.sample_id, batch.identity, target.class_ids.cpu())
        if self.objective == "impersonation":
            return self.draw_targets(batch.sample_id, batch.identity, target.gallery.ids.cpu())
        return None

    def craft(
        self,
        target: ClassifierTarget,
        model: torch.nn.Module,
        images: torch.Tensor,
        clean: TargetOutput,
        batch: FaceBatch,
        targets: torch.Tensor | None,
    ) -> AttackResult:
        """Run the attack on ``model`` (the target's classifier, or it seen through
        ``LowResolutionInput``) from ``images`` (in that model's input space)."""
        identities = batch.identity
        if self.objective in ("untargeted", "targeted"):
            kwargs = {}
            if targets is not None:
                kwargs["targets"] = target.class_index(targets.to(identities.device))
            return self.attack(model, images, clean.attack_labels, **kwargs)
        if targets is not None:
            return self.attack(
                model, images, gallery=target.gallery, targets=targets.to(identities.device)
            )
        return self.attack(model, images, gallery=target.gallery, labels=identities)

    def craft_low_resolution(
        self, clean: TargetOutput, batch: FaceBatch, targets: torch.Tensor | None
    ) -> Crafted:
        """Craft on the captures, one ``LowResolutionInput`` per (original size, resolution)."""
        if batch.low_resolution is None or batch.original_size is None:
            raise CrossresError(
                f"AttackCallback {self.name!r} attacks in the low-resolution space, but the batch "
                "carries no low-resolution images: the datamodule was not asked in setup"
            )
        target = clean.target
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, (hw, r) in enumerate(
            zip(batch.original_size.tolist(), batch.resolution.tolist(), strict=True)
        ):
            groups.setdefault((int(hw[0]), int(hw[1]), int(r)), []).append(i)
        n = len(batch)
        adversarial: list[torch.Tensor | None] = [None] * n
        parts: dict[str, list] = {}
        order: list[int] = []
        for (h, w, r), positions in groups.items():
            index = torch.tensor(positions, dtype=torch.long)
            wrapper = LowResolutionInput(target.model, (h, w), resolution=r)
            x = torch.stack([batch.low_resolution[i] for i in positions])
            result = self.craft(
                target,
                wrapper,
                x,
                clean.select(index),
                batch.select(index),
                None if targets is None else targets[index],
            )
            with torch.no_grad():
                model_input = wrapper.to_model_input(result.adversarial)
            for j, i in enumerate(positions):
                adversarial[i] = result.adversarial[j]
            norms = result.norms(x)
            for key, value in (
                ("features", result.extra["features"]),
                ("logits", result.extra["logits"]),
                ("success", result.success),
                ("iterations", result.iterations),
                ("model_input", model_input),
                *norms.items(),
            ):
                parts.setdefault(key, []).append(value)
            order += positions
        back = torch.empty(n, dtype=torch.long)
        back[torch.tensor(order, dtype=torch.long)] = torch.arange(n)
        merged = {k: torch.cat(v)[back.to(v[0].device)] for k, v in parts.items()}
        return Crafted(
            adversarial=[a for a in adversarial if a is not None],
            clean=list(batch.low_resolution),
            model_input=merged["model_input"],
            features=merged["features"],
            logits=merged["logits"],
            success=merged["success"],
            iterations=merged["iterations"],
            norms={k: merged[k] for k in ("l0", "l2", "linf")},
        )

    def attack_target(self, clean: TargetOutput, batch: FaceBatch) -> None:
        """Craft, keep the images of, score and write the rows of ``batch`` on
        ``clean.target``."""
        mark("craft")
        start = time.perf_counter()
        target = clean.target
        targets = self.draw_for(target, batch)
        if self.space == "model_input":
            result = self.craft(target, target.model, batch.images, clean, batch, targets)
            crafted = Crafted(
                adversarial=result.adversarial,
                clean=batch.images,
                model_input=result.adversarial,
                features=result.extra["features"],
                logits=result.extra["logits"],
                success=result.success,
                iterations=result.iterations,
                norms=result.norms(batch.images),
            )
        else:
            crafted = self.craft_low_resolution(clean, batch, targets)
        seconds = (time.perf_counter() - start) / len(batch)
        if self.adversarials is not None:  # before the rows: a stored row has its image
            keys = [
                (target.label, self.name, int(s), int(r))
                for s, r in zip(batch.sample_id.tolist(), batch.resolution.tolist(), strict=True)
            ]
            self.adversarials.write(
                keys, crafted.adversarial, space=self.space, clean=crafted.clean
            )
        norms = crafted.norms
        rows = target.rows(
            batch,
            self.name,
            crafted.features,
            target.predict(crafted.logits),
            params=params_json(self.params),
            success=crafted.success.cpu(),
            target=targets.tolist() if targets is not None else [None] * len(batch),
            l0=norms["l0"].float().cpu(),
            l2=norms["l2"].cpu(),
            linf=norms["linf"].cpu(),
            iterations=crafted.iterations.cpu(),
            clean_top1=clean.top1.cpu(),
            seconds=seconds,
            space=self.space,
            target_score=template_scores(target, crafted.features, targets),
            clean_target_score=template_scores(target, clean.features, targets),
        )
        self.writer.write(rows)
        self.keep_examples(target.label, batch.images, crafted.model_input)

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
class Crafted:
    """One attacked batch: ``adversarial`` and ``clean`` in the attack's space (a tensor, or
    per-sample tensors of possibly different sizes), ``model_input`` the adversarial as the
    model sees it, the model's outputs on it, and per-sample success, iterations and norms
    (measured in the attack's space)."""

    adversarial: torch.Tensor | list[torch.Tensor]
    clean: torch.Tensor | list[torch.Tensor]
    model_input: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor
    success: torch.Tensor
    iterations: torch.Tensor
    norms: dict[str, torch.Tensor]


def template_scores(
    target: ClassifierTarget, features: torch.Tensor, identities: torch.Tensor | None
) -> torch.Tensor:
    """Score ([B] float64, CPU) of each feature against the closed-set template of its
    identity in ``identities``, with the target's similarity (the scores ``search`` ranks);
    NaN for no identity (``identities`` None) or one without a template."""
    n = features.shape[0]
    if identities is None:
        return torch.full((n,), float("nan"), dtype=torch.float64)
    return scores_against(target.gallery, features, identities, metric=target.similarity)


def scores_against(
    gallery: Gallery, features: torch.Tensor, identities: torch.Tensor, *, metric: str
) -> torch.Tensor:
    """``features[i]`` against the first template of ``identities[i]`` ([B] float64, CPU; NaN
    where the identity has no template), from the same similarity matrix ``search`` ranks."""
    ids = gallery.ids.to(identities.device)
    match = ids.unsqueeze(0) == identities.unsqueeze(1)  # [B, N]
    found = match.any(1)
    if features.shape[0] == 0:
        return torch.empty(0, dtype=torch.float64)
    scores = similarity(
        features.float(), gallery.features.to(features.device).float(), metric=metric
    )
    column = match.float().argmax(1).to(scores.device)
    picked = scores.gather(1, column.unsqueeze(1)).squeeze(1).detach().cpu().to(torch.float64)
    return torch.where(found.cpu(), picked, torch.full_like(picked, float("nan")))


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
