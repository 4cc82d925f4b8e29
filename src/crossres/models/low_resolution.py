"""A face model seen through the resolution pipeline: its inputs are low-resolution captures.

Two threat models
-----------------
Model-input space (the paper's, Massoli et al. 2020): the low-resolution face is upsampled to
the model's input (back up to its original size, then resize + centre crop to 224x224) and the
adversary perturbs those 224x224 pixels. Budgets are measured there. No camera could have
produced such a perturbation: it lives at a resolution the capture never had.

Low-resolution space: the adversary owns the capture itself, the h_r x w_r image (16x16,
24x24 px ...) before the system upsamples it. ``LowResolutionInput(model, original_size,
resolution=r)`` is the model as that adversary sees it: it takes [B, 3, h_r, w_r] images in
[0, 1], upsamples them with the differentiable twin of the pipeline
(``crossres.models.resampling.upsample_to_model_input``, the model's own resize/crop) and runs
the model. Any attack given this wrapper crafts on the low-resolution pixels, and its budget
(pixel box, L-infinity bound, norms) holds in that space. When the low-resolution image already
is the model input (resolution 0 or >= the shortest side, and an image at the model's input
size with a straight resize) the wrapper is the identity and the two threat models coincide.

The upsampling here is smooth: the system's PIL path also rounds to uint8 between resizes
(within 2/255 of this, see ``resampling``), which the adversary's gradient ignores, as
model-input attacks ignore the final quantisation.

One wrapper serves one original size: attacks call the model on sub-batches (active-set
compaction, finished samples leaving), so per-sample geometry cannot ride along with the
batch. Samples of different original sizes are attacked in groups, one wrapper per size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from crossres.models.base import FaceModel
from crossres.models.resampling import degraded_size, upsample_to_model_input


class LowResolutionInput(FaceModel):
    """``model`` (a FaceModel) fed with low-resolution captures of an image of
    ``original_size`` = (height, width) degraded to shortest side ``resolution`` (0: none).

    Inputs: float RGB [B, 3, h_r, w_r] in [0, 1] with (h_r, w_r) the low-resolution size of the
    pipeline (``ResolutionTransform(resolution).low_resolution(img)``). ``forward`` gives the
    model's logits, ``features`` its deep features, on the upsampled images.
    ``pretrained_cfg`` is the model's with ``input_size = (3, h_r, w_r)`` and a straight resize,
    which is exactly how the pipeline makes the low-resolution image from the original (PIL
    BILINEAR to that size); ``extra["low_resolution"]`` records the geometry.
    """

    def __init__(self, model: nn.Module, original_size: Sequence[int], *, resolution: int) -> None:
        inner = getattr(model, "pretrained_cfg", None)
        if inner is None:
            raise TypeError(
                f"LowResolutionInput needs a FaceModel (with pretrained_cfg), got "
                f"{type(model).__name__}"
            )
        size = tuple(int(s) for s in original_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"original_size must be a positive (height, width), got {size}")
        resolution = int(resolution)
        low = degraded_size(*size, resolution)  # validates resolution >= 0
        geometry = {
            "original_size": size,
            "resolution": resolution,
            "model_input_size": tuple(inner.input_size),
            "model_resize_shortest": inner.resize_shortest,
        }
        cfg = dataclasses.replace(
            inner,
            input_size=(3, *low),
            resize_shortest=None,
            extra={**inner.extra, "low_resolution": geometry},
        )
        super().__init__(cfg)
        self.normalize = nn.Identity()  # the wrapped model normalises after upsampling
        self.model = model
        self.original_size = size
        self.resolution = resolution
        self.low_resolution_size = low
        self._model_input_size = tuple(inner.input_size)
        self._model_resize_shortest = inner.resize_shortest

    def to_model_input(self, x: torch.Tensor) -> torch.Tensor:
        """Low-resolution images [B, 3, h_r, w_r] -> the wrapped model's input (differentiable)."""
        expected = (3, *self.low_resolution_size)
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != expected:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"LowResolutionInput expects low-resolution images [B, {expected[0]}, "
                f"{expected[1]}, {expected[2]}] (original {self.original_size} at resolution "
                f"{self.resolution}), got shape {shape}"
            )
        return upsample_to_model_input(
            x,
            self.original_size,
            input_size=self._model_input_size,
            resize_shortest=self._model_resize_shortest,
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        # normalize is the identity here, so FaceModel.features and GalleryClassifier land here
        return self.model.features(self.to_model_input(x))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.classify(features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(self.to_model_input(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.to_model_input(x))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.features_and_logits(self.to_model_input(x))

    def extra_repr(self) -> str:
        return (
            f"original_size={self.original_size}, resolution={self.resolution}, "
            f"low_resolution_size={self.low_resolution_size}"
        )
