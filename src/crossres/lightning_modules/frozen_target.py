"""The frozen target of a benchmark run: one or more face models with their galleries.

``test_step`` scores the clean queries (predictions, features, rank and score of the mate in
the closed-set gallery, open-set scores) and hands them to the attack callbacks through its
output; every per-sample outcome is recorded through ``record`` into the result store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytorch_lightning as pl
import torch
from torch import nn

from crossres.metrics.scoring import search
from crossres.models.base import FaceModel, GalleryClassifier
from crossres.models.registry import build_model
from crossres.store import CLEAN, ResultRow
from crossres.types import FaceBatch, Gallery

Similarity = Literal["cosine", "neg_euclidean"]


@dataclass
class TargetSpec:
    """A model under attack: registry ``name``, ``weights`` file (None: the model's default),
    and the ``label`` tables use for it (e.g. "Base", "CR")."""

    name: str = "dlib_resnet29"
    label: str = "base"
    weights: str | None = None
    options: dict = field(default_factory=dict)


@dataclass
class ClassifierTarget:
    """What the attacks and scorers need of one target, built in ``setup``."""

    model: FaceModel  # features(x) and forward(x) -> logits over ``class_ids``
    gallery: Gallery  # closed set: one template per enrolled identity
    open_gallery: Gallery  # open set: without the non-mated identities
    class_ids: torch.Tensor  # identity of each logit


class FrozenTarget(pl.LightningModule):
    def __init__(
        self,
        targets: list[TargetSpec] | None = None,
        *,
        similarity: Similarity = "cosine",
        gallery_normalize: Literal["none", "before", "after", "both"] = "none",
        logit_scale: float = 30.0,
    ) -> None:
        super().__init__()
        targets = targets or [TargetSpec()]
        labels = [t.label for t in targets]
        if len(set(labels)) != len(labels):
            raise ValueError(f"target labels must be unique, got {labels}")
        if similarity not in ("cosine", "neg_euclidean"):
            raise ValueError(f"similarity must be 'cosine' or 'neg_euclidean', got {similarity!r}")
        self.save_hyperparameters()
        self.specs = list(targets)
        self.similarity = similarity
        self.gallery_normalize = gallery_normalize
        self.logit_scale = logit_scale
        # built eagerly so that missing weights fail before any data is read
        self.models = nn.ModuleDict(
            {s.label: build_model(s.name, weights=s.weights, **s.options) for s in self.specs}
        )
        for m in self.models.values():
            m.requires_grad_(False).eval()
        self.targets: dict[str, ClassifierTarget] = {}
        self.sink = None  # set by ResultStoreCallback: a callable taking a list of ResultRow
        self.done_keys: set[tuple] = set()
        self.examples: dict[tuple[str, str], tuple] = {}  # a few images per (model, attack)
        self.max_examples = 4

    # ---------------------------------------------------------------- set-up
    def input_config(self):
        """The preprocessing every target shares (the datamodule is built for it)."""
        cfgs = {
            (m.pretrained_cfg.input_size, m.pretrained_cfg.resize_shortest)
            for m in self.models.values()
        }
        if len(cfgs) != 1:
            raise ValueError(
                f"all targets of one run must share input size and resize, got {sorted(cfgs)}"
            )
        return next(iter(self.models.values())).pretrained_cfg

    def setup(self, stage: str) -> None:
        if not self.targets:
            self.build_targets(self.trainer.datamodule)

    def build_targets(self, dm) -> None:
        """Gallery templates (cached by weights and manifest hash) and classifiers per target."""
        if dm is None or not hasattr(dm, "gallery_dataloader"):
            raise ValueError("FrozenTarget needs a datamodule with gallery_dataloader()")
        from crossres.models.templates import compute_templates

        nonmated = set(int(i) for i in getattr(dm, "nonmated_identities", []))
        for label, model in self.models.items():
            model.to(self.device)
            gallery = compute_templates(
                model,
                dm.gallery_dataloader(),
                num_classes=dm.num_classes,
                normalize=self.gallery_normalize,
            )
            keep = torch.tensor([int(i) not in nonmated for i in gallery.ids], dtype=torch.bool)
            open_gallery = Gallery(gallery.features[keep], gallery.ids[keep])
            if model.num_classes > 0:
                classifier, class_ids = model, torch.arange(model.num_classes)
            else:
                classifier = GalleryClassifier(model, gallery.features, scale=self.logit_scale)
                class_ids = gallery.ids.clone()
            self.targets[label] = ClassifierTarget(classifier, gallery, open_gallery, class_ids)

    def on_test_start(self) -> None:
        for t in self.targets.values():
            t.model.to(self.device)
            t.gallery = t.gallery.to(self.device)
            t.open_gallery = t.open_gallery.to(self.device)
            t.class_ids = t.class_ids.to(self.device)

    # ---------------------------------------------------------------- scoring
    def class_index(self, label: str, identities: torch.Tensor) -> torch.Tensor:
        """Logit index of each identity (-1 where the model has no class for it)."""
        ids = self.targets[label].class_ids
        match = ids.unsqueeze(0) == identities.unsqueeze(1)
        return torch.where(match.any(1), match.float().argmax(1), torch.full_like(identities, -1))

    def attack_labels(
        self, label: str, identities: torch.Tensor, clean_top1: torch.Tensor
    ) -> torch.Tensor:
        """Logit index an untargeted attack moves away from: the identity's class, or, for a
        query enrolled nowhere (a non-mated query of the embedded data), its clean top-1."""
        labels = self.class_index(label, identities)
        clean_class = self.class_index(label, clean_top1.to(identities.device))
        return torch.where(labels < 0, clean_class, labels)

    def score_rows(self, label: str, features: torch.Tensor, identities: torch.Tensor) -> dict:
        """Per-sample closed- and open-set search results (``ProbeSummary``: mate rank with
        ties against the probe, NIST IR 8271), plus the best non-mate score."""
        t = self.targets[label]
        out = {}
        for prefix, gallery in (("", t.gallery), ("open_", t.open_gallery)):
            k = min(2, len(gallery))
            res = search(
                features.float(),
                gallery.features,
                gallery.ids,
                identities,
                k=k,
                metric=self.similarity,
            )
            first_is_mate = res.candidate_ids[:, 0] == identities
            runner_up = res.values[:, 1] if k > 1 else torch.full_like(res.values[:, 0], -torch.inf)
            out[prefix + "mate_rank"] = res.summary.mate_rank
            out[prefix + "mate_score"] = res.summary.mate_score
            out[prefix + "best_nonmate_score"] = torch.where(
                first_is_mate, runner_up, res.values[:, 0]
            )
            out[prefix + "top_score"] = res.summary.top_score
            out[prefix + "mated"] = res.summary.mated
        return out

    # ---------------------------------------------------------------- test loop
    def test_step(self, batch: FaceBatch, batch_idx: int) -> dict:
        outputs = {}
        for label, t in self.targets.items():
            with torch.no_grad():
                features, logits = t.model.features_and_logits(batch.images)
            top1 = t.class_ids[logits.argmax(1)]
            outputs[label] = {"features": features, "logits": logits, "top1": top1}
            rows = self.make_rows(label, CLEAN, batch, features, top1)
            self.record([r for r in rows if r.key not in self.done_keys])
        return outputs

    def make_rows(
        self,
        label: str,
        attack: str,
        batch: FaceBatch,
        features: torch.Tensor,
        top1: torch.Tensor,
        **per_sample,
    ) -> list[ResultRow]:
        """Rows for a batch; ``per_sample`` holds tensors or lists of length B (or scalars).
        ``top1`` is the prediction on the scored images: clean or adversarial by ``attack``."""
        sc = self.score_rows(label, features, batch.identity)
        per_sample["clean_top1" if attack == CLEAN else "adv_top1"] = top1
        rows = []
        for i in range(len(batch)):
            extra = {k: _item(v, i) for k, v in per_sample.items()}
            rows.append(
                ResultRow(
                    model=label,
                    attack=attack,
                    sample_id=int(batch.sample_id[i]),
                    resolution=int(batch.resolution[i]),
                    identity=int(batch.identity[i]),
                    mate_rank=int(sc["mate_rank"][i]),
                    mate_score=float(sc["mate_score"][i]),
                    best_nonmate_score=float(sc["best_nonmate_score"][i]),
                    open_mated=bool(sc["open_mated"][i]),
                    open_mate_rank=int(sc["open_mate_rank"][i]),
                    open_mate_score=float(sc["open_mate_score"][i]),
                    open_top_score=float(sc["open_top_score"][i]),
                    path=batch.paths[i] if batch.paths else "",
                    **extra,
                )
            )
        return rows

    def record(self, rows: list[ResultRow]) -> None:
        if self.sink is not None and rows:
            self.sink(rows)

    def log_adversarial(self, label: str, attack: str, batch: FaceBatch, adversarial) -> None:
        """Keep the first few clean/adversarial pairs of each (model, attack) for the report."""
        have = self.examples.get((label, attack))
        if have is not None and len(have[0]) >= self.max_examples:
            return
        n = self.max_examples - (0 if have is None else len(have[0]))
        clean, adv = batch.images[:n].detach().cpu(), adversarial[:n].detach().cpu()
        if have is not None:
            clean, adv = torch.cat([have[0], clean]), torch.cat([have[1], adv])
        self.examples[(label, attack)] = (clean, adv)


def _item(value, i: int):
    """The i-th sample's value of a per-sample tensor or list; a scalar is every sample's."""
    if isinstance(value, torch.Tensor):
        return value[i].item()
    return value[i] if isinstance(value, list) else value
