"""Small typed records shared by every room of the package (data, models, attacks, metrics)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class FaceBatch:
    """One batch of faces as every datamodule yields it.

    images: float RGB in [0, 1], [B, 3, H, W], already at the model's input size after the
        resolution pipeline (never normalised: models normalise inside ``forward``).
    identity: class index [B] (position of the identity in sorted class-id order).
    sample_id: [B] int64, unique and stable across the dataset (DDP padding duplicates share it).
    resolution: [B] int64, the shortest side the face was degraded to (0 = original).
    paths: source file of each sample, where there is one.
    low_resolution: only when a callback asked the datamodule for them (an attack in the
        low-resolution space): per sample the degraded capture before upsampling, float RGB
        [3, h_r, w_r] in [0, 1] (PIL's pixels / 255; the original image when the resolution is
        0 or >= its shortest side). A list: captures of different original sizes differ.
    original_size: [B, 2] int64 (height, width) of each original image, with ``low_resolution``.
    reference: only when the frozen target asked for them (to measure feature drift): each face
        at the original resolution, at the model's input size [B, 3, H, W].
    """

    images: torch.Tensor
    identity: torch.Tensor
    sample_id: torch.Tensor
    resolution: torch.Tensor
    paths: list[str] = field(default_factory=list)
    low_resolution: list[torch.Tensor] | None = None
    original_size: torch.Tensor | None = None
    reference: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str) -> FaceBatch:
        return FaceBatch(
            images=self.images.to(device),
            identity=self.identity.to(device),
            sample_id=self.sample_id.to(device),
            resolution=self.resolution.to(device),
            paths=list(self.paths),
            low_resolution=(
                None if self.low_resolution is None else [t.to(device) for t in self.low_resolution]
            ),
            original_size=self.original_size,  # geometry: stays on the CPU
            reference=None if self.reference is None else self.reference.to(device),
        )

    def select(self, index: torch.Tensor) -> FaceBatch:
        """The samples at ``index`` (a long tensor of batch positions), every field kept."""
        positions = index.tolist()
        idx = index.to(self.images.device)
        return FaceBatch(
            images=self.images[idx],
            identity=self.identity[idx],
            sample_id=self.sample_id[idx],
            resolution=self.resolution[idx],
            paths=[self.paths[i] for i in positions] if self.paths else [],
            low_resolution=(
                None if self.low_resolution is None else [self.low_resolution[i] for i in positions]
            ),
            original_size=None if self.original_size is None else self.original_size[positions],
            reference=None if self.reference is None else self.reference[idx],
        )


@dataclass
class Gallery:
    """Gallery templates: one row of ``features`` per enrolled identity ``ids``.

    Any object with ``.features`` [N, D] and ``.ids`` [N] works where a gallery is expected;
    this is the project's own, which also records what produced it.
    """

    features: torch.Tensor
    ids: torch.Tensor
    model_hash: str = ""
    manifest_hash: str = ""
    normalized: bool = False

    def __post_init__(self) -> None:
        if self.features.ndim != 2:
            raise ValueError(
                f"Gallery.features must be [N, D], got shape {tuple(self.features.shape)}"
            )
        if self.ids.ndim != 1 or self.ids.shape[0] != self.features.shape[0]:
            raise ValueError(
                f"Gallery.ids must be [N] with N = {self.features.shape[0]} (rows of features), "
                f"got shape {tuple(self.ids.shape)}"
            )

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def to(self, device: torch.device | str) -> Gallery:
        return Gallery(
            features=self.features.to(device),
            ids=self.ids.to(device),
            model_hash=self.model_hash,
            manifest_hash=self.manifest_hash,
            normalized=self.normalized,
        )
