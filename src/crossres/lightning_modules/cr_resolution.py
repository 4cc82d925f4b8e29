"""Training resolutions of CR fine-tuning: which one a batch gets, and how a batch is degraded.

Where the low resolution is made. The benchmark degrades the *original* image with PIL
(``datamodules.resolution.degrade``: shortest side to ``r``, BILINEAR, back up) before the
model's resize and centre crop. Training degrades the *batch tensor* instead (``degrade_batch``:
``F.interpolate(antialias=True)`` bilinear down, bilinear back up), which costs nothing and
needs no second decode. Two small differences follow, both documented and bounded in the tests:

- scale: with ``resolution_reference="source"`` (default) ``r`` is converted to the tensor as
  ``r * crop_side / resize_shortest`` (224/256 for SE-ResNet-50), so that the face keeps the
  same number of pixels across the crop as the PIL pipeline leaves it; for models fed the whole
  image (``resize_shortest=None``: dlib's 150x150 chips, images already at the input size) the
  two coincide;
- filter: torch's antialiased bilinear is PIL's triangle filter, but PIL rounds the small image
  to 8 bits and resamples the original before the model's resize; on an image already at the
  input size the two agree to a few 1/255 on average (``tests/test_cr_training.py``).

Resolution draws are keyed by ``(seed, epoch, batch index)`` through numpy's SeedSequence, not
by the global RNG: reproducible, restored on resume, and identical on every DDP process (all
ranks run the same batch indices). Not ``global_step``: that counts optimizer steps, so with
gradient accumulation it would hold one resolution for all the accumulated batches.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from crossres.datamodules.resolution import low_resolution_size
from crossres.models.base import PretrainedConfig

__all__ = [
    "ResolutionReference",
    "ResolutionSampling",
    "degrade_batch",
    "input_resolution",
    "sample_training_resolution",
]

ResolutionReference = Literal["source", "input"]
ResolutionSampling = Literal["paper", "log_uniform"]


def sample_training_resolution(
    seed: int,
    *key: int,
    exponents: tuple[int, int] = (3, 8),
    sampling: ResolutionSampling = "paper",
) -> int:
    """A training resolution drawn from ``(seed, *key)`` alone, u ~ U[0, 1):

    - ``sampling="paper"``: ``2**int(lo + (hi - lo) * u)``; with the default
      ``exponents=(3, 8)`` the paper's ``2**int(3 + 5u)``: 8, 16, 32, 64 or 128 px, each with
      probability 1/5;
    - ``sampling="log_uniform"``: ``int(2**(lo + (hi - lo) * u))``, every integer size in
      ``[2**lo, 2**hi)`` with log-uniform weight. The same range without the gaps: on 150 px
      chips the benchmark's 24 px (between the paper's 16 and 32) is trained on too, and
      ``(3, 7)`` drops 128 px, a near no-op on a 150 px chip.

    The draw uses numpy's SeedSequence of the non-negative integers ``(seed, *key)``, so it is
    the same in every process and run.
    """
    lo, hi = (int(e) for e in exponents)
    if not 0 <= lo < hi:
        raise ValueError(f"exponents must be (lo, hi) with 0 <= lo < hi, got {exponents}")
    if sampling not in ("paper", "log_uniform"):
        raise ValueError(f"sampling must be 'paper' or 'log_uniform', got {sampling!r}")
    parts = [int(seed), *(int(k) for k in key)]
    if any(p < 0 for p in parts):
        raise ValueError(f"seed and key must be non-negative integers, got {parts}")
    u = np.random.default_rng(parts).random()
    if sampling == "log_uniform":
        return int(2 ** (lo + (hi - lo) * u))
    return 2 ** int(lo + (hi - lo) * u)


def input_resolution(
    resolution: int, cfg: PretrainedConfig, *, reference: ResolutionReference = "source"
) -> int:
    """The shortest side, on the model's input tensor, that matches ``resolution``.

    "source": ``resolution`` is the shortest side of the image before the model's resize (as in
    the benchmark's PIL pipeline); the centre crop keeps ``crop / resize_shortest`` of it, so
    the tensor is degraded to ``round(resolution * crop / resize_shortest)`` (at least 1).
    "input": ``resolution`` is the tensor's own shortest side. The two agree when the model
    takes the whole image (``resize_shortest=None``).
    """
    if reference not in ("source", "input"):
        raise ValueError(f"resolution_reference must be 'source' or 'input', got {reference!r}")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1 px, got {resolution}")
    if reference == "input" or cfg.resize_shortest is None:
        return int(resolution)
    crop = min(cfg.input_size[1:])
    return max(1, round(resolution * crop / cfg.resize_shortest))


def degrade_batch(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Low-resolution copies of a batch: shortest side down to ``resolution`` (aspect ratio kept,
    the other side truncated as in ``low_resolution_size``) with antialiased bilinear
    interpolation, then bilinear back up to the input size. Unchanged when ``resolution`` is at
    least the shortest side. Differentiable; keeps dtype and device."""
    if images.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1 px, got {resolution}")
    h, w = images.shape[-2:]
    if resolution >= min(h, w):
        return images
    lw, lh = low_resolution_size(w, h, int(resolution))
    small = F.interpolate(
        images, size=(lh, lw), mode="bilinear", antialias=True, align_corners=False
    )
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
