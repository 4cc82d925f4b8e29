"""dlib's ResNet-29 face embedder as a differentiable PyTorch module (random weights; the
factory ``build_model("dlib_resnet29")`` loads dlib's own).

The network's function, checked against dlib's CPU code: convolutions are cross-correlations
with padding ``filter/2`` at stride 1 and 0 at stride 2 (``con_``'s default); pools have no
padding at stride 2 and floor their output size; ``affine`` is a per-channel scale and shift
(batch norm folded); ``add_prev`` of tensors of different shapes adds them into the larger
shape, zero-filled at the end of each dimension (``tt::add``) -- this happens in the
downsampling blocks, whose shortcut is ``avg_pool<2,2,2,2>`` of the block input and has fewer
channels (and once, 8x8 -> 4x4 against 3x3 from the strided conv, more pixels) than the branch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crossres.models.base import FaceModel, PretrainedConfig

DLIB_MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"

#: ``input_rgb_image``'s defaults (dlib/dnn/input.h): R, G, B means on the 0-255 scale; the
#: input layer computes (pixel - mean) / 256.
DLIB_MEAN_RGB: tuple[float, float, float] = (122.782, 117.001, 104.298)
DLIB_INPUT_DIVISOR = 256.0
DLIB_CHIP_SIZE = 150
EMBEDDING_DIM = 128
#: Same-person threshold on the Euclidean distance (the file's ``loss_metric`` dist_thresh).
SAME_PERSON_THRESHOLD = 0.6

#: Residual blocks in forward order: (output channels, downsampling). alevel4 = 3 x ares<32>,
#: alevel3 = ares_down<64> + 3 x ares<64>, alevel2 = ares_down<128> + 2 x ares<128>,
#: alevel1 = ares_down<256> + 2 x ares<256>, alevel0 = ares_down<256>.
BLOCKS: tuple[tuple[int, bool], ...] = (
    *[(32, False)] * 3,
    (64, True),
    *[(64, False)] * 3,
    (128, True),
    *[(128, False)] * 2,
    (256, True),
    *[(256, False)] * 2,
    (256, True),
)
STEM_CHANNELS = 32


def dlib_config(*, weights_hash: str = "", **extra) -> PretrainedConfig:
    """dlib's ``input_rgb_image_sized<150>``: RGB 0-255, minus the channel mean, divided by 256."""
    return PretrainedConfig(
        input_size=(3, DLIB_CHIP_SIZE, DLIB_CHIP_SIZE),
        resize_shortest=None,
        channel_order="RGB",
        scale=255.0,
        mean=DLIB_MEAN_RGB,
        std=(DLIB_INPUT_DIVISOR,) * 3,
        feature_dim=EMBEDDING_DIM,
        num_classes=0,
        feature_layer="fc",
        weights_hash=weights_hash,
        extra={"same_person_threshold": SAME_PERSON_THRESHOLD, **extra},
    )


class ChannelAffine(nn.Module):
    """dlib's ``affine`` in CONV_MODE: ``x * weight[c] + bias[c]`` (a folded batch norm)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


def add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev`` (``tt::add``): the sum in the larger shape, each operand zero-filled
    at the end of the channel, row and column dimensions it lacks."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


class DlibResBlock(nn.Module):
    """``ares``: relu(affine(con3x3(relu(affine(con3x3_s(x))))) + shortcut), shortcut = x, or
    avg_pool 2x2/2 of x in ``ares_down`` (stride 2, unpadded strided conv)."""

    def __init__(self, in_channels: int, out_channels: int, *, down: bool) -> None:
        super().__init__()
        self.down = down
        stride, padding = (2, 0) if down else (1, 1)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=padding)
        self.affine1 = ChannelAffine(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        self.affine2 = ChannelAffine(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.affine1(self.conv1(x)))
        y = self.affine2(self.conv2(y))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(add_zero_padded(y, shortcut))


class DlibResNet29(FaceModel):
    """dlib's face-recognition ResNet (29 conv layers + fc_no_bias to 128), 150x150 RGB in.

    ``features(x)`` is dlib's ``compute_face_descriptor`` of the chip ``x`` (float RGB in
    [0, 1]); there is no classifier: wrap it in ``GalleryClassifier`` for logits. Build it with
    ``build_model("dlib_resnet29")`` (dlib's weights) or ``DlibResNet29()`` (random weights).
    """

    def __init__(self, cfg: PretrainedConfig | None = None) -> None:
        super().__init__(cfg or dlib_config())
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 7, stride=2, padding=0)
        self.affine1 = ChannelAffine(STEM_CHANNELS)
        blocks, channels = [], STEM_CHANNELS
        for out_channels, down in BLOCKS:
            blocks.append(DlibResBlock(channels, out_channels, down=down))
            channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, EMBEDDING_DIM, bias=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        size = self.pretrained_cfg.input_size[1:]
        if tuple(x.shape[-2:]) != size:
            raise ValueError(
                f"DlibResNet29 takes {size[0]}x{size[1]} face chips aligned as "
                f"dlib.get_face_chip makes them; got images of shape {tuple(x.shape)}: resize "
                "or re-align them first (see pretrained_cfg.input_size)"
            )
        x = F.relu(self.affine1(self.conv1(x)))
        x = F.max_pool2d(x, 3, 2)
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))
