"""The contract every face model in crossres follows.

A model takes float RGB images in [0, 1], shape [B, 3, H, W], and does its own normalisation
(colour order, scale, mean) inside. It exposes ``features(x) -> [B, D]`` (the deep feature used
for identification) and ``forward(x) -> logits [B, C]``. Its preprocessing config travels with
it in ``pretrained_cfg``, as in timm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class PretrainedConfig:
    """How images must be prepared for a model, and what its weights are.

    input_size: (C, H, W) the network expects.
    resize_shortest: shortest side the image is resized to before the centre crop
        (None: resize straight to ``input_size``).
    channel_order: "RGB" or "BGR", the order the network's first conv expects.
    scale: multiply [0, 1] pixels by this before subtracting ``mean`` (255 for Caffe models).
    mean, std: per channel, in ``channel_order`` and on the ``scale``d range.
    feature_dim: length of ``features(x)``.
    num_classes: length of ``forward(x)`` (0 for a pure embedder without a classifier).
    feature_layer: name of the layer whose output ``features`` returns.
    weights_hash: sha256 of the weight file that was loaded ("" when none).
    """

    input_size: tuple[int, int, int] = (3, 224, 224)
    resize_shortest: int | None = 256
    channel_order: str = "RGB"
    scale: float = 1.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    feature_dim: int = 0
    num_classes: int = 0
    feature_layer: str = ""
    weights_hash: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Normalize(nn.Module):
    """[0, 1] RGB -> the network's own input convention (colour order, scale, mean, std)."""

    def __init__(self, cfg: PretrainedConfig) -> None:
        super().__init__()
        if cfg.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {cfg.channel_order!r}")
        self.bgr = cfg.channel_order == "BGR"
        self.scale = float(cfg.scale)
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected float RGB images [B, 3, H, W], got shape {tuple(x.shape)}")
        if self.bgr:
            x = x.flip(1)
        return (x * self.scale - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class FaceModel(nn.Module):
    """Base class: subclasses implement ``embed`` (normalised input -> feature) and may
    implement ``classify`` (feature -> logits)."""

    pretrained_cfg: PretrainedConfig

    def __init__(self, cfg: PretrainedConfig) -> None:
        super().__init__()
        self.pretrained_cfg = cfg
        self.normalize = Normalize(cfg)

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement embed()")

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        raise TypeError(
            f"{type(self).__name__} has no classifier; wrap it in GalleryClassifier "
            "(logits from scaled cosine similarity to gallery templates)"
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass for both (the attacks and the test step need both)."""
        f = self.features(x)
        return f, self.classify(f)

    @property
    def num_classes(self) -> int:
        return self.pretrained_cfg.num_classes


class GalleryClassifier(FaceModel):
    """Gives an embedder logits: ``scale * cos(feature, template_i)`` for each gallery template.

    Logit i belongs to the gallery's i-th template; ``ids`` maps that position to an identity,
    so classification attacks (JSMA, CW, EAD) apply to pure embedders too.
    """

    def __init__(self, embedder: FaceModel, templates: torch.Tensor, *, scale: float = 30.0):
        cfg = embedder.pretrained_cfg
        super().__init__(
            PretrainedConfig(**{**cfg.to_dict(), "num_classes": int(templates.shape[0])})
        )
        self.normalize = embedder.normalize
        self.embedder = embedder
        self.logit_scale = float(scale)
        t = nn.functional.normalize(templates.detach().float(), dim=1)
        self.register_buffer("templates", t)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedder.embed(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        f = nn.functional.normalize(features, dim=1)
        return self.logit_scale * f @ self.templates.to(f.dtype).T
