"""Synthetic faces for tests and smoke runs: seeded, no files, any size.

Each identity has a smooth base pattern (a few low-frequency colour waves around a mean colour,
drawn from ``(seed, identity)``); each image of it is that pattern shifted by a few pixels,
scaled in brightness and overlaid with pixel noise (drawn from ``(seed, identity, image)``).
Identities are therefore separable by a small model; lowering the resolution removes the finer
waves first, as with real faces.

The protocol is VGGFace2's: each identity's images split into gallery and query images;
``n_query_identities`` identities (seeded; all by default) give the queries; half of those are
left out of the open-set gallery.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np
from PIL import Image

from crossres.datamodules.base import (
    FaceImageDataset,
    FaceTable,
    MultiResolutionDataModule,
    OpenSetSplit,
    seeded_order,
    split_count,
)

GENERATOR_VERSION = 1  # bump when synthetic_face changes, so cached templates are not reused


def synthetic_face(
    seed: int,
    identity: int,
    index: int,
    *,
    size: int = 64,
    waves: int = 4,
    max_shift: float = 3.0,
    brightness: float = 0.1,
    noise: float = 0.04,
) -> Image.Image:
    """Image ``index`` of ``identity``: an RGB ``size`` x ``size`` PIL image (see module doc)."""
    g = np.random.default_rng([seed, identity, 0])
    mean = g.uniform(0.3, 0.7, size=3)
    freq = g.uniform(-3.0, 3.0, size=(3, waves, 2))  # cycles per image, per channel and wave
    phase = g.uniform(0, 2 * np.pi, size=(3, waves))
    amp = g.uniform(0.06, 0.14, size=(3, waves))
    h = np.random.default_rng([seed, identity, 1, index])
    dx, dy = h.uniform(-max_shift, max_shift, size=2)
    gain = 1.0 + h.uniform(-brightness, brightness)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    u, v = (xx - dx) / size, (yy - dy) / size
    img = np.empty((size, size, 3))
    for c in range(3):
        arg = 2 * np.pi * (freq[c, :, 0, None, None] * u + freq[c, :, 1, None, None] * v)
        img[..., c] = mean[c] + (amp[c, :, None, None] * np.cos(arg + phase[c, :, None, None])).sum(
            0
        )
    img = img * gain + h.normal(0.0, noise, size=img.shape)
    return Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8))


class SyntheticFacesDataset(FaceImageDataset):
    """Rows of the table are (identity, image index) pairs, drawn on demand."""

    def __init__(
        self, table: FaceTable, *, n_images: int, seed: int, image_size: int, **kwargs
    ) -> None:
        super().__init__(table, **kwargs)
        self.n_images = n_images
        self.seed = seed
        self.image_size = image_size

    def describe_source(self, i: int) -> str:
        return f"synthetic face {int(self.table.sample_id[i])}"

    def load_image(self, i: int) -> Image.Image:
        sid = int(self.table.sample_id[i])
        identity, index = divmod(sid, self.n_images)
        return synthetic_face(self.seed, identity, index, size=self.image_size)


class SyntheticFacesDataModule(MultiResolutionDataModule):
    """``n_identities`` x ``n_images`` synthetic faces of ``image_size`` pixels.

    sample_id = identity * n_images + image index (stable for given sizes).
    """

    def __init__(
        self,
        *,
        n_identities: int = 8,
        n_images: int = 6,
        image_size: int = 64,
        n_query_identities: int | None = None,
        query_fraction: float = 0.5,
        seed: int = 0,
        resolutions: Sequence[int] = (8, 16, 32, 0),
        batch_size: int = 16,
        num_workers: int = 0,
        input_size: int = 64,
        resize_shortest: int | None = None,
        pad_shards: bool = False,
    ) -> None:
        super().__init__(
            resolutions=resolutions,
            batch_size=batch_size,
            num_workers=num_workers,
            input_size=input_size,
            resize_shortest=resize_shortest,
            pad_shards=pad_shards,
            seed=seed,
        )
        if n_identities < 2 or n_images < 2:
            raise ValueError(
                f"synthetic faces need n_identities >= 2 and n_images >= 2 (a gallery and a "
                f"query image each), got {n_identities} and {n_images}"
            )
        if n_query_identities is not None and not 1 <= n_query_identities <= n_identities:
            raise ValueError(
                f"n_query_identities must be in [1, {n_identities}], got {n_query_identities}"
            )
        if not 0.0 < query_fraction < 1.0:
            raise ValueError(f"query_fraction must be in (0, 1), got {query_fraction}")
        if image_size < 4:
            raise ValueError(f"image_size must be >= 4, got {image_size}")
        self.n_identities = int(n_identities)
        self.n_images = int(n_images)
        self.image_size = int(image_size)
        self.n_query_identities = n_query_identities
        self.query_fraction = float(query_fraction)

    def _prepare(self) -> None:
        n, m = self.n_identities, self.n_images
        width = len(str(n - 1))
        self.identity_names = [f"synthetic_{i:0{width}d}" for i in range(n)]
        names = self.identity_names
        chosen = [names[i] for i in seeded_order(names, self.seed, "identity")]
        chosen = chosen[: self.n_query_identities or n]
        chosen_ids = sorted(int(c.rsplit("_", 1)[1]) for c in chosen)
        k = split_count(m, self.query_fraction)
        query, gallery = [], []
        for i in range(n):
            images = [str(j) for j in range(m)]
            order = [int(images[t]) for t in seeded_order(images, self.seed, f"split/{i}")]
            if i in chosen_ids:
                query += [i * m + j for j in sorted(order[:k])]
            gallery += [i * m + j for j in sorted(order[k:])]
        opened = [
            chosen_ids[t] for t in seeded_order([str(c) for c in chosen_ids], self.seed, "open-set")
        ]
        half = len(chosen_ids) // 2
        self.open_set = OpenSetSplit(tuple(sorted(opened[half:])), tuple(sorted(opened[:half])))
        self._query_table = self._table(query)
        self._gallery = self._table(gallery)
        settings = {
            "dataset": "synthetic-faces",
            "generator": GENERATOR_VERSION,
            "seed": self.seed,
            "size": [n, m, self.image_size],
            "query": query,
            "gallery": gallery,
            "open_set": [list(self.open_set.mated), list(self.open_set.non_mated)],
        }
        self.manifest_hash = hashlib.sha256(
            json.dumps(settings, sort_keys=True).encode()
        ).hexdigest()

    def _table(self, sample_ids: list[int]) -> FaceTable:
        return FaceTable(
            paths=[""] * len(sample_ids),
            identity=np.array([s // self.n_images for s in sample_ids], dtype=np.int64),
            sample_id=np.array(sample_ids, dtype=np.int64),
        )

    def _make_dataset(self, table: FaceTable, resolutions: Sequence[int]) -> SyntheticFacesDataset:
        return SyntheticFacesDataset(
            table,
            n_images=self.n_images,
            seed=self.seed,
            image_size=self.image_size,
            resolutions=resolutions,
            input_size=self.input_size,
            resize_shortest=self.resize_shortest,
            manifest_hash=self.manifest_hash,
        )
