"""Training data for cross-resolution fine-tuning (``crossres fit``): any crossres datamodule's
gallery split for training, its queries for validation, with optional face augmentation.

``CrossResolutionDataModule(source=...)`` wraps a ``MultiResolutionDataModule`` (VGGFace2, the
embedded photos, synthetic faces):

- ``train_dataloader``: the source's gallery images at the original resolution, shuffled
  (seeded). For VGGFace2 these are the training images that are not in the query split (the
  paper's queries are never trained on); for the embedded photos, the gallery photos and the
  single-face distractors, never the query photos. ``holdout`` photos of these (seeded) are
  kept out of training (``holdout_table``/``holdout_dataloader``): a validation split of the
  training photos, on which a recipe is chosen without looking at the queries.
- ``val_dataloader``: the source's queries at every resolution (its ``test_dataloader``,
  sharded exactly under DDP); ``gallery_dataloader`` for the validation templates, optionally
  restricted to the query identities plus ``val_gallery_identities`` others (seeded), since
  templates of VGGFace2's 8631 identities mean a pass over ~1.4 M images.
- augmentation (``FaceAugmentation``) on the training batch once it is on the device: random
  horizontal flips, small random crops resized back (zoom), brightness/contrast/saturation
  jitter. It acts on the full-resolution image, before the LightningModule degrades it, so the
  teacher and the student see the same augmented face.

``input_size`` and ``resize_shortest`` are passed on to the source (the CLI links them to the
model's pretrained config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from crossres.datamodules.base import MultiResolutionDataModule, distributed_info, seeded_order
from crossres.models.base import PretrainedConfig
from crossres.types import FaceBatch

__all__ = ["CrossResolutionDataModule", "FaceAugmentation", "augment_faces"]


@dataclass(frozen=True)
class FaceAugmentation:
    """Augmentation of a batch of faces (float RGB in [0, 1]).

    flip: probability of a horizontal flip.
    crop_scale: smallest side of the random square-aspect crop as a fraction of the image (1:
        no crop); the crop is resized back to the input size (bilinear).
    brightness, contrast, saturation: each factor drawn uniformly in [1 - v, 1 + v].
    """

    flip: float = 0.5
    crop_scale: float = 0.9
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip <= 1.0:
            raise ValueError(f"FaceAugmentation.flip must be a probability, got {self.flip}")
        if not 0.0 < self.crop_scale <= 1.0:
            raise ValueError(
                f"FaceAugmentation.crop_scale must be in (0, 1], got {self.crop_scale}"
            )
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"FaceAugmentation.{name} must be in [0, 1), got {v}")


def _gray(x: torch.Tensor) -> torch.Tensor:
    # ITU-R 601 luma, as torchvision's rgb_to_grayscale
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).clamp(0, 1)


def augment_faces(
    images: torch.Tensor, aug: FaceAugmentation, *, generator: torch.Generator
) -> torch.Tensor:
    """A randomly augmented copy of ``images`` [B, 3, H, W] in [0, 1] (see ``FaceAugmentation``);
    every random draw comes from ``generator`` (a CPU generator), one set per image."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images [B, 3, H, W], got shape {tuple(images.shape)}")
    b = images.shape[0]
    if b == 0:
        return images
    dev, dt = images.device, images.dtype

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(b, generator=generator, dtype=torch.float64)).to(
            dev, dt
        )

    flip = torch.rand(b, generator=generator) < aug.flip
    scale = uniform(aug.crop_scale, 1.0)
    # crop centre offsets in normalised coordinates, keeping the crop inside the image
    tx = uniform(-1.0, 1.0) * (1 - scale)
    ty = uniform(-1.0, 1.0) * (1 - scale)
    bright = uniform(1 - aug.brightness, 1 + aug.brightness)
    contrast = uniform(1 - aug.contrast, 1 + aug.contrast)
    sat = uniform(1 - aug.saturation, 1 + aug.saturation)

    x = torch.where(flip.to(dev).view(b, 1, 1, 1), images.flip(-1), images)
    if aug.crop_scale < 1.0:
        theta = torch.zeros(b, 2, 3, device=dev, dtype=dt)
        theta[:, 0, 0], theta[:, 1, 1] = scale, scale
        theta[:, 0, 2], theta[:, 1, 2] = tx, ty
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    view = (b, 1, 1, 1)
    x = (x * bright.view(view)).clamp(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast.view(view) + mean).clamp(0, 1)
    g = _gray(x)
    x = ((x - g) * sat.view(view) + g).clamp(0, 1)
    return x


