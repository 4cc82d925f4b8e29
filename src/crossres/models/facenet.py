"""FaceNet InceptionResnetV1 in facenet-pytorch's layout, so its released state dicts
(``20180402-114759-vggface2.pt``, ``20180408-102900-casia-webface.pt``) load by name as they
are. facenet-pytorch itself pins an old torch, so it is never imported: the layout is written
out here and a test compares it with facenet-pytorch's module.

Layout (facenet-pytorch ``models/inception_resnet_v1.py``): every ``BasicConv2d`` is a
bias-free conv (``conv``), BatchNorm with eps 1e-3 (``bn``) and ReLU; stem ``conv2d_1a``,
``conv2d_2a``, ``conv2d_2b``, ``maxpool_3a``, ``conv2d_3b``, ``conv2d_4a``, ``conv2d_4b``;
``repeat_1`` 5 x Block35 (scale 0.17), ``mixed_6a``, ``repeat_2`` 10 x Block17 (0.10),
``mixed_7a``, ``repeat_3`` 5 x Block8 (0.20), ``block8`` (scale 1, no ReLU); ``avgpool_1a``,
dropout, ``last_linear`` Linear(1792, 512, no bias), ``last_bn`` BatchNorm1d(512, eps 1e-3),
and ``logits`` Linear(512, classes) where the checkpoint has one (VGGFace2: 8631, CASIA-WebFace:
10575). Input: 160x160 RGB, ``(255 x - 127.5) / 128`` (facenet-pytorch's
``fixed_image_standardization``).

``features(x)`` is the L2-normalised ``last_bn`` output (facenet-pytorch's embedding); the
logits, as in facenet-pytorch, come from the ``last_bn`` output *before* normalisation, so
``forward`` and ``features_and_logits`` compute both from one pass and ``classify`` (which would
only see the normalised vector) refuses.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from crossres.models.base import FaceModel, PretrainedConfig
from crossres.models.registry import register_model

__all__ = [
    "FACENET_CLASSES",
    "FaceNetInceptionResnetV1",
    "InceptionResnetV1",
    "facenet_config",
]

#: Identities of the classifier each released checkpoint carries.
FACENET_CLASSES: dict[str, int] = {"vggface2": 8631, "casia": 10575}
EMBEDDING_DIM = 512
BN_EPS = 1e-3  # TensorFlow's value, kept by facenet-pytorch


def facenet_config(*, num_classes: int, weights_hash: str = "") -> PretrainedConfig:
    """facenet-pytorch's preprocessing: 160x160 RGB on 0-255, minus 127.5, over 128."""
    return PretrainedConfig(
        input_size=(3, 160, 160),
        resize_shortest=None,
        channel_order="RGB",
        scale=255.0,
        mean=(127.5, 127.5, 127.5),
        std=(128.0, 128.0, 128.0),
        feature_dim=EMBEDDING_DIM,
        num_classes=num_classes,
        feature_layer="last_bn (L2-normalised)",
        weights_hash=weights_hash,
    )


