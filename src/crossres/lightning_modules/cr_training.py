"""Cross-resolution (CR) training: ``crossres fit`` turns any face model into its CR variant.

The recipe is Massoli, Amato, Falchi (2020), "Cross-resolution learning for face recognition"
(the CR model the adversarial-attacks paper compares with its Base model): a *student* starts
from the *teacher*'s weights; the teacher is frozen; every training batch is degraded to one
random resolution ``r = 2**int(3 + 5u)``, u ~ U(0, 1) (8, 16, 32, 64 or 128 px, each with
probability 1/5), and the loss is

    cross-entropy(student logits of the low-resolution image, label)
        + lambda * MSE(student feature of the low-resolution image,
                       teacher feature of the full-resolution image),     lambda = 0.1,

optimised with SGD (lr 1e-3, momentum 0.9, weight decay 5e-4; batch 32 with 8 accumulated
batches in ``configs/paper/cr_training.yaml``). Embedders without a classifier (dlib's) use the
label-free variant: the MSE term alone.

Validation: the datamodule's queries at each of its resolutions against gallery templates at
full resolution, rank-1 hit rate logged as ``val/hit_rate_r{res}``. Templates come from the
student by default (``templates="student"``: the paper evaluates a model with its own features,
so the CR model's templates are its own), or from the frozen teacher (``"teacher"``: how well
low-resolution student features land on the Base model's gallery).

Checkpoints hold the student alone (``student.*``; the teacher is rebuilt from ``model`` and
``weights`` and restored on load), so ``build_model(name, weights="last.ckpt")`` gives the
student and ``crossres test`` uses a checkpoint unchanged. ``StudentExport`` (``cr_export``) also
writes the student as a plain state dict at the end of ``fit`` (with its sha256 beside it).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from crossres.lightning_modules.cr_export import StudentExport  # noqa: F401  (configs name it here)
from crossres.lightning_modules.cr_resolution import (
    ResolutionReference,
    ResolutionSampling,
    degrade_batch,
    input_resolution,
    sample_training_resolution,
)
from crossres.metrics.classes import HitRate
from crossres.metrics.functional import ProbeSummary
from crossres.metrics.scoring import search
from crossres.models import FaceModel, PretrainedConfig, build_model
from crossres.models.templates import compute_templates
from crossres.phases import mark
from crossres.types import FaceBatch, Gallery

__all__ = ["CrossResolutionDistillation", "StudentExport"]

TemplateSource = Literal["student", "teacher"]
STUDENT_PREFIX = "student."
TEACHER_PREFIX = "teacher."


class CrossResolutionDistillation(pl.LightningModule):
    """CR fine-tuning of registry model ``model`` (with ``weights`` and ``options``, as in
    ``build_model``): see the module docstring.

    feature_weight: lambda of the MSE term (0.1 in the paper).
    label_free: True: the MSE term alone (no labels needed); False: cross-entropy + lambda MSE
        (the model's classes must be the datamodule's identities); None: label-free exactly
        when the model has no classifier.
    exponents: training resolutions ``2**int(lo + (hi - lo) u)``; (3, 8): 8 to 128 px.
    resolution_sampling: "paper" (the above) or "log_uniform" (``int(2**(lo + (hi - lo) u))``,
        every size in between); see ``sample_training_resolution``.
    resolution_reference: what a resolution measures, "source" (default, the benchmark's) or
        "input" (the tensor); see ``input_resolution``.
    lr, momentum, weight_decay: SGD's (the paper's values by default).
    freeze_batchnorm: keep the student's BatchNorm statistics fixed (eval mode) while training.
    templates: gallery templates for validation from the "student" (default) or the "teacher".
    similarity, gallery_normalize: how validation scores queries against templates.
    seed: keys the resolution draws (with epoch and batch index).
    """

    def __init__(
        self,
        model: str = "senet50_vggface2",
        weights: str | None = None,
        *,
        options: dict[str, Any] | None = None,
        feature_weight: float = 0.1,
        label_free: bool | None = None,
        exponents: tuple[int, int] = (3, 8),
        resolution_sampling: ResolutionSampling = "paper",
        resolution_reference: ResolutionReference = "source",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        freeze_batchnorm: bool = False,
        templates: TemplateSource = "student",
        similarity: Literal["cosine", "neg_euclidean"] = "cosine",
        gallery_normalize: Literal["none", "before", "after", "both"] = "none",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if feature_weight < 0:
            raise ValueError(f"feature_weight must be >= 0, got {feature_weight}")
        if lr <= 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"need lr > 0, momentum >= 0, weight_decay >= 0; got {lr}, {momentum}, {weight_decay}"
            )
        if templates not in ("student", "teacher"):
            raise ValueError(f"templates must be 'student' or 'teacher', got {templates!r}")
        if similarity not in ("cosine", "neg_euclidean"):
            raise ValueError(f"similarity must be 'cosine' or 'neg_euclidean', got {similarity!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        # validates the exponents and the sampling
        sample_training_resolution(seed, 0, exponents=exponents, sampling=resolution_sampling)
        input_resolution(8, PretrainedConfig(), reference=resolution_reference)
        self.save_hyperparameters()

        teacher = build_model(model, weights=weights, **dict(options or {}))
        if not isinstance(teacher, FaceModel):
            raise TypeError(
                f"build_model({model!r}) gave a {type(teacher).__name__}, not a FaceModel"
            )
        student = copy.deepcopy(teacher)
        # The student's weights no longer come from the teacher's file: clear the hash so that
        # caches keyed by it (templates, manifests) never take the student for the teacher.
        cfg = teacher.pretrained_cfg
        student.pretrained_cfg = replace(
            cfg,
            weights_hash="",
            extra={**cfg.extra, "cr_initialised_from": cfg.weights_hash or "random"},
        )
        self.teacher = teacher.requires_grad_(False).eval()
        self.student = student.requires_grad_(True)

        self.label_free = (teacher.num_classes == 0) if label_free is None else bool(label_free)
        if not self.label_free and teacher.num_classes == 0:
            raise ValueError(
                f"model {model!r} has no classifier (num_classes 0): cross-entropy needs logits; "
                "use label_free: true (the MSE term alone)"
            )
        if self.label_free and teacher.num_classes > 0:
            # the classifier takes no part in the MSE term: freeze it, so that weight decay
            # leaves it as it was and DDP finds no parameter without a gradient
            for p in _unused_by_features(self.student):
                p.requires_grad_(False)
        self.feature_weight = float(feature_weight)
        self.exponents = (int(exponents[0]), int(exponents[1]))
        self.resolution_sampling: ResolutionSampling = resolution_sampling
        self.resolution_reference = resolution_reference
        self.templates = templates
        self.similarity = similarity
        self.gallery_normalize = gallery_normalize
        self.seed = int(seed)
        self.hit_rates = nn.ModuleDict()  # "r16" -> HitRate, made in setup from the datamodule
        self._gallery: Gallery | None = None
        self._teacher_gallery: Gallery | None = None
        self.sampled: list[tuple[int, int, int]] = []  # (epoch, batch index, resolution) drawn

    # ------------------------------------------------------------------ set-up
    def input_config(self) -> PretrainedConfig:
        """The preprocessing the data must follow (the teacher's; the student's is the same)."""
        return self.teacher.pretrained_cfg

    def train(self, mode: bool = True) -> CrossResolutionDistillation:
        super().train(mode)
        self.teacher.eval()  # frozen: BatchNorm statistics and dropout never in training mode
        if mode and self.hparams.freeze_batchnorm:
            for m in self.student.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def on_train_start(self) -> None:
        # Lightning keeps the modes modules come in with (build_model may return eval-mode
        # models): the student trains, the teacher stays frozen (see ``train``)
        self.train()

    def on_train_epoch_start(self) -> None:
        mark("cr-epoch")  # where a chaos test (or a pre-emption) finds the training

    def setup(self, stage: str) -> None:
        dm = self._datamodule()
        if dm is None:
            return
        if not self.label_free:
            n = getattr(dm, "num_classes", None)
            if n is not None and n > self.teacher.num_classes:
                raise ValueError(
                    f"the datamodule has {n} identities but {self.hparams.model!r} classifies "
                    f"{self.teacher.num_classes}: the identity index must be the model's class "
                    "index for the cross-entropy term; use label_free: true otherwise"
                )
        for r in getattr(dm, "resolutions", []):
            key = f"r{int(r)}"
            if key not in self.hit_rates:
                self.hit_rates[key] = HitRate(rank=1)

    def _datamodule(self):
        trainer = self._trainer
        return None if trainer is None else trainer.datamodule

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.student.parameters() if p.requires_grad]
        return torch.optim.SGD(
            params,
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay,
        )

    # ------------------------------------------------------------------ training
    def training_resolution(self, batch_idx: int, epoch: int | None = None) -> int:
        """The (source) resolution of batch ``batch_idx`` of ``epoch`` (default: the current)."""
        epoch = self.current_epoch if epoch is None else epoch
        return sample_training_resolution(
            self.seed,
            epoch,
            batch_idx,
            exponents=self.exponents,
            sampling=self.resolution_sampling,
        )

    def low_resolution(self, images: torch.Tensor, resolution: int) -> torch.Tensor:
        r = input_resolution(resolution, self.input_config(), reference=self.resolution_reference)
        return degrade_batch(images, r)

    def distillation_loss(
        self, images: torch.Tensor, identity: torch.Tensor | None, resolution: int
    ) -> dict[str, torch.Tensor]:
        """Loss terms of one batch at one resolution: ``loss`` (what is minimised), ``mse`` and,
        unless label-free, ``ce``."""
        with torch.no_grad():
            target = self.teacher.features(images)
        low = self.low_resolution(images, resolution)
        if self.label_free:
            feats = self.student.features(low)
            mse = F.mse_loss(feats, target)
            return {"loss": mse, "mse": mse.detach()}
        if identity is None:
            raise ValueError("the cross-entropy term needs identities (or use label_free)")
        feats, logits = self.student.features_and_logits(low)
        if int(identity.max()) >= logits.shape[1] or int(identity.min()) < 0:
            raise ValueError(
                f"identity index {int(identity.max())} outside the model's {logits.shape[1]} classes"
            )
        mse = F.mse_loss(feats, target)
        ce = F.cross_entropy(logits, identity)
        return {"loss": ce + self.feature_weight * mse, "ce": ce.detach(), "mse": mse.detach()}

    def training_step(self, batch: FaceBatch, batch_idx: int) -> torch.Tensor | None:
        if len(batch) == 0:  # every image of the batch was unreadable (skip_corrupt)
            return None
        r = self.training_resolution(batch_idx)
        self.sampled.append((int(self.current_epoch), int(batch_idx), r))
        terms = self.distillation_loss(batch.images, batch.identity, r)
        n = len(batch)
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=n)
        self.log("train/mse", terms["mse"], batch_size=n)
        if "ce" in terms:
            self.log("train/ce", terms["ce"], batch_size=n)
        self.log("train/resolution", float(r), batch_size=n)
        return terms["loss"]

    # ------------------------------------------------------------------ validation
    def gallery_templates(self) -> Gallery:
        """Templates of the datamodule's gallery at full resolution, from the student or the
        teacher (computed once: the teacher never changes)."""
        dm = self._datamodule()
        if dm is None or not hasattr(dm, "gallery_dataloader"):
            raise ValueError(
                "validation needs a datamodule with gallery_dataloader() and num_classes "
                "(a MultiResolutionDataModule or CrossResolutionDataModule)"
            )
        if self.templates == "teacher" and self._teacher_gallery is not None:
            return self._teacher_gallery
        model = self.teacher if self.templates == "teacher" else self.student
        gallery = compute_templates(
            model,
            dm.gallery_dataloader(),
            num_classes=dm.num_classes,
            normalize=self.gallery_normalize,
            cache=False,  # the student changes at every step
        ).to(self.device)
        if self.templates == "teacher":
            self._teacher_gallery = gallery
        return gallery

    def on_validation_epoch_start(self) -> None:
        self._gallery = self.gallery_templates()
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        nan = torch.zeros(0, dtype=torch.float32, device=self.device)
        for metric in self.hit_rates.values():
            metric.reset()
            # an empty typed record on every process, so that gathering never meets an
            # untyped empty state (a process may see no query at some resolution)
            metric.update(ProbeSummary(empty, nan, nan), sample_id=empty)

    def validation_step(self, batch: FaceBatch, batch_idx: int) -> None:
        if len(batch) == 0:
            return
        assert self._gallery is not None
        feats = self.student.features(batch.images)
        res = search(
            feats.float(),
            self._gallery.features.float(),
            self._gallery.ids,
            batch.identity,
            k=1,
            metric=self.similarity,
        )
        s = res.summary
        for r in torch.unique(batch.resolution).tolist():
            key = f"r{int(r)}"
            if key not in self.hit_rates:
                raise ValueError(
                    f"validation batch at resolution {r}, but the datamodule declared "
                    f"{sorted(self.hit_rates)}"
                )
            keep = (batch.resolution == r) & s.mated  # close set: queries with a template
            self.hit_rates[key].update(
                ProbeSummary(s.mate_rank[keep], s.mate_score[keep], s.top_score[keep]),
                sample_id=batch.sample_id[keep],
            )

    def on_validation_epoch_end(self) -> None:
        for key, metric in self.hit_rates.items():
            local = (
                sum(int(t.numel()) for t in metric.mate_rank)
                if isinstance(metric.mate_rank, list)
                else int(metric.mate_rank.numel())
            )
            total = self.trainer.strategy.reduce(
                torch.tensor(float(local), device=self.device), reduce_op="sum"
            )
            if float(total) == 0:
                continue  # no query with a template at this resolution
            value = metric.compute()  # gathered across processes, duplicates dropped
            self.log(f"val/hit_rate_{key}", value.float(), sync_dist=False)
            metric.reset()
        self._gallery = None

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The student alone: the teacher is rebuilt from (model, weights) and never changes.
        state = checkpoint.get("state_dict", {})
        for k in [k for k in state if k.startswith(TEACHER_PREFIX)]:
            del state[k]
        checkpoint["crossres"] = {
            "model": self.hparams.model,
            "options": dict(self.hparams.options or {}),
            "teacher_weights_hash": self.teacher.pretrained_cfg.weights_hash,
            "student_prefix": STUDENT_PREFIX,
            "load_with": f"build_model({self.hparams.model!r}, weights=<this file>)",
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            for k, v in self.teacher.state_dict().items():
                state.setdefault(TEACHER_PREFIX + k, v)


def _unused_by_features(model: FaceModel) -> list[nn.Parameter]:
    """Parameters that ``model.features`` does not depend on (the classifier), found with one
    forward and backward pass of a blank image at the model's input size."""
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = torch.full((1, *model.pretrained_cfg.input_size), 0.5)
            grads = torch.autograd.grad(model.features(x).sum(), params, allow_unused=True)
    finally:
        model.train(was_training)
    return [p for p, g in zip(params, grads, strict=True) if g is None]