class CrossResolutionDataModule(pl.LightningDataModule):
    """Training data for ``CrossResolutionDistillation`` (see the module docstring).

    source: the datamodule whose gallery split trains and whose queries validate.
    augmentation: ``FaceAugmentation`` of the training batches, or None (none).
    val_gallery_identities: None: every gallery identity gets a template in validation; an int:
        the query identities plus that many other identities (seeded by ``seed``).
    input_size, resize_shortest: passed on to ``source`` (None: keep its own).
    holdout: how many of the source's gallery photos (seeded by ``seed``) are held out of
        training as a validation split (0: none).
    seed: seeds the augmentation (with the process rank), the holdout and the validation
        gallery subset.
    """

    def __init__(
        self,
        source: MultiResolutionDataModule,
        *,
        augmentation: FaceAugmentation | None = None,
        val_gallery_identities: int | None = None,
        holdout: int = 0,
        input_size: int | None = None,
        resize_shortest: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(source, MultiResolutionDataModule):
            raise TypeError(
                f"source must be a MultiResolutionDataModule (VGGFace2DataModule, "
                f"EmbeddedFacesDataModule, SyntheticFacesDataModule), got {type(source).__name__}"
            )
        if val_gallery_identities is not None and val_gallery_identities < 0:
            raise ValueError(
                f"val_gallery_identities must be >= 0 or None, got {val_gallery_identities}"
            )
        if holdout < 0:
            raise ValueError(f"holdout must be >= 0, got {holdout}")
        self.source = source
        self.holdout = int(holdout)
        self.augmentation = augmentation
        self.val_gallery_identities = val_gallery_identities
        self.seed = int(seed)
        if input_size is not None:
            source.configure_for(
                PretrainedConfig(
                    input_size=(3, int(input_size), int(input_size)),
                    resize_shortest=resize_shortest,
                )
            )
        self._generator: torch.Generator | None = None

    # ------------------------------------------------------------ what the module reads
    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def resolutions(self) -> list[int]:
        return list(self.source.resolutions)

    @property
    def manifest_hash(self) -> str:
        return self.source.manifest_hash

    @property
    def query_identities(self) -> list[int]:
        return self.source.query_identities

    def describe(self) -> dict[str, Any]:
        d = self.source.describe()
        d.update(
            training="gallery split at the original resolution, less the holdout",
            n_train_images=len(self.training_rows()),
            n_holdout_images=self.holdout,
            augmentation=None if self.augmentation is None else vars(self.augmentation),
            val_gallery_identities=self.val_gallery_identities,
        )
        return d

    # ------------------------------------------------------------ set-up
    def prepare_data(self) -> None:
        self.source.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.source.setup(stage)

    # ------------------------------------------------------------ training and holdout rows
    def _holdout_rows(self) -> list[int]:
        table = self.source.gallery_table()
        if self.holdout >= len(table):
            raise ValueError(
                f"holdout {self.holdout} leaves nothing to train on ({len(table)} gallery photos)"
            )
        order = seeded_order([str(int(s)) for s in table.sample_id], self.seed, "cr-holdout")
        return sorted(order[: self.holdout])

    def training_rows(self) -> list[int]:
        """Rows of the source's gallery table that training uses (all but the holdout)."""
        held = set(self._holdout_rows())
        return [i for i in range(len(self.source.gallery_table())) if i not in held]

    def holdout_rows(self) -> list[int]:
        """Rows of the source's gallery table held out of training (the validation split)."""
        return self._holdout_rows()

    def _rows_loader(self, rows: list[int], **kwargs: Any) -> DataLoader:
        dataset = self.source.gallery_dataset()
        return DataLoader(
            Subset(dataset, rows),
            batch_size=self.source.batch_size,
            num_workers=self.source.num_workers,
            collate_fn=dataset.collate,
            **kwargs,
        )

    # ------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        """The training photos (gallery less holdout) at the original resolution, shuffled
        (seeded as the source's own train loader)."""
        if self.holdout == 0:
            return self.source.train_dataloader()
        g = torch.Generator()
        g.manual_seed(self.source.seed)
        return self._rows_loader(self.training_rows(), shuffle=True, generator=g)

    def holdout_dataloader(self) -> DataLoader:
        """The held-out training photos at the original resolution, in table order."""
        return self._rows_loader(self.holdout_rows(), shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self.source.test_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.source.test_dataloader()

    def gallery_dataloader(self) -> DataLoader:
        """The gallery at the original resolution (possibly restricted, see the class doc)."""
        loader = self.source.gallery_dataloader()
        if self.val_gallery_identities is None:
            return loader
        table = self.source.gallery_table()
        queried = set(self.source.query_identities)
        others = sorted(set(table.identity.tolist()) - queried)
        order = seeded_order([str(i) for i in others], self.seed, "val-gallery")
        keep = queried | {others[i] for i in order[: self.val_gallery_identities]}
        rows = [i for i, ident in enumerate(table.identity.tolist()) if ident in keep]
        dataset = loader.dataset
        return DataLoader(
            Subset(dataset, rows),
            batch_size=loader.batch_size,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            shuffle=False,
        )

    # ------------------------------------------------------------ augmentation
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if (
            self.augmentation is None
            or trainer is None
            or not trainer.training
            or not isinstance(batch, FaceBatch)
        ):
            return batch
        if self._generator is None:
            rank, _ = distributed_info()
            self._generator = torch.Generator().manual_seed(self.seed * 1_000_003 + rank)
        batch.images = augment_faces(batch.images, self.augmentation, generator=self._generator)
        return batch
