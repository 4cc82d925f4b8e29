"""The frozen target of a benchmark run: one or more face models with their galleries.

The module and the callbacks of the test loop talk through two typed records, and a
callback reads nothing else of the module:

- ``ClassifierTarget`` (one per target, built in ``setup``): the classifier under attack,
  its closed- and open-set galleries, the identity of each logit, and what every callback
  computes the same way: identities to logit indices, the logit an untargeted attack moves
  away from, features to search results and result rows.
- ``TargetOutput`` (one per target and batch): what ``test_step`` returns, as
  ``TestStepOutput`` = label -> ``TargetOutput``: the target and its clean features, logits,
  top-1 identity and the attack labels of the batch.

The module writes nothing itself: the result store callback turns the clean outputs into
rows, and the attack callbacks their adversarial ones, through the store callback's writer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import pytorch_lightning as pl
import torch
from torch import nn

from crossres.errors import ConfigValueError
from crossres.metrics.scoring import search
from crossres.models.base import FaceModel, GalleryClassifier
from crossres.models.heads import train_head
from crossres.models.registry import build_model
from crossres.models.templates import compute_templates
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
    """One target as the attacks and scorers see it (built in ``FrozenTarget.setup``)."""

    label: str
    model: FaceModel  # features(x) and forward(x) -> logits over ``class_ids``
    gallery: Gallery  # closed set: one template per enrolled identity
    open_gallery: Gallery  # open set: without the non-mated identities
    class_ids: torch.Tensor  # identity of each logit
    similarity: Similarity = "cosine"

    def to(self, device: torch.device | str) -> ClassifierTarget:
        """This target on ``device`` (the model moves in place, as ``nn.Module.to`` does)."""
        self.model.to(device)
        return replace(
            self,
            gallery=self.gallery.to(device),
            open_gallery=self.open_gallery.to(device),
            class_ids=self.class_ids.to(device),
        )

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Identity of the top-1 logit of each sample."""
        return self.class_ids[logits.argmax(1)]

    def class_index(self, identities: torch.Tensor) -> torch.Tensor:
        """Logit index of each identity (-1 where the model has no class for it)."""
        ids = self.class_ids.to(identities.device)
        match = ids.unsqueeze(0) == identities.unsqueeze(1)
        return torch.where(match.any(1), match.float().argmax(1), torch.full_like(identities, -1))

    def attack_labels(self, identities: torch.Tensor, clean_top1: torch.Tensor) -> torch.Tensor:
        """Logit index an untargeted attack moves away from: the identity's class, or, for a
        query enrolled nowhere (a non-mated query of the embedded data), its clean top-1."""
        labels = self.class_index(identities)
        clean_class = self.class_index(clean_top1.to(identities.device))
        return torch.where(labels < 0, clean_class, labels)

    def search(self, features: torch.Tensor, identities: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample closed- and open-set search results (``ProbeSummary``: mate rank with
        ties against the probe, NIST IR 8271), plus the best non-mate score."""
        out = {}
        for prefix, gallery in (("", self.gallery), ("open_", self.open_gallery)):
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

    def rows(
        self,
        batch: FaceBatch,
        attack: str,
        features: torch.Tensor,
        top1: torch.Tensor,
        **per_sample,
    ) -> list[ResultRow]:
        """Result rows of a batch scored by ``features``; ``per_sample`` holds tensors or lists
        of length B (or scalars). ``top1`` is the prediction on the scored images: clean or
        adversarial by ``attack``."""
        sc = self.search(features, batch.identity)
        per_sample["clean_top1" if attack == CLEAN else "adv_top1"] = top1
        rows = []
        for i in range(len(batch)):
            extra = {k: _item(v, i) for k, v in per_sample.items()}
            rows.append(
                ResultRow(
                    model=self.label,
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


@dataclass
class TargetOutput:
    """What ``FrozenTarget.test_step`` returns for one target and one batch (clean images)."""

    target: ClassifierTarget
    features: torch.Tensor  # [B, D]
    logits: torch.Tensor  # [B, C]
    top1: torch.Tensor  # [B] identity predicted on the clean image
    attack_labels: torch.Tensor  # [B] logit index an untargeted attack moves away from
    drift: torch.Tensor | None = None  # [B] ||f(x_r) - f(x_original)||, when measured

    def select(self, index: torch.Tensor) -> TargetOutput:
        """The samples at ``index`` (a long tensor of batch positions)."""
        i = index.to(self.top1.device)
        return replace(
            self,
            features=self.features[i],
            logits=self.logits[i],
            top1=self.top1[i],
            attack_labels=self.attack_labels[i],
            drift=None if self.drift is None else self.drift[i],
        )

    def clean_rows(self, batch: FaceBatch) -> list[ResultRow]:
        """The rows that score the unattacked ``batch`` (the one this output was made from)."""
        extra = {} if self.drift is None else {"feature_drift": self.drift}
        return self.target.rows(batch, CLEAN, self.features, self.top1, **extra)


TestStepOutput = dict[str, TargetOutput]  # target label -> its output, in target order


class FrozenTarget(pl.LightningModule):
    def __init__(
        self,
        targets: list[TargetSpec] | None = None,
        *,
        similarity: Similarity = "cosine",
        gallery_normalize: Literal["none", "before", "after", "both"] = "none",
        logit_scale: float = 30.0,
        classifier: Literal["head", "gallery"] = "head",
        feature_drift: bool = True,
    ) -> None:
        """``feature_drift``: also score each clean query's features against the same face's
        at the original resolution (one more forward per clean batch; the report's drift
        table, the CR claim in the model's own space)."""
        super().__init__()
        targets = targets or [TargetSpec()]
        labels = [t.label for t in targets]
        if len(set(labels)) != len(labels):
            raise ValueError(f"target labels must be unique, got {labels}")
        if classifier not in ("head", "gallery"):
            raise ConfigValueError(f"classifier must be 'head' or 'gallery', got {classifier!r}")
        if similarity not in ("cosine", "neg_euclidean"):
            raise ValueError(f"similarity must be 'cosine' or 'neg_euclidean', got {similarity!r}")
        self.save_hyperparameters()
        self.specs = list(targets)
        self.similarity = similarity
        self.gallery_normalize = gallery_normalize
        self.logit_scale = logit_scale
        self.classifier = classifier
        self.feature_drift = bool(feature_drift)
        # built eagerly so that missing weights fail before any data is read
        self.models = nn.ModuleDict(
            {s.label: build_model(s.name, weights=s.weights, **s.options) for s in self.specs}
        )
        for m in self.models.values():
            m.requires_grad_(False).eval()
        self.targets: dict[str, ClassifierTarget] = {}
        self.classifier_kinds: dict[str, dict] = {}  # per label, recorded in run.json

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

    def weight_record(self) -> dict[str, dict]:
        """Per target label: registry name, weight file and the sha256 of its content (what
        ``run.json`` records, so a rerun with other weights under the same path is refused)."""
        return {
            s.label: {
                "name": s.name,
                "weights": s.weights,
                "sha256": self.models[s.label].pretrained_cfg.weights_hash,
            }
            for s in self.specs
        }

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if self.feature_drift and hasattr(dm, "hand_out_references"):
            dm.hand_out_references()
        if not self.targets:
            self.build_targets(dm)

    def build_targets(self, dm) -> None:
        """Gallery templates (cached by weights and manifest hash) and classifiers per target."""
        if dm is None or not hasattr(dm, "gallery_dataloader"):
            raise ValueError("FrozenTarget needs a datamodule with gallery_dataloader()")
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
            if model.num_classes > 0:  # the model's own softmax classifier (the paper's Base)
                classifier, class_ids = model, torch.arange(model.num_classes)
                self.classifier_kinds[label] = {"kind": "model's own classifier"}
            elif self.classifier == "head":
                # an embedder gets a softmax head fitted on the gallery photos (never a query),
                # as the paper's Base fc: classification attacks then attack a classifier, not
                # the identification system itself
                classifier = train_head(
                    model, dm.gallery_dataloader(), query_ids=dm.query_table.sample_id
                )
                class_ids = classifier.class_ids.clone()
                self.classifier_kinds[label] = {
                    "kind": "softmax head",
                    "training": _plain(getattr(classifier, "record", {})),
                }
            else:
                classifier = GalleryClassifier(model, gallery.features, scale=self.logit_scale)
                class_ids = gallery.ids.clone()
                self.classifier_kinds[label] = {"kind": "GalleryClassifier"}
            self.targets[label] = ClassifierTarget(
                label, classifier, gallery, open_gallery, class_ids, self.similarity
            )

    def on_test_start(self) -> None:
        self.targets = {label: t.to(self.device) for label, t in self.targets.items()}

    # ---------------------------------------------------------------- test loop
    def test_step(self, batch: FaceBatch, batch_idx: int) -> TestStepOutput:
        outputs: TestStepOutput = {}
        for label, t in self.targets.items():
            drift = None
            with torch.no_grad():
                features, logits = t.model.features_and_logits(batch.images)
                if batch.reference is not None:
                    drift = (features - t.model.features(batch.reference)).norm(dim=1)
            top1 = t.predict(logits)
            outputs[label] = TargetOutput(
                target=t,
                features=features,
                logits=logits,
                top1=top1,
                attack_labels=t.attack_labels(batch.identity, top1),
                drift=drift,
            )
        return outputs


def _item(value, i: int):
    """The i-th sample's value of a per-sample tensor or list; a scalar is every sample's."""
    if isinstance(value, torch.Tensor):
        return value[i].item()
    return value[i] if isinstance(value, list) else value


def _plain(record) -> dict:
    """A head's training record as JSON-friendly values (for run.json)."""
    items = record.items() if isinstance(record, dict) else vars(record).items()
    return {k: v if isinstance(v, int | float | str | bool | None) else str(v) for k, v in items}