class BasicConv2d(nn.Module):
    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int | tuple[int, int],
        stride: int,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_planes, out_planes, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.bn = nn.BatchNorm2d(out_planes, eps=BN_EPS, momentum=0.1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class _Residual(nn.Module):
    """Shared tail of Block35/17/8: concatenate branches, biased 1x1 ``conv2d`` back to the
    input width, ``x + scale * that``, ReLU (unless ``relu`` is False)."""

    def _finish(self, x: torch.Tensor, branches: list[torch.Tensor]) -> torch.Tensor:
        out = self.conv2d(torch.cat(branches, 1)) * self.scale + x
        return self.relu(out) if self.use_relu else out


class Block35(_Residual):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.use_relu = True
        self.branch0 = BasicConv2d(256, 32, 1, 1)
        self.branch1 = nn.Sequential(BasicConv2d(256, 32, 1, 1), BasicConv2d(32, 32, 3, 1, 1))
        self.branch2 = nn.Sequential(
            BasicConv2d(256, 32, 1, 1), BasicConv2d(32, 32, 3, 1, 1), BasicConv2d(32, 32, 3, 1, 1)
        )
        self.conv2d = nn.Conv2d(96, 256, kernel_size=1, stride=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(x, [self.branch0(x), self.branch1(x), self.branch2(x)])


class Block17(_Residual):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.use_relu = True
        self.branch0 = BasicConv2d(896, 128, 1, 1)
        self.branch1 = nn.Sequential(
            BasicConv2d(896, 128, 1, 1),
            BasicConv2d(128, 128, (1, 7), 1, (0, 3)),
            BasicConv2d(128, 128, (7, 1), 1, (3, 0)),
        )
        self.conv2d = nn.Conv2d(256, 896, kernel_size=1, stride=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(x, [self.branch0(x), self.branch1(x)])


class Block8(_Residual):
    def __init__(self, scale: float = 1.0, *, relu: bool = True) -> None:
        super().__init__()
        self.scale = scale
        self.use_relu = relu
        self.branch0 = BasicConv2d(1792, 192, 1, 1)
        self.branch1 = nn.Sequential(
            BasicConv2d(1792, 192, 1, 1),
            BasicConv2d(192, 192, (1, 3), 1, (0, 1)),
            BasicConv2d(192, 192, (3, 1), 1, (1, 0)),
        )
        self.conv2d = nn.Conv2d(384, 1792, kernel_size=1, stride=1)
        if relu:
            self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(x, [self.branch0(x), self.branch1(x)])


class Mixed_6a(nn.Module):  # noqa: N801 - facenet-pytorch's name
    def __init__(self) -> None:
        super().__init__()
        self.branch0 = BasicConv2d(256, 384, 3, 2)
        self.branch1 = nn.Sequential(
            BasicConv2d(256, 192, 1, 1), BasicConv2d(192, 192, 3, 1, 1), BasicConv2d(192, 256, 3, 2)
        )
        self.branch2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x)], 1)


class Mixed_7a(nn.Module):  # noqa: N801 - facenet-pytorch's name
    def __init__(self) -> None:
        super().__init__()
        self.branch0 = nn.Sequential(BasicConv2d(896, 256, 1, 1), BasicConv2d(256, 384, 3, 2))
        self.branch1 = nn.Sequential(BasicConv2d(896, 256, 1, 1), BasicConv2d(256, 256, 3, 2))
        self.branch2 = nn.Sequential(
            BasicConv2d(896, 256, 1, 1), BasicConv2d(256, 256, 3, 1, 1), BasicConv2d(256, 256, 3, 2)
        )
        self.branch3 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], 1)


class InceptionResnetV1(nn.Module):
    """The bare network: ``forward`` gives the un-normalised 512-d ``last_bn`` output; ``logits``
    (present when ``num_classes`` > 0) maps it to class scores."""

    def __init__(self, num_classes: int = 0, *, dropout_prob: float = 0.6) -> None:
        super().__init__()
        self.conv2d_1a = BasicConv2d(3, 32, 3, 2)
        self.conv2d_2a = BasicConv2d(32, 32, 3, 1)
        self.conv2d_2b = BasicConv2d(32, 64, 3, 1, 1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = BasicConv2d(64, 80, 1, 1)
        self.conv2d_4a = BasicConv2d(80, 192, 3, 1)
        self.conv2d_4b = BasicConv2d(192, 256, 3, 2)
        self.repeat_1 = nn.Sequential(*[Block35(0.17) for _ in range(5)])
        self.mixed_6a = Mixed_6a()
        self.repeat_2 = nn.Sequential(*[Block17(0.10) for _ in range(10)])
        self.mixed_7a = Mixed_7a()
        self.repeat_3 = nn.Sequential(*[Block8(0.20) for _ in range(5)])
        self.block8 = Block8(relu=False)
        self.avgpool_1a = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout_prob)
        self.last_linear = nn.Linear(1792, EMBEDDING_DIM, bias=False)
        self.last_bn = nn.BatchNorm1d(EMBEDDING_DIM, eps=BN_EPS, momentum=0.1)
        self.logits = nn.Linear(EMBEDDING_DIM, num_classes) if num_classes > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool_3a(self.conv2d_2b(self.conv2d_2a(self.conv2d_1a(x))))
        x = self.conv2d_4b(self.conv2d_4a(self.conv2d_3b(x)))
        x = self.repeat_2(self.mixed_6a(self.repeat_1(x)))
        x = self.block8(self.repeat_3(self.mixed_7a(x)))
        x = self.dropout(self.avgpool_1a(x))
        return self.last_bn(self.last_linear(torch.flatten(x, 1)))


