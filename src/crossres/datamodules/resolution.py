"""The resolution pipeline: make a face low-resolution as Massoli et al. (2020) did, then prepare
it for a model (its resize and centre crop), as float RGB in [0, 1].

``degrade`` follows the cross-resolution paper's code (``_lower_resolution`` in
fvmassoli/cross-resolution-face-recognition): the shortest side goes down to ``r`` pixels with
the aspect ratio kept and the other side truncated to an int, with PIL's BILINEAR filter (which
widens its support when shrinking, so it antialiases), then the image goes back up to its
original size with BILINEAR. An image whose shortest side is ``r`` or less is left as it is.
Resolution ``0`` (or None) means the original image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from crossres.errors import ConfigValueError
from crossres.models.base import PretrainedConfig
from crossres.models.resampling import low_resolution_size, upsample_to_model_input

__all__ = [
    "ORIGINAL",
    "ResolutionTransform",
    "check_resolutions",
    "degrade",
    "low_resolution_size",
    "shrink",
]

ORIGINAL = 0  # the resolution value that means "the image as it is"


def shrink(img: Image.Image, r: int | None) -> Image.Image:
    """The first half of ``degrade``: shortest side down to ``r`` (BILINEAR, antialiased,
    aspect kept, truncated). The image itself when ``r`` is 0/None or ``r >=`` the shortest side.
    """
    if r is None or r == ORIGINAL:
        return img
    if r < 0:
        raise ConfigValueError(f"resolution must be >= 0 (0 = original), got {r}")
    w, h = img.size
    if r >= w or r >= h:
        return img
    return img.resize(low_resolution_size(w, h, r), Image.BILINEAR)


def degrade(img: Image.Image, r: int | None) -> Image.Image:
    """Shortest side down to ``r`` (BILINEAR, antialiased, aspect kept, truncated), then back up
    to the original size (BILINEAR). Unchanged when ``r`` is 0/None or ``r >=`` the shortest side.
    """
    small = shrink(img, r)
    if small is img:
        return img
    return small.resize(img.size, Image.BILINEAR)


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) == 3:  # (C, H, W) as in PretrainedConfig.input_size
        size = size[1:]
    if len(size) != 2:
        raise ValueError(f"input_size must be an int, (H, W) or (C, H, W), got {size}")
    return size  # type: ignore[return-value]


class ResolutionTransform:
    """PIL image -> float RGB tensor [3, H, W] in [0, 1] at the model's input size.

    Steps: convert to RGB, ``degrade`` to ``resolution``, then either resize the shortest side
    to ``resize_shortest`` (BILINEAR, antialiased, as torchvision's ``Resize(int)``) and take the
    centre ``input_size`` crop (the VGGFace2 models: 256 then 224), or, with
    ``resize_shortest=None``, resize straight to ``input_size`` (e.g. dlib's 150x150 chips).
    Never normalises: models do that inside ``forward``.

    Its two halves, for the adversary who owns the low-resolution capture:
    ``low_resolution(img)`` is the degraded image before upsampling ([3, h_r, w_r], PIL's
    pixels / 255, the image itself when ``resolution`` is 0 or >= its shortest side), and
    ``upsample(t, (h, w))`` the differentiable torch rest of the pipeline (back up to the
    original (h, w), then to the model input), within 2/255 of ``self(img)``
    (see ``crossres.models.resampling``).
    """

    def __init__(
        self,
        resolution: int | None,
        *,
        input_size: int | Sequence[int] = 224,
        resize_shortest: int | None = 256,
    ) -> None:
        self.resolution = ORIGINAL if resolution is None else int(resolution)
        if self.resolution < 0:
            raise ConfigValueError(f"resolution must be >= 0 (0 = original), got {resolution}")
        self.input_size = _as_hw(input_size)
        if min(self.input_size) < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        if resize_shortest is not None and resize_shortest < max(self.input_size):
            raise ValueError(
                f"resize_shortest={resize_shortest} is smaller than the centre crop "
                f"{self.input_size}; use resize_shortest >= {max(self.input_size)} or None"
            )
        self.resize_shortest = resize_shortest

    @classmethod
    def from_config(cls, cfg: PretrainedConfig, resolution: int | None) -> ResolutionTransform:
        """The pipeline a model's pretrained config asks for (input size and resize)."""
        return cls(resolution, input_size=cfg.input_size, resize_shortest=cfg.resize_shortest)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = degrade(img.convert("RGB"), self.resolution)
        if self.resize_shortest is None:
            img = TF.resize(img, list(self.input_size), interpolation=TF.InterpolationMode.BILINEAR)
        else:
            img = TF.resize(img, self.resize_shortest, interpolation=TF.InterpolationMode.BILINEAR)
            img = TF.center_crop(img, list(self.input_size))
        return TF.to_tensor(img)

    def low_resolution(self, img: Image.Image) -> torch.Tensor:
        """The degraded image before upsampling: float RGB [3, h_r, w_r], exactly PIL's uint8
        pixels / 255 (h_r, w_r from ``low_resolution_size``; the original size when the
        resolution is 0 or >= the shortest side)."""
        return TF.to_tensor(shrink(img.convert("RGB"), self.resolution))

    def upsample(self, t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``[..., 3, h_r, w_r]`` low-resolution images -> ``[..., 3, H, W]`` model input: back
        up to ``size`` = the original image's (height, width), then this transform's resize and
        crop. Differentiable, batched, on ``t``'s device and dtype."""
        return upsample_to_model_input(
            t, size, input_size=self.input_size, resize_shortest=self.resize_shortest
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(resolution={self.resolution}, input_size={self.input_size}, "
            f"resize_shortest={self.resize_shortest})"
        )


def check_resolutions(resolutions: Sequence[int | None]) -> list[int]:
    """Validated list of resolutions (None -> 0 = original), duplicates refused."""
    out = [ORIGINAL if r is None else int(r) for r in resolutions]
    if not out:
        raise ConfigValueError("resolutions must name at least one resolution (0 = original)")
    bad = [r for r in out if r < 0]
    if bad:
        raise ConfigValueError(f"resolutions must be >= 0 (0 = original), got {bad}")
    if len(set(out)) != len(out):
        raise ConfigValueError(f"resolutions must be distinct, got {out}")
    return out
