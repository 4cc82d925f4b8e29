"""ArcFace IResNet-18/34/50/100 in insightface's ``arcface_torch`` layout, so its
``backbone.pth`` files load by name as they are (also with DataParallel's ``module.`` prefix
or fp16 tensors: ``load_weights`` strips the one and casts the other).

Layout (``recognition/arcface_torch/backbones/iresnet.py``; every BatchNorm has eps 1e-5):
stem ``conv1`` 3x3/1 (64) + ``bn1`` + ``prelu``; four stages ``layer1..4`` of 64, 128, 256, 512
channels, each starting with stride 2 and a ``downsample`` (1x1 conv with the stride + BN);
an ``IBasicBlock`` is ``bn1 - conv1 (3x3/1) - bn2 - prelu - conv2 (3x3, the stride) - bn3``
plus the shortcut, with no activation after the add; head ``bn2`` (BatchNorm2d 512), dropout
(p = 0), flatten, ``fc`` Linear(512*7*7, 512), ``features`` BatchNorm1d(512) whose weight
is fixed at 1. Input: aligned 112x112 RGB, ``(x - 0.5) / 0.5``.

The network's last module is called ``features``, which is also ``FaceModel``'s method, so the
network lives in ``ArcFaceIResNet.net`` (state-dict names ``net.conv1.weight``, ...);
``load_weights`` matches the file's bare names to them.
"""

from __future__ import annotations

import torch
from torch import nn

from crossres.models.base import FaceModel, PretrainedConfig
from crossres.models.registry import register_model

__all__ = ["ARCFACE_LAYERS", "ArcFaceIResNet", "IBasicBlock", "IResNet", "arcface_config"]

#: IBasicBlocks per stage of each depth (arcface_torch's ``iresnet{18,34,50,100}``).
ARCFACE_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
}
STAGE_WIDTHS: tuple[int, int, int, int] = (64, 128, 256, 512)
EMBEDDING_DIM = 512
BN_EPS = 1e-5
FC_SPATIAL = 7 * 7  # the last stage's map at 112x112 input (112 / 2**4)


def arcface_config(*, weights_hash: str = "") -> PretrainedConfig:
    """arcface_torch's preprocessing: aligned 112x112 RGB, ``(x / 255 - 0.5) / 0.5``."""
    return PretrainedConfig(
        input_size=(3, 112, 112),
        resize_shortest=None,
        channel_order="RGB",
        scale=1.0,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        feature_dim=EMBEDDING_DIM,
        num_classes=0,
        feature_layer="features",
        weights_hash=weights_hash,
    )


def _conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3 (stride) - BN, plus the (downsampled) input."""

    def __init__(
        self, inplanes: int, planes: int, *, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """The bare network: normalised [B, 3, 112, 112] -> 512-d ``features`` output."""

    def __init__(self, layers: tuple[int, int, int, int], *, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=BN_EPS)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for index, (blocks, planes) in enumerate(zip(layers, STAGE_WIDTHS, strict=True)):
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=2, bias=False),
                nn.BatchNorm2d(planes, eps=BN_EPS),
            )
            stage = [IBasicBlock(inplanes, planes, stride=2, downsample=downsample)]
            stage += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(inplanes * FC_SPATIAL, EMBEDDING_DIM)
        self.features = nn.BatchNorm1d(EMBEDDING_DIM, eps=BN_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        # As arcface_torch (only matters without weights): conv ~ N(0, 0.1), BN identity, and
        # the embedding BN's scale fixed at 1 (arcface_torch never trains it).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.bn2(x)
        if x.shape[-2:] != (7, 7):
            raise ValueError(
                f"IResNet needs 112x112 input (its fc takes a 512x7x7 map); the last stage "
                f"gave {tuple(x.shape[-2:])}. Resize aligned faces to 112x112 (pretrained_cfg)."
            )
        x = self.dropout(torch.flatten(x, 1))
        return self.features(self.fc(x))


class ArcFaceIResNet(FaceModel):
    """An arcface_torch IResNet behind the FaceModel contract: ``features(x)`` is the 512-d
    embedding (``net.features`` output). A pure embedder (``num_classes`` 0): wrap it in
    ``GalleryClassifier`` for logits, as ``FrozenTarget`` does."""

    def __init__(self, depth: int = 50, *, dropout: float = 0.0) -> None:
        if depth not in ARCFACE_LAYERS:
            raise ValueError(f"IResNet depth must be one of {sorted(ARCFACE_LAYERS)}, got {depth}")
        super().__init__(arcface_config())
        self.depth = depth
        self.net = IResNet(ARCFACE_LAYERS[depth], dropout=dropout)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _build(depth: int, weights: str | None, strict: bool) -> ArcFaceIResNet:
    model = ArcFaceIResNet(depth)
    if weights is not None:
        from crossres.models.weights import load_weights

        load_weights(model, weights, strict=strict)
    return model.eval()


_DOC = """ArcFace IResNet-{depth} (insightface arcface_torch ``r{depth}``). ``weights``: its
    ``backbone.pth`` (any format ``load_weights`` reads); without them the network is randomly
    initialised (crossres never downloads weights)."""


def _register(depth: int) -> None:
    def factory(weights: str | None = None, *, strict: bool = True) -> ArcFaceIResNet:
        return _build(depth, weights, strict)

    factory.__name__ = factory.__qualname__ = f"arcface_iresnet{depth}"
    factory.__doc__ = _DOC.format(depth=depth)
    register_model(f"arcface_iresnet{depth}")(factory)


for _depth in ARCFACE_LAYERS:
    _register(_depth)