class FaceNetInceptionResnetV1(FaceModel):
    """facenet-pytorch's InceptionResnetV1 behind the FaceModel contract (the network is
    ``self.net``): ``features`` = L2-normalised 512-d embedding, ``forward`` = ``logits`` of the
    un-normalised one (``num_classes`` 0: a pure embedder, see ``GalleryClassifier``)."""

    def __init__(self, num_classes: int = 0, *, dropout_prob: float = 0.6) -> None:
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        super().__init__(facenet_config(num_classes=num_classes))
        self.net = InceptionResnetV1(num_classes, dropout_prob=dropout_prob)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), p=2, dim=1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        if self.num_classes == 0:
            return super().classify(features)  # raises: no classifier
        raise TypeError(
            "FaceNet's logits come from the embedding before L2 normalisation, which features() "
            "no longer carries: call the model (forward) or features_and_logits(x)"
        )

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.net(self.normalize(x))
        if self.net.logits is None:
            return F.normalize(z, p=2, dim=1), super().classify(z)  # raises: no classifier
        return F.normalize(z, p=2, dim=1), self.net.logits(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]


def _file_classes(path: str | Path) -> int:
    """Rows of the file's ``logits.weight`` (under any prefix), 0 when it has no classifier."""
    from crossres.models.weights import read_tensors

    _, tensors = read_tensors(path)
    rows = {
        int(t.shape[0])
        for name, t in tensors.items()
        if (name == "logits.weight" or name.endswith(".logits.weight")) and t.ndim == 2
    }
    return rows.pop() if len(rows) == 1 else 0


def _build(
    dataset: str, weights: str | None, num_classes: int | None, strict: bool
) -> FaceNetInceptionResnetV1:
    in_file = _file_classes(weights) if weights is not None else FACENET_CLASSES[dataset]
    if num_classes is None:
        num_classes = in_file
    # num_classes=0 with a file that has a head: load it (so the file is checked whole), then
    # drop it: its classes are the training set's identities, not the benchmark's.
    model = FaceNetInceptionResnetV1(in_file if num_classes == 0 else num_classes)
    if weights is not None:
        from crossres.models.weights import load_weights

        load_weights(model, weights, strict=strict)
    if num_classes == 0 and model.net.logits is not None:
        model.net.logits = None
        model.pretrained_cfg = replace(model.pretrained_cfg, num_classes=0)
    return model.eval()


@register_model("facenet_vggface2")
def facenet_vggface2(
    weights: str | None = None, *, num_classes: int | None = None, strict: bool = True
) -> FaceNetInceptionResnetV1:
    """FaceNet InceptionResnetV1 trained on VGGFace2 (``20180402-114759-vggface2.pt``).

    num_classes: None = as the weight file's ``logits`` (8631 in the released file; 0 when the
        file has none), or 8631 without a file (random initialisation: crossres never
        downloads weights). 0 = a pure embedder (a file's head is checked, then dropped), for
        benchmarks whose identities are not VGGFace2's: ``FrozenTarget`` then classifies by
        similarity to the gallery (``GalleryClassifier``).
    """
    return _build("vggface2", weights, num_classes, strict)


@register_model("facenet_casia")
def facenet_casia(
    weights: str | None = None, *, num_classes: int | None = None, strict: bool = True
) -> FaceNetInceptionResnetV1:
    """FaceNet InceptionResnetV1 trained on CASIA-WebFace (``20180408-102900-casia-webface.pt``;
    10575 classes). ``num_classes`` as in ``facenet_vggface2``."""
    return _build("casia", weights, num_classes, strict)
