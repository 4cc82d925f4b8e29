"""What every crossres datamodule shares: multi-resolution query sets, an original-resolution
gallery, the open-set split, and exact sharding under DDP.

One dataset item is one (image, resolution) pair; items are ordered resolution-major (every
query at the first resolution, then at the second, ...). A batch is a ``FaceBatch``. Under DDP
the test dataloader shards the items without padding (``ShardSampler``), so every query is
evaluated exactly once across processes; ranks may then run one batch more or fewer than each
other, so per-step collectives (``self.log(..., sync_dist=True)`` on step) must be avoided,
or ``pad_shards=True`` used and duplicates dropped by ``sample_id`` (DistributedSampler's way).
"""

from __future__ import annotations

import hashlib
import math
import struct
import warnings
import zlib
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from crossres.datamodules.resolution import ORIGINAL, ResolutionTransform, check_resolutions
from crossres.errors import CrossresError
from crossres.models.base import PretrainedConfig
from crossres.models.runtime import distributed_info  # noqa: F401  (re-exported)
from crossres.types import FaceBatch

PAPER_RESOLUTIONS = (16, 24, 64, 256)

# what PIL and the decoders raise on a missing, truncated or corrupt image file
READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


def stable_id(key: str) -> int:
    """A non-negative int64 that only depends on ``key`` (blake2b), stable across runs,
    machines and Python versions (unlike ``hash``)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def seeded_order(keys: Sequence[str], seed: int, salt: str = "") -> list[int]:
    """Positions of ``keys`` in a seeded random order that depends on each key alone (so adding
    or removing a file never reshuffles the others), stable across library versions."""
    return sorted(range(len(keys)), key=lambda i: (stable_id(f"{seed}/{salt}/{keys[i]}"), keys[i]))


def split_count(n: int, fraction: float) -> int:
    """How many of an identity's ``n >= 2`` images go to the query split: round(n * fraction)
    clamped to [1, n - 1] so that both splits are non-empty."""
    return min(n - 1, max(1, int(math.floor(n * fraction + 0.5))))


class CorruptImageError(CrossresError, RuntimeError):
    """An image file could not be read or decoded; the message names the file."""


@dataclass
class FaceTable:
    """Column store of source images (cheap for millions of rows): ``paths`` (source file, ""
    where there is none), ``identity`` (class index) and ``sample_id`` (unique, stable)."""

    paths: list[str]
    identity: np.ndarray
    sample_id: np.ndarray

    def __post_init__(self) -> None:
        self.identity = np.asarray(self.identity, dtype=np.int64).reshape(-1)
        self.sample_id = np.asarray(self.sample_id, dtype=np.int64).reshape(-1)
        n = len(self.paths)
        if self.identity.shape[0] != n or self.sample_id.shape[0] != n:
            raise ValueError(
                f"FaceTable columns differ in length: {n} paths, {self.identity.shape[0]} "
                f"identities, {self.sample_id.shape[0]} sample ids"
            )
        if np.unique(self.sample_id).shape[0] != n:
            values, counts = np.unique(self.sample_id, return_counts=True)
            dup = values[counts > 1][:5].tolist()
            raise ValueError(f"sample ids must be unique; repeated: {dup}")

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class FaceItem:
    image: torch.Tensor
    identity: int
    sample_id: int
    resolution: int
    path: str
    low_resolution: torch.Tensor | None = None  # the capture before upsampling, when asked for
    original_size: tuple[int, int] | None = None  # (height, width) of the source image
    reference: torch.Tensor | None = None  # the face at the original resolution, when asked for


@dataclass
class SkippedItem:
    path: str
    error: str


@dataclass
class LoadedFaceBatch(FaceBatch):
    """A ``FaceBatch`` that also names the unreadable files left out of it (``skip_corrupt``)."""

    skipped: list[tuple[str, str]] = field(default_factory=list)


class FaceCollate:
    """Items -> ``LoadedFaceBatch``; skipped items are dropped and listed."""

    def __init__(self, image_shape: tuple[int, int, int]) -> None:
        self.image_shape = tuple(image_shape)

    def __call__(self, items: list[FaceItem | SkippedItem]) -> LoadedFaceBatch:
        faces = [it for it in items if isinstance(it, FaceItem)]
        skipped = [(it.path, it.error) for it in items if isinstance(it, SkippedItem)]
        if faces:
            images = torch.stack([it.image for it in faces])
        else:
            images = torch.zeros((0, *self.image_shape))
        paths = [it.path for it in faces]
        low = faces and faces[0].low_resolution is not None
        return LoadedFaceBatch(
            images=images,
            identity=torch.tensor([it.identity for it in faces], dtype=torch.int64),
            sample_id=torch.tensor([it.sample_id for it in faces], dtype=torch.int64),
            resolution=torch.tensor([it.resolution for it in faces], dtype=torch.int64),
            paths=paths if any(paths) else [],
            low_resolution=[it.low_resolution for it in faces] if low else None,
            original_size=(
                torch.tensor([it.original_size for it in faces], dtype=torch.int64).reshape(-1, 2)
                if low
                else None
            ),
            skipped=skipped,
            reference=(
                torch.stack([it.reference for it in faces])
                if faces and faces[0].reference is not None
                else None
            ),
        )


class FaceImageDataset(Dataset):
    """Every image of ``table`` at every resolution: item ``k`` is image ``k % n`` at resolution
    ``resolutions[k // n]``. Subclasses implement ``load_image(i) -> PIL.Image`` (full decode).

    skip_corrupt: False (default) raises ``CorruptImageError`` naming the file; True yields a
        ``SkippedItem`` that the collate drops and lists in ``LoadedFaceBatch.skipped``.
    ``low_resolution = True`` (attribute) adds each item's low-resolution capture and original
    size (``FaceBatch.low_resolution`` / ``original_size``); ``reference = True`` each face at
    the original resolution (``FaceBatch.reference``).
    """

    low_resolution: bool = False
    reference: bool = False

    def __init__(
        self,
        table: FaceTable,
        *,
        resolutions: Sequence[int | None] = (ORIGINAL,),
        input_size: int | Sequence[int] = 224,
        resize_shortest: int | None = 256,
        skip_corrupt: bool = False,
        manifest_hash: str = "",
    ) -> None:
        self.table = table
        self.resolutions = check_resolutions(resolutions)
        self.transforms = [
            ResolutionTransform(r, input_size=input_size, resize_shortest=resize_shortest)
            for r in self.resolutions
        ]
        self.reference_transform = ResolutionTransform(
            ORIGINAL, input_size=input_size, resize_shortest=resize_shortest
        )
        self.skip_corrupt = skip_corrupt
        self.manifest_hash = manifest_hash  # read by compute_templates to key its cache
        h, w = self.transforms[0].input_size
        self.collate = FaceCollate((3, h, w))

    @abstractmethod
    def load_image(self, i: int) -> Image.Image:
        """Source image ``i`` of the table, fully decoded (PIL decodes lazily otherwise)."""

    def describe_source(self, i: int) -> str:
        return self.table.paths[i] or f"sample {int(self.table.sample_id[i])}"

    def __len__(self) -> int:
        return len(self.table) * len(self.resolutions)

    def __getitem__(self, k: int) -> FaceItem | SkippedItem:
        if not 0 <= k < len(self):
            raise IndexError(f"item {k} out of range for {len(self)} items")
        j, i = divmod(k, len(self.table))
        try:
            img = self.load_image(i)
        except READ_ERRORS as e:
            where = self.describe_source(i)
            if self.skip_corrupt:
                return SkippedItem(where, f"{type(e).__name__}: {e}")
            raise CorruptImageError(
                f"cannot read image {where}: {type(e).__name__}: {e}. Replace or delete the "
                "file, or pass skip_corrupt=True to skip unreadable images (they are counted in "
                "the manifest and the templates cache)"
            ) from e
        low = self.transforms[j].low_resolution(img) if self.low_resolution else None
        image = self.transforms[j](img)
        reference = None
        if self.reference:
            reference = image if self.resolutions[j] == ORIGINAL else self.reference_transform(img)
        return FaceItem(
            image=image,
            identity=int(self.table.identity[i]),
            sample_id=int(self.table.sample_id[i]),
            resolution=self.resolutions[j],
            path=self.table.paths[i],
            low_resolution=low,
            original_size=(img.size[1], img.size[0]) if low is not None else None,
            reference=reference,
        )


class ShardSampler(DistributedSampler):
    """Item ``k`` goes to rank ``k % world_size``, in order, each item exactly once.

    A ``DistributedSampler`` subclass so that Lightning keeps it instead of injecting its own
    (which pads with duplicates). ``pad=True`` pads as DistributedSampler does (ranks then have
    equal lengths; duplicates share a ``sample_id`` and resolution and must be dropped).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        pad: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.pad = pad
        n = len(dataset)  # type: ignore[arg-type]
        if not pad:
            self.total_size = n
            self.num_samples = len(range(self.rank, n, self.num_replicas))

    def __iter__(self):
        n = len(self.dataset)  # type: ignore[arg-type]
        idx = list(range(n))
        if self.pad and self.total_size > n and n > 0:
            extra = self.total_size - n
            idx += (idx * math.ceil(extra / n))[:extra]
        return iter(idx[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


@dataclass(frozen=True)
class OpenSetSplit:
    """The open-set protocol: query identities ``mated`` keep their template; ``non_mated`` are
    left out of the open-set gallery (the paper removes half of the query identities). Query
    identities that have no template at all (e.g. single-photo people) are non-mated too."""

    mated: tuple[int, ...]
    non_mated: tuple[int, ...]

    def __post_init__(self) -> None:
        both = set(self.mated) & set(self.non_mated)
        if both:
            raise ValueError(f"identities both mated and non-mated: {sorted(both)[:5]}")

    def open_gallery_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """True for the gallery templates the open-set gallery keeps."""
        drop = torch.tensor(sorted(self.non_mated), dtype=ids.dtype, device=ids.device)
        return ~torch.isin(ids, drop)


class MultiResolutionDataModule(pl.LightningDataModule):
    """Base of the crossres datamodules.

    ``test_dataloader()``: every query at every resolution in one dataloader (resolution in
    the batch), sharded without duplicates under DDP. ``gallery_dataloader()``: gallery images
    at the original resolution with their identity (not sharded: ``compute_templates`` shards it
    itself). ``train_dataloader()``: the gallery images, shuffled, at the original resolution.

    Attributes the LightningModule reads after ``setup``: ``num_classes``, ``identity_names``
    (class index -> name), ``open_set`` / ``nonmated_identities``, ``query_identities``.

    Subclasses implement ``_prepare()`` (set ``identity_names``, ``open_set``, the query table)
    and ``_make_dataset(table, resolutions)``, and may override ``_gallery_table()``.
    """

    def __init__(
        self,
        resolutions: Sequence[int] = PAPER_RESOLUTIONS,
        batch_size: int = 32,
        num_workers: int = 0,
        input_size: int = 224,
        resize_shortest: int | None = 256,
        pad_shards: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.resolutions = check_resolutions(resolutions)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.input_size = input_size
        self.resize_shortest = resize_shortest
        ResolutionTransform(None, input_size=input_size, resize_shortest=resize_shortest)
        self.pad_shards = bool(pad_shards)
        self.seed = int(seed)
        self.identity_names: list[str] = []
        self.open_set = OpenSetSplit((), ())
        self.manifest_hash = ""
        self._query_table: FaceTable | None = None
        self._gallery: FaceTable | None = None
        self._ready = False
        self.low_resolution_images = False  # see hand_out_low_resolution
        self.reference_images = False  # see hand_out_references

    # ------------------------------------------------------------ for subclasses
    @abstractmethod
    def _prepare(self) -> None:
        """Set ``identity_names``, ``open_set``, ``_query_table`` (and ``manifest_hash``)."""

    @abstractmethod
    def _make_dataset(self, table: FaceTable, resolutions: Sequence[int]) -> FaceImageDataset:
        """A dataset over ``table`` with this datamodule's loader and transform settings."""

    def _gallery_table(self) -> FaceTable:
        if self._gallery is None:
            raise RuntimeError(f"{type(self).__name__} has no gallery table")
        return self._gallery

    # ------------------------------------------------------------ set-up
    def configure_for(self, cfg: PretrainedConfig) -> MultiResolutionDataModule:
        """Take the input size and resize of a model's pretrained config (datasets are built on
        demand, so this applies to every dataloader made afterwards)."""
        self.input_size = tuple(cfg.input_size[1:])  # type: ignore[assignment]
        self.resize_shortest = cfg.resize_shortest
        ResolutionTransform(None, input_size=self.input_size, resize_shortest=self.resize_shortest)
        return self

    def setup(self, stage: str | None = None) -> None:
        if not self._ready:
            self._prepare()
            self._ready = True

    def _require_setup(self) -> None:
        if not self._ready:
            self.setup("test")

    @property
    def num_classes(self) -> int:
        self._require_setup()
        return len(self.identity_names)

    @property
    def nonmated_identities(self) -> list[int]:
        self._require_setup()
        return sorted(self.open_set.non_mated)

    @property
    def query_identities(self) -> list[int]:
        self._require_setup()
        assert self._query_table is not None
        return sorted(set(self._query_table.identity.tolist()))

    @property
    def query_table(self) -> FaceTable:
        self._require_setup()
        assert self._query_table is not None
        return self._query_table

    def gallery_table(self) -> FaceTable:
        self._require_setup()
        return self._gallery_table()

    def hand_out_low_resolution(self) -> None:
        """From now on query batches also carry every sample's low-resolution capture and
        original size (``FaceBatch.low_resolution``/``original_size``), for the callbacks that
        attack in the low-resolution space (they ask in their ``setup``, before the test
        dataloader is made)."""
        self.low_resolution_images = True

    def hand_out_references(self) -> None:
        """From now on query batches also carry every face at the original resolution
        (``FaceBatch.reference``), for the frozen target's feature drift (asked in its
        ``setup``, before the test dataloader is made)."""
        self.reference_images = True

    # ------------------------------------------------------------ datasets and loaders
    def query_dataset(self) -> FaceImageDataset:
        dataset = self._make_dataset(self.query_table, self.resolutions)
        dataset.low_resolution = self.low_resolution_images
        dataset.reference = self.reference_images
        return dataset

    def gallery_dataset(self) -> FaceImageDataset:
        return self._make_dataset(self.gallery_table(), [ORIGINAL])

    def _loader(self, dataset: FaceImageDataset, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=dataset.collate,
            **kwargs,
        )

    def test_dataloader(self) -> DataLoader:
        dataset = self.query_dataset()
        rank, world = distributed_info()
        if world > 1:
            sampler = ShardSampler(dataset, num_replicas=world, rank=rank, pad=self.pad_shards)
            return self._loader(dataset, sampler=sampler)
        return self._loader(dataset, shuffle=False)

    def gallery_dataloader(self) -> DataLoader:
        return self._loader(self.gallery_dataset(), shuffle=False)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator()
        g.manual_seed(self.seed)
        return self._loader(self.gallery_dataset(), shuffle=True, generator=g, drop_last=False)

    # ------------------------------------------------------------ record
    def describe(self) -> dict[str, Any]:
        """What the run used, for the run record."""
        self._require_setup()
        q = self.query_table
        return {
            "datamodule": type(self).__name__,
            "resolutions": list(self.resolutions),
            "input_size": self.input_size,
            "resize_shortest": self.resize_shortest,
            "num_classes": self.num_classes,
            "n_query_images": len(q),
            "n_query_items": len(q) * len(self.resolutions),
            "query_identities": len(self.query_identities),
            "open_set": {
                "mated": len(self.open_set.mated),
                "non_mated": len(self.open_set.non_mated),
            },
            "manifest_hash": self.manifest_hash,
            "seed": self.seed,
        }


def warn_skipped(skipped: Sequence[tuple[str, str]], what: str) -> None:
    if skipped:
        names = ", ".join(p for p, _ in skipped[:5])
        warnings.warn(
            f"{len(skipped)} unreadable image(s) skipped while {what}: {names}"
            + (" ..." if len(skipped) > 5 else ""),
            stacklevel=3,
        )
