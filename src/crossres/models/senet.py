"""SE-ResNet-50 in the Caffe layout of VGGFace2's ``senet50_ft`` (Cao et al. 2018).

This is the network the paper attacks (Base, and CR = the same network fine-tuned at low
resolution). It is written out here rather than taken from timm because timm's ``seresnet50``
differs in ways that silently change the function when these weights are loaded into it: the
stride of the first block of stages 2-4 sits on the first 1x1 conv (not the 3x3), the stem's
max-pool has no padding and rounds up (ceil_mode), the SE convs are named ``conv4``/``conv5``,
and the head is a fixed ``AvgPool2d(7)`` (so the input must be 224x224).

Parameter names follow the public PyTorch port (``senet50_ft_weight.pkl``), so that file loads
by name: ``conv1``, ``bn1``, ``layer{1..4}.{i}.conv{1..5}/bn{1..3}/downsample.{0,1}``, ``fc``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crossres.models.base import FaceModel, PretrainedConfig
from crossres.models.registry import register_model

#: Channel means of VGGFace2's Caffe models, in B, G, R order, on the 0-255 scale.
VGGFACE2_MEAN_BGR: tuple[float, float, float] = (91.4953, 103.8827, 131.0912)

#: Bottlenecks per stage and their width (the 1x1-reduce channels) of SE-ResNet-50.
STAGE_BLOCKS: tuple[int, int, int, int] = (3, 4, 6, 3)
STAGE_WIDTHS: tuple[int, int, int, int] = (64, 128, 256, 512)
EXPANSION = 4
SE_REDUCTION = 16


def senet50_vggface2_config(*, num_classes: int = 8631, weights_hash: str = "") -> PretrainedConfig:
    """Preprocessing of VGGFace2's Caffe models: shortest side 256, centre crop 224, BGR 0-255
    minus the channel mean, no std."""
    return PretrainedConfig(
        input_size=(3, 224, 224),
        resize_shortest=256,
        channel_order="BGR",
        scale=255.0,
        mean=VGGFACE2_MEAN_BGR,
        std=(1.0, 1.0, 1.0),
        feature_dim=512 * EXPANSION,
        num_classes=num_classes,
        feature_layer="avgpool",
        weights_hash=weights_hash,
    )


class SEBottleneck(nn.Module):
    """Caffe SE bottleneck: stride on ``conv1`` (1x1); SE gate (``conv4`` down, ``conv5`` up,
    both biased) computed from the pooled ``bn3`` output and multiplied into it before the
    residual add."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        *,
        stride: int = 1,
        downsample: nn.Module | None = None,
        reduction: int = SE_REDUCTION,
    ) -> None:
        super().__init__()
        out = planes * EXPANSION
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.conv4 = nn.Conv2d(out, out // reduction, kernel_size=1, bias=True)
        self.conv5 = nn.Conv2d(out // reduction, out, kernel_size=1, bias=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        # The port pools with kernel = the map's height (a global mean on these square maps).
        gate = out.mean(dim=(2, 3), keepdim=True)
        gate = torch.sigmoid(self.conv5(F.relu(self.conv4(gate), inplace=True)))
        return F.relu(out * gate + identity, inplace=True)


class SEResNet50(FaceModel):
    """VGGFace2 ``senet50_ft``: 2048-d ``avgpool`` feature (``embed``), ``fc`` logits
    (``classify``). 43,723,943 parameters with the 8631-way ``fc``.

    channels_last: keep weights and activations in NHWC (faster convolutions on some
        devices; ``benchmarks/models.py`` measures it). The function is unchanged.
    """

    def __init__(
        self,
        num_classes: int = 8631,
        *,
        channels_last: bool = False,
        cfg: PretrainedConfig | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        super().__init__(cfg or senet50_vggface2_config(num_classes=num_classes))
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
        inplanes = 64
        for index, (blocks, planes) in enumerate(zip(STAGE_BLOCKS, STAGE_WIDTHS, strict=True)):
            stride = 1 if index == 0 else 2
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * EXPANSION, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * EXPANSION),
            )
            layers = [SEBottleneck(inplanes, planes, stride=stride, downsample=downsample)]
            inplanes = planes * EXPANSION
            layers += [SEBottleneck(inplanes, planes) for _ in range(1, blocks)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AvgPool2d(7, stride=1)
        self.fc = nn.Linear(inplanes, num_classes)
        self._init_weights()
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def _init_weights(self) -> None:
        # As the port: conv ~ N(0, 2 / (k*k*out)), BN identity. Only matters without weights.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised BGR input [B, 3, 224, 224] -> 2048-d ``avgpool`` feature."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if x.shape[-2:] != (7, 7):
            raise ValueError(
                f"SEResNet50 needs 224x224 input (its head is AvgPool2d(7) on a 7x7 map); the "
                f"last stage gave {tuple(x.shape[-2:])}. Resize the shortest side to 256 and "
                "centre-crop 224x224 (see pretrained_cfg)."
            )
        return torch.flatten(self.avgpool(x), 1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)


@register_model("senet50_vggface2")
def senet50_vggface2(
    weights: str | None = None,
    *,
    num_classes: int = 8631,
    channels_last: bool = False,
    strict: bool = True,
) -> SEResNet50:
    """VGGFace2 SE-ResNet-50. Base (``senet50_ft_weight.pkl``) and CR (a fine-tuned
    checkpoint) differ only in ``weights``: any format ``load_weights`` recognises.
    Without weights the network is randomly initialised (they are not redistributable)."""
    from crossres.models.weights import load_weights

    model = SEResNet50(num_classes, channels_last=channels_last)
    if weights is not None:
        load_weights(model, weights, strict=strict)
    return model
