"""VGGFace2 as in Massoli et al. (2020): the 8631 training identities, each identity's images
split (seeded) into gallery and query images; 100 identities x 10 query images that the target
classifies correctly at full resolution; half of those identities left out of the open-set
gallery.

The datamodule only reads: the release's files (``vggface2_layout.py``; crop in
``vggface2_crop.py``) and the query manifest (``manifest.py``) that the query selection
(``query_selection.py``, ``crossres select-queries``; ``crossres test`` runs it when the
manifest is missing) wrote once. Without a manifest, ``setup`` raises ``NotPreparedError``
naming that command.

Split: an identity's images are put in a seeded random order that depends on each file name
alone; the first ``round(n * query_fraction)`` (clamped to [1, n - 1]) form the query split, the
rest the gallery. An identity with a single image has no query split (gallery only); an identity
folder with no image is an error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crossres.datamodules.base import (
    PAPER_RESOLUTIONS,
    FaceTable,
    MultiResolutionDataModule,
    OpenSetSplit,
    seeded_order,
    split_count,
    stable_id,
)
from crossres.datamodules.manifest import SELECT_COMMAND, QueryManifest, digest_lines
from crossres.datamodules.vggface2_crop import BoxedFaceTable, VGGFace2Dataset, vggface2_crop_box
from crossres.datamodules.vggface2_layout import (
    IMAGE_SUFFIXES,
    LAYOUT,
    VGGFace2LayoutError,
    boxes_path,
    list_images,
    meta_path,
    name_id,
    read_boxes,
    read_identity_meta,
    train_dir,
    training_classes,
)
from crossres.errors import NotPreparedError
from crossres.io import sha256_bytes
from crossres.paths import cache_dir

__all__ = [
    "IMAGE_SUFFIXES",
    "LAYOUT",
    "BoxedFaceTable",
    "VGGFace2DataModule",
    "VGGFace2Dataset",
    "VGGFace2LayoutError",
    "read_boxes",
    "read_identity_meta",
    "vggface2_crop_box",
]


class VGGFace2DataModule(MultiResolutionDataModule):
    """The paper's VGGFace2 protocol (see the module docstring).

    root: the folder holding ``train/``, ``meta/`` and ``bb_landmark/``.
    manifest: the query manifest file; None: the one ``use_manifest`` names (``crossres test``
        names ``cache_dir("manifests")/vggface2-...json``, keyed by the root, the selection
        settings and the target models' weights hashes).
    n_identities, n_images: the query set (100 x 10 in the paper).
    query_fraction: share of each identity's images in the query split (the rest: gallery).
    crop_margin: VGGFace2's box extension factor (0.3), or None for the loose crops as they are.
    skip_corrupt: False: an unreadable image stops the run naming the file; True: it is skipped
        and listed (in the manifest during selection, in the templates cache for the gallery).
    """

    def __init__(
        self,
        root: str,
        manifest: str | None = None,
        *,
        n_identities: int = 100,
        n_images: int = 10,
        query_fraction: float = 0.5,
        crop_margin: float | None = 0.3,
        skip_corrupt: bool = False,
        seed: int = 0,
        resolutions: Sequence[int] = PAPER_RESOLUTIONS,
        batch_size: int = 32,
        num_workers: int = 0,
        input_size: int = 224,
        resize_shortest: int | None = 256,
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
        if n_identities < 1 or n_images < 1:
            raise ValueError(
                f"n_identities and n_images must be >= 1, got {n_identities}, {n_images}"
            )
        if not 0.0 < query_fraction < 1.0:
            raise ValueError(f"query_fraction must be in (0, 1), got {query_fraction}")
        if crop_margin is not None and crop_margin < 0:
            raise ValueError(f"crop_margin must be >= 0 or None, got {crop_margin}")
        self.root = Path(root).expanduser().resolve()
        self.manifest = manifest
        self.n_identities = int(n_identities)
        self.n_images = int(n_images)
        self.query_fraction = float(query_fraction)
        self.crop_margin = crop_margin
        self.skip_corrupt = bool(skip_corrupt)
        self.class_ids: list[str] = []
        self.loaded_manifest: QueryManifest | None = None
        self._manifest_path: Path | None = None
        self._expected_hashes: list[str] = []  # the run's target models (``use_manifest``)
        self._listing: dict[str, list[str]] | None = None
        self._splits: dict[str, tuple[list[str], list[str]]] = {}

    # ------------------------------------------------------------ layout
    @property
    def train_dir(self) -> Path:
        return train_dir(self.root)

    @property
    def meta_path(self) -> Path:
        return meta_path(self.root)

    @property
    def boxes_path(self) -> Path:
        return boxes_path(self.root)

    def _read_classes(self) -> None:
        self.class_ids, self.identity_names = training_classes(self.root)
        if self.crop_margin is not None and not self.boxes_path.is_file():
            raise VGGFace2LayoutError(
                f"VGGFace2 face boxes not found: {self.boxes_path}; {LAYOUT} "
                "(or pass crop_margin=None to use the loose crops without boxes)"
            )

    def _class_digest(self) -> str:
        return digest_lines(self.class_ids)

    def listing(self) -> dict[str, list[str]]:
        """{class_id: sorted image paths relative to train/} for every training identity."""
        if self._listing is None:
            if not self.class_ids:
                self._read_classes()
            self._listing = list_images(self.root, self.class_ids)
        return self._listing

    def split(self, class_id: str) -> tuple[list[str], list[str]]:
        """(query-split images in their seeded order, gallery images sorted) of one identity."""
        if class_id not in self._splits:
            files = self.listing()[class_id]
            if len(files) < 2:
                self._splits[class_id] = ([], list(files))
            else:
                order = [files[i] for i in seeded_order(files, self.seed, "split")]
                k = split_count(len(files), self.query_fraction)
                self._splits[class_id] = (order[:k], sorted(order[k:]))
        query, gallery = self._splits[class_id]
        return list(query), list(gallery)

    def _gallery_files(self) -> list[str]:
        return [f for c in self.class_ids for f in self.split(c)[1]]

    # ------------------------------------------------------------ datasets
    def _make_dataset(self, table: FaceTable, resolutions: Sequence[int]) -> VGGFace2Dataset:
        assert isinstance(table, BoxedFaceTable)
        return VGGFace2Dataset(
            table,
            image_dir=self.train_dir,
            crop_margin=self.crop_margin,
            resolutions=resolutions,
            input_size=self.input_size,
            resize_shortest=self.resize_shortest,
            skip_corrupt=self.skip_corrupt,
            manifest_hash=self.manifest_hash,
        )

    def _table(self, files: list[str], *, boxes: np.ndarray | None = None) -> BoxedFaceTable:
        index = {c: i for i, c in enumerate(self.class_ids)}
        if self.crop_margin is not None and boxes is None:
            boxes = read_boxes(self.boxes_path, [name_id(f) for f in files])
        return BoxedFaceTable(
            paths=list(files),
            identity=np.array([index[f.split("/", 1)[0]] for f in files], dtype=np.int64),
            sample_id=np.array([stable_id(f"vggface2/{f}") for f in files], dtype=np.int64),
            boxes=boxes,
        )

    def _gallery_table(self) -> FaceTable:
        if self._gallery is None:
            assert self.loaded_manifest is not None
            files = self._gallery_files()
            expected = self.loaded_manifest.gallery
            if digest_lines(files) != expected["digest"]:
                raise ValueError(
                    f"the gallery under {self.train_dir} ({len(files)} images) differs from the one "
                    f"the manifest {self._manifest_path} was made from ({expected['n_images']} "
                    "images): the dataset changed since the selection; restore it or select the "
                    "queries again (delete the manifest)"
                )
            # the full train set: ~2.9 M paths and boxes (the box file is read once, ~0.5 GB
            # while it is); only needed when the templates are not cached yet
            self._gallery = self._table(files)
        return self._gallery

    # ------------------------------------------------------------ manifest
    def _settings(self) -> dict:
        return {
            "dataset": "vggface2",
            "seed": self.seed,
            "n_identities": self.n_identities,
            "n_images": self.n_images,
            "query_fraction": self.query_fraction,
            "crop": {"margin": self.crop_margin},
        }

    def default_manifest_path(self, model_hashes: Sequence[str]) -> Path:
        """``cache_dir("manifests")/vggface2-...json``, named by the root, the selection
        settings and the hashes of the models that select the queries."""
        key = "|".join(
            [str(self.root), repr(sorted(self._settings().items()))] + sorted(model_hashes)
        )
        tag = sha256_bytes(key.encode())[:16]
        return (
            cache_dir("manifests")
            / f"vggface2-{self.n_identities}x{self.n_images}-seed{self.seed}-{tag}.json"
        )

    def manifest_path(self, model_hashes: Sequence[str] = ()) -> Path | None:
        """The manifest this datamodule reads: the one given (``manifest`` or ``use_manifest``),
        else the default one of ``model_hashes`` (None without any)."""
        if self.manifest is not None:
            return Path(self.manifest).expanduser()
        if self._manifest_path is not None:
            return self._manifest_path
        return self.default_manifest_path(model_hashes) if model_hashes else None

    def use_manifest(self, path: str | os.PathLike, *, model_hashes: Sequence[str] = ()) -> None:
        """Read the queries from ``path`` at ``setup``; ``model_hashes``: the target models of
        the run, which must be among those the manifest was selected with."""
        if self._ready:
            raise RuntimeError("use_manifest must come before setup")
        self._manifest_path = Path(path)
        self._expected_hashes = list(model_hashes)

    # ------------------------------------------------------------ set-up
    def _prepare(self) -> None:
        self._read_classes()
        path = self.manifest_path()
        if path is None:
            raise NotPreparedError(
                "VGGFace2DataModule has no query manifest: give manifest=<file>, or select the "
                f"queries first with `{SELECT_COMMAND}` (the run's YAML)"
            )
        manifest = QueryManifest.load(path)
        self._check_manifest(manifest, path)
        self.loaded_manifest = manifest
        self._manifest_path = path
        self.manifest_hash = manifest.content_hash()
        q = manifest.queries
        boxes = None
        if self.crop_margin is not None:
            if any(r.box is None for r in q):
                raise ValueError(f"manifest {path} has queries without face boxes")
            boxes = np.array([r.box for r in q], dtype=np.float32).reshape(-1, 4)
        index = {c: i for i, c in enumerate(self.class_ids)}
        for r in q:
            if index.get(r.class_id) != r.identity:
                raise ValueError(
                    f"manifest {path}: query {r.path} has class index {r.identity} but "
                    f"{r.class_id} is class {index.get(r.class_id)} here"
                )
        self._query_table = BoxedFaceTable(
            paths=[r.path for r in q],
            identity=np.array([r.identity for r in q], dtype=np.int64),
            sample_id=np.array([r.sample_id for r in q], dtype=np.int64),
            boxes=boxes,
        )
        self.open_set = OpenSetSplit(
            tuple(manifest.open_set["mated"]), tuple(manifest.open_set["non_mated"])
        )

    def _check_manifest(self, manifest: QueryManifest, path: Path) -> None:
        mine = self._settings()
        for key, value in mine.items():
            theirs = getattr(manifest, key)
            if theirs != value:
                raise ValueError(
                    f"manifest {path} was made with {key}={theirs!r}, this datamodule has "
                    f"{key}={value!r}; use matching settings or another manifest"
                )
        if (
            manifest.num_classes != len(self.class_ids)
            or manifest.class_ids_digest != self._class_digest()
        ):
            raise ValueError(
                f"manifest {path} was made for other identities ({manifest.num_classes} classes) "
                f"than {self.meta_path} lists ({len(self.class_ids)})"
            )
        for h in self._expected_hashes:
            if h not in manifest.model_hashes:
                raise ValueError(
                    f"manifest {path} was selected with the models {manifest.model_hashes}, not "
                    f"with the target of weights {h}; select the queries again for it"
                )

    def describe(self) -> dict:
        d = super().describe()
        d.update(
            root=str(self.root),
            manifest=str(self._manifest_path) if self._manifest_path else None,
            model_hashes=self.loaded_manifest.model_hashes if self.loaded_manifest else [],
            skipped=len(self.loaded_manifest.skipped) if self.loaded_manifest else 0,
        )
        return d
