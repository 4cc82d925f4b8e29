"""A tiny seeded face model for tests, smoke runs and examples (seconds on a CPU).

Same contract as the real models: float RGB [0, 1] in, normalisation inside, ``features``
and (with ``num_classes > 0``) logits. Its initialisation is seeded without touching the
global RNG, so two builds with the same seed are identical in any process.
"""

from __future__ import annotations

import torch
from torch import nn

from crossres.models.base import FaceModel, PretrainedConfig
from crossres.models.registry import register_model


class TinyFaceNet(FaceModel):
    def __init__(
        self, *, input_size: int = 64, feature_dim: int = 32, num_classes: int = 0, seed: int = 0
    ) -> None:
        cfg = PretrainedConfig(
            input_size=(3, input_size, input_size),
            resize_shortest=None,
            mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25),
            feature_dim=feature_dim,
            num_classes=num_classes,
            feature_layer="pool",
        )
        super().__init__(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.body = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1),
                nn.BatchNorm2d(32),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(32, feature_dim),
            )
            self.fc = nn.Linear(feature_dim, num_classes) if num_classes > 0 else None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        if self.fc is None:
            return super().classify(features)
        return self.fc(features)


@register_model("tiny_facenet")
def tiny_facenet(weights: str | None = None, **options) -> TinyFaceNet:
    model = TinyFaceNet(**options)
    if weights is not None:
        from crossres.models.weights import load_weights

        load_weights(model, weights)
    return model
