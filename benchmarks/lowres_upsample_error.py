"""How far the differentiable upsampling (``ResolutionTransform.upsample``) is from the PIL path.

Two figures over random cases (image size, aspect ratio, resolution r, including r >= the
shortest side, content, and the model inputs 224/256 crop, 150 straight and small ones):
- uint8: ``upsample(low_resolution(img), (h, w))`` vs ``ResolutionTransform(r)(img)``, in units
  of 1/255. PIL rounds to uint8 after each of its four passes (two resizes x two axes), so
  the analytic bound is < 2/255; the tolerance in tests/test_resolution.py comes from this.
- float: the same geometry through PIL's float ("F") mode, no rounding: the filter and the
  geometry alone (absolute).

Usage:
    PYTHONPATH=src .venv/bin/python benchmarks/lowres_upsample_error.py [--cases 1000] [--seed 1]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from crossres.datamodules.resolution import ResolutionTransform
from crossres.models.resampling import upsample_to_model_input

MODEL_INPUTS = [(224, 256), (150, None), (32, 36), (30, None), (16, 16), (40, 64)]


def content(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:  # white noise
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if kind == 1:  # black and white noise: the largest steps
        return rng.choice(np.array([0, 255], dtype=np.uint8), (h, w, 3))
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)  # a smooth wave
    wave = np.cos(2 * np.pi * (rng.uniform(-8, 8) * xx + rng.uniform(-8, 8) * yy))
    return ((wave[..., None] * [1, 0.5, -1] + 1) * 127.5).astype(np.uint8)


def uint8_error(rng: np.random.Generator) -> float:
    w, h = (int(v) for v in rng.integers(8, 400, 2))
    short = min(w, h)
    r = int(rng.integers(1, 450)) if rng.random() < 0.3 else int(rng.integers(1, max(2, short)))
    crop, shortest = MODEL_INPUTS[rng.integers(len(MODEL_INPUTS))]
    img = Image.fromarray(content(rng, h, w))
    tf = ResolutionTransform(r, input_size=crop, resize_shortest=shortest)
    ours = tf.upsample(tf.low_resolution(img).double(), (h, w))
    return float((ours - tf(img).double()).abs().max()) * 255


def float_error(rng: np.random.Generator) -> float:
    h, w = (int(v) for v in rng.integers(8, 400, 2))
    hr, wr = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
    crop, shortest = MODEL_INPUTS[rng.integers(len(MODEL_INPUTS))]
    small = rng.random((3, hr, wr)).astype(np.float32)
    ref = []
    for channel in small:
        im = Image.fromarray(channel, mode="F").resize((w, h), Image.BILINEAR)
        if shortest is None:
            im = TF.resize(im, [crop, crop], interpolation=TF.InterpolationMode.BILINEAR)
        else:
            im = TF.resize(im, shortest, interpolation=TF.InterpolationMode.BILINEAR)
            im = TF.center_crop(im, [crop, crop])
        ref.append(np.asarray(im))
    ours = upsample_to_model_input(
        torch.from_numpy(small).double(), (h, w), input_size=crop, resize_shortest=shortest
    )
    return float((ours - torch.from_numpy(np.stack(ref)).double()).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    u = np.array([uint8_error(rng) for _ in range(args.cases)])
    f = np.array([float_error(rng) for _ in range(max(1, args.cases // 5))])
    print(
        f"uint8 path, {len(u)} cases: max {u.max():.3f}/255, median {np.median(u):.3f}/255, "
        f"p99 {np.quantile(u, 0.99):.3f}/255"
    )
    print(f"float mode, {len(f)} cases: max {f.max():.3g}, median {np.median(f):.3g}")


if __name__ == "__main__":
    main()
