"""VGGFace2's face crop and the dataset that reads cropped VGGFace2 images.

Face crop (``crop_margin=0.3``, the default): VGGFace2's own convention for the crops its models
were trained on (``standard_evaluation/demo_proj.m`` of ox-vgg/vgg_face2, also stated in the
VGGFace2 model README: "bounding box extended by a factor 0.3 ... to include the whole head"):
around the centre of the face box (x, y, w, h), a region of height ``h * (1 + margin)`` and
width ``max(w, h * 112/128) * (1 + margin)``, clipped at the image border, corners rounded to
the nearest pixel. VGGFace2 detects that box with MTCNN; we take it from
``loose_bb_train.csv`` (the released face boxes in the released images, 0-based pixels, top-left
corner and size). ``crop_margin=None`` uses the released loose crops as they are (no box file
needed). The resolution pipeline then works on this crop (its shortest side is the resolution).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from crossres.datamodules.base import FaceImageDataset, FaceTable


def vggface2_crop_box(
    box: Sequence[float], image_size: tuple[int, int], margin: float = 0.3
) -> tuple[int, int, int, int]:
    """PIL crop box (left, top, right, bottom) of VGGFace2's tight crop around face ``box``
    (x, y, w, h) in an image of ``image_size`` (width, height): see the module docstring."""
    x, y, w, h = (float(v) for v in box)
    if not (w > 0 and h > 0):
        raise ValueError(f"face box {tuple(box)} has no area")
    cx, cy = x + w / 2, y + h / 2
    width = max(w, h * 112 / 128) * (1 + margin)
    height = h * (1 + margin)
    W, H = image_size

    def rnd(v: float) -> int:  # MATLAB's round: halves away from zero
        return int(math.floor(v + 0.5)) if v >= 0 else -int(math.floor(-v + 0.5))

    left, top = max(0, rnd(cx - width / 2)), max(0, rnd(cy - height / 2))
    right, bottom = min(W, rnd(cx + width / 2)), min(H, rnd(cy + height / 2))
    if right <= left or bottom <= top:
        raise ValueError(f"face box {tuple(box)} lies outside the {W}x{H} image")
    return left, top, right, bottom


@dataclass
class BoxedFaceTable(FaceTable):
    """A ``FaceTable`` whose rows also carry a face box (x, y, w, h), or None for no crop."""

    boxes: np.ndarray | None = None


class VGGFace2Dataset(FaceImageDataset):
    """Images under ``image_dir`` (paths relative to it), cropped as VGGFace2 does."""

    def __init__(
        self,
        table: BoxedFaceTable,
        *,
        image_dir: str | os.PathLike,
        crop_margin: float | None = 0.3,
        **kwargs,
    ) -> None:
        super().__init__(table, **kwargs)
        if crop_margin is not None and table.boxes is None:
            raise ValueError("crop_margin is set but the table has no face boxes")
        self.image_dir = Path(image_dir)
        self.crop_margin = crop_margin

    def describe_source(self, i: int) -> str:
        return str(self.image_dir / self.table.paths[i])

    def load_image(self, i: int) -> Image.Image:
        with Image.open(self.image_dir / self.table.paths[i]) as f:
            img = f.convert("RGB")  # full decode: truncated files raise here
        if self.crop_margin is not None:
            box = self.table.boxes[i]  # type: ignore[index]
            img = img.crop(vggface2_crop_box(box, img.size, self.crop_margin))
        return img
