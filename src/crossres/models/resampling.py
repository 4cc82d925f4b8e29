"""Differentiable torch twin of the resolution pipeline's second half: a low-resolution face
back up to its original size, then to the model's input (resize + centre crop, or a straight
resize).

The PIL pipeline (``crossres.datamodules.resolution``) runs PIL BILINEAR resizes on uint8
images. PIL's BILINEAR is a triangle filter whose support widens by the scale factor when it
shrinks (antialiasing) and is plain half-pixel-centre bilinear when it enlarges; torch's
``F.interpolate(mode="bilinear", align_corners=False, antialias=True)`` implements the same
filter (it was ported from PIL's), so each step here is that call. What differs from PIL: no
rounding to uint8 between steps (it would make the function piecewise constant, useless to a
gradient attack), and float instead of PIL's fixed-point weights. The resulting gap to the PIL
path is bounded by the test suite (``tests/test_resolution.py``).

Everything here is a pure function of the tensor: batched over any leading dimensions, on the
input's device, in its dtype (half and bfloat16 are computed in float32 and cast back, since
torch's antialiased kernels take float32/float64 only on the CPU), no host copies. It lives
in ``models`` because attacks and model wrappers need it and may not import ``datamodules``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def low_resolution_size(width: int, height: int, r: int) -> tuple[int, int]:
    """(width, height) of the low-resolution image: shortest side ``r``, aspect ratio kept, the
    other side truncated to an int, with the paper's own float expressions (so that ``int``
    truncates exactly as there)."""
    ratio = height / float(width)
    if height < width:
        return int(r / float(ratio)), int(r)
    return int(r), int(r * float(ratio))


def degraded_size(height: int, width: int, r: int) -> tuple[int, int]:
    """(height, width) of the image ``degrade`` shrinks to at resolution ``r``: the
    low-resolution size, or the original size when ``r`` is 0 (original) or >= the shortest
    side (the pipeline leaves such images alone)."""
    if r < 0:
        raise ValueError(f"resolution must be >= 0 (0 = original), got {r}")
    if r == 0 or r >= min(height, width):
        return int(height), int(width)
    w, h = low_resolution_size(width, height, r)
    return h, w


def resized_shortest_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """(height, width) after torchvision's ``Resize(shortest)``: the short side becomes
    ``shortest``, the long side ``int(shortest * long / short)`` (truncated, as torchvision)."""
    if height <= width:
        return int(shortest), int(shortest * width / height)
    return int(shortest * height / width), int(shortest)


def center_crop_box(height: int, width: int, crop: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of torchvision's ``center_crop``: ``int(round((size - crop) / 2))``."""
    ch, cw = crop
    if ch > height or cw > width:
        raise ValueError(f"centre crop {crop} is larger than the resized image {(height, width)}")
    return int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0))


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL BILINEAR in float: ``[..., C, h, w] -> [..., C, H, W]`` (antialiased when
    shrinking). Returns ``x`` itself when the size is unchanged (the filter is the identity)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    lead = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:])
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    out = F.interpolate(work, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.to(x.dtype).reshape(*lead, *out.shape[-3:])


def _hw(name: str, size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) == 3:  # (C, H, W) as in PretrainedConfig.input_size
        size = size[1:]
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name} must be a positive (height, width), got {size}")
    return size  # type: ignore[return-value]


def upsample_to_model_input(
    x: torch.Tensor,
    original_size: Sequence[int],
    *,
    input_size: int | Sequence[int],
    resize_shortest: int | None,
) -> torch.Tensor:
    """Low-resolution images ``[..., 3, h_r, w_r]`` in [0, 1] -> the model's input
    ``[..., 3, H, W]``: back up to ``original_size`` = (height, width) of the image they were
    made from, then resize the shortest side to ``resize_shortest`` and centre-crop
    ``input_size`` (or, with ``resize_shortest=None``, resize straight to ``input_size``).
    Linear in ``x`` and differentiable; output values stay in [0, 1] (the weights are convex).
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 3 or x.shape[-3] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected low-resolution RGB images [..., 3, h, w], got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"low-resolution images must be floating point, got dtype {x.dtype}")
    original = _hw("original_size", original_size)
    crop = _hw("input_size", input_size)
    x = resize_bilinear(x, original)
    if resize_shortest is None:
        return resize_bilinear(x, crop)
    if resize_shortest < max(crop):
        raise ValueError(
            f"resize_shortest={resize_shortest} is smaller than the centre crop {crop}"
        )
    h, w = resized_shortest_size(*original, resize_shortest)
    x = resize_bilinear(x, (h, w))
    top, left = center_crop_box(h, w, crop)
    return x[..., top : top + crop[0], left : left + crop[1]]
