"""VGGFace2 as in Massoli et al. (2020): the 8631 training identities, each identity's images
split (seeded) into gallery and query images; 100 identities x 10 query images that the target
classifies correctly at full resolution; half of those identities left out of the open-set
gallery.

Layout (the VGGFace2 release)::

    root/train/<class_id>/<image_id>_<face_id>.jpg     e.g. train/n000002/0001_01.jpg
    root/meta/identity_meta.csv                        Class_ID, Name, Sample_Num, Flag, Gender
    root/bb_landmark/loose_bb_train.csv                NAME_ID, X, Y, W, H (NAME_ID n000002/0001_01)
                                                       (root/meta/bb_landmark/ is accepted too)

Class index = position of the class id among the training identities (Flag 1 in
identity_meta.csv) in sorted order, the order ``senet50_ft``'s classifier uses.

Face crop (``crop_margin=0.3``, the default): VGGFace2's own convention for the crops its models
were trained on (``standard_evaluation/demo_proj.m`` of ox-vgg/vgg_face2, also stated in the
VGGFace2 model README: "bounding box extended by a factor 0.3 ... to include the whole head"):
around the centre of the face box (x, y, w, h), a region of height ``h * (1 + margin)`` and
width ``max(w, h * 112/128) * (1 + margin)``, clipped at the image border, corners rounded to
the nearest pixel. VGGFace2 detects that box with MTCNN; we take it from
``loose_bb_train.csv`` (the released face boxes in the released images, 0-based pixels, top-left
corner and size). ``crop_margin=None`` uses the released loose crops as they are (no box file
needed). The resolution pipeline then works on this crop (its shortest side is the resolution).

Split: an identity's images are put in a seeded random order that depends on each file name
alone; the first ``round(n * query_fraction)`` (clamped to [1, n - 1]) form the query split, the
rest the gallery. An identity with a single image has no query split (gallery only); an identity
folder with no image is an error.

Query selection (``select_queries``) runs once: identities in a seeded order, each identity's
query-split images in their seeded order, keeping those that every target model classifies
correctly at full resolution until ``n_images`` are found; identities with fewer are passed
over (listed in the manifest as ``rejected_identities``). The manifest (``manifest.py``)
freezes the outcome.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from crossres.datamodules.base import (
    PAPER_RESOLUTIONS,
    FaceImageDataset,
    FaceTable,
    MultiResolutionDataModule,
    OpenSetSplit,
    SkippedItem,
    seeded_order,
    split_count,
    stable_id,
    warn_skipped,
)
from crossres.datamodules.manifest import (
    QueryManifest,
    QueryRecord,
    digest_lines,
    model_hash,
)
from crossres.models.base import FaceModel
from crossres.paths import cache_dir

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LAYOUT = (
    "expected the VGGFace2 release layout under root: train/<class_id>/<image>.jpg, "
    "meta/identity_meta.csv and bb_landmark/loose_bb_train.csv"
)


class VGGFace2LayoutError(FileNotFoundError):
    """A file or folder of the VGGFace2 layout is missing or malformed."""


def read_identity_meta(path: str | os.PathLike) -> dict[str, tuple[str, int]]:
    """``identity_meta.csv`` -> {class_id: (name, flag)} (flag 1 = training identity).

    Tolerates the spaces after the commas and names holding commas (quoted or not): the class
    id is the first field and Sample_Num, Flag, Gender the last three.
    """
    path = Path(path)
    if not path.is_file():
        raise VGGFace2LayoutError(f"VGGFace2 identity metadata not found: {path}; {LAYOUT}")
    out: dict[str, tuple[str, int]] = {}
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = csv.reader(f, skipinitialspace=True)
        header = next(rows, None)
        if not header or header[0].strip().lstrip("\ufeff") != "Class_ID":
            raise VGGFace2LayoutError(
                f"{path}: expected the header 'Class_ID, Name, Sample_Num, Flag, Gender', got {header}"
            )
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) < 5:
                raise VGGFace2LayoutError(f"{path}, line {line}: expected 5 fields, got {row}")
            try:
                flag = int(row[-2].strip())
            except ValueError as e:
                raise VGGFace2LayoutError(
                    f"{path}, line {line}: Flag {row[-2]!r} is not 0/1"
                ) from e
            name = ",".join(row[1:-3]).strip().strip('"')
            out[row[0].strip()] = (name, flag)
    return out


def read_boxes(path: str | os.PathLike, wanted: Sequence[str]) -> np.ndarray:
    """Rows of ``loose_bb_train.csv`` for ``wanted`` NAME_IDs (e.g. "n000002/0001_01"), as a
    float32 array [len(wanted), 4] of (x, y, w, h). Streams the file; a missing name is an error."""
    path = Path(path)
    if not path.is_file():
        raise VGGFace2LayoutError(f"VGGFace2 face boxes not found: {path}; {LAYOUT}")
    where = {name: i for i, name in enumerate(wanted)}
    boxes = np.full((len(wanted), 4), np.nan, dtype=np.float32)
    with open(path, newline="") as f:
        rows = csv.reader(f, skipinitialspace=True)
        header = next(rows, None)
        if not header or [h.strip().lstrip("\ufeff") for h in header[:5]] != [
            "NAME_ID",
            "X",
            "Y",
            "W",
            "H",
        ]:
            raise VGGFace2LayoutError(f"{path}: expected the header NAME_ID,X,Y,W,H, got {header}")
        for line, row in enumerate(rows, start=2):
            i = where.get(row[0]) if row else None
            if i is None:
                continue
            try:
                boxes[i] = [float(v) for v in row[1:5]]
            except ValueError as e:
                raise VGGFace2LayoutError(f"{path}, line {line}: bad box {row}") from e
    missing = [wanted[i] for i in np.flatnonzero(np.isnan(boxes).any(1))[:5]]
    if missing:
        raise VGGFace2LayoutError(f"{path} has no box for {missing} (and maybe others)")
    return boxes


def vggface2_crop_box(
    box: Sequence[float], image_size: tuple[int, int], margin: float = 0.3
) -> tuple[int, int, int, int]:
    """PIL crop box (left, top, right, bottom) of VGGFace2's tight crop around face ``box``
    (x, y, w, h) in an image of ``image_size`` (width, height): see the module docstring."""
    x, y, w, h = (float(v) for v in box)
    if not (w > 0 and h > 0):
        raise ValueError(f"face box {tuple(box)} has no area")
    cx, cy = x + w / 2, y + h / 2
    width = max(w, h * 112 / 128) * (1 + margin)
    height = h * (1 + margin)
    W, H = image_size

    def rnd(v: float) -> int:  # MATLAB's round: halves away from zero
        return int(math.floor(v + 0.5)) if v >= 0 else -int(math.floor(-v + 0.5))

    left, top = max(0, rnd(cx - width / 2)), max(0, rnd(cy - height / 2))
    right, bottom = min(W, rnd(cx + width / 2)), min(H, rnd(cy + height / 2))
    if right <= left or bottom <= top:
        raise ValueError(f"face box {tuple(box)} lies outside the {W}x{H} image")
    return left, top, right, bottom


@dataclass
class BoxedFaceTable(FaceTable):
    """A ``FaceTable`` whose rows also carry a face box (x, y, w, h), or None for no crop."""

    boxes: np.ndarray | None = None


class VGGFace2Dataset(FaceImageDataset):
    """Images under ``image_dir`` (paths relative to it), cropped as VGGFace2 does."""

    def __init__(
        self,
        table: BoxedFaceTable,
        *,
        image_dir: str | os.PathLike,
        crop_margin: float | None = 0.3,
        **kwargs,
    ) -> None:
        super().__init__(table, **kwargs)
        if crop_margin is not None and table.boxes is None:
            raise ValueError("crop_margin is set but the table has no face boxes")
        self.image_dir = Path(image_dir)
        self.crop_margin = crop_margin

    def describe_source(self, i: int) -> str:
        return str(self.image_dir / self.table.paths[i])

    def load_image(self, i: int) -> Image.Image:
        with Image.open(self.image_dir / self.table.paths[i]) as f:
            img = f.convert("RGB")  # full decode: truncated files raise here
        if self.crop_margin is not None:
            box = self.table.boxes[i]  # type: ignore[index]
            img = img.crop(vggface2_crop_box(box, img.size, self.crop_margin))
        return img


def _name_id(relpath: str) -> str:
    """ "n000002/0001_01.jpg" -> "n000002/0001_01" (the NAME_ID of the box file)."""
    return os.path.splitext(relpath)[0]


class VGGFace2DataModule(MultiResolutionDataModule):
    """The paper's VGGFace2 protocol (see the module docstring).

    root: the folder holding ``train/``, ``meta/`` and ``bb_landmark/``.
    manifest: the query manifest file; None: ``cache_dir("manifests")/vggface2-...json``, named
        by the root, the selection settings and the target models' weights hashes.
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
        self._listing: dict[str, list[str]] | None = None
        self._splits: dict[str, tuple[list[str], list[str]]] = {}

    # ------------------------------------------------------------ layout
    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def meta_path(self) -> Path:
        return self.root / "meta" / "identity_meta.csv"

    @property
    def boxes_path(self) -> Path:
        for p in (self.root / "bb_landmark", self.root / "meta" / "bb_landmark"):
            if (p / "loose_bb_train.csv").is_file():
                return p / "loose_bb_train.csv"
        return self.root / "bb_landmark" / "loose_bb_train.csv"

    def _read_classes(self) -> None:
        if not self.train_dir.is_dir():
            raise VGGFace2LayoutError(
                f"VGGFace2 image folder not found: {self.train_dir}; {LAYOUT}"
            )
        meta = read_identity_meta(self.meta_path)
        self.class_ids = sorted(c for c, (_, flag) in meta.items() if flag == 1)
        if not self.class_ids:
            raise VGGFace2LayoutError(f"{self.meta_path} lists no training identity (Flag 1)")
        self.identity_names = [meta[c][0] for c in self.class_ids]
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
            present = {d.name for d in os.scandir(self.train_dir) if d.is_dir()}
            missing = [c for c in self.class_ids if c not in present]
            if missing:
                raise VGGFace2LayoutError(
                    f"{len(missing)} training identities of {self.meta_path} have no folder in "
                    f"{self.train_dir} (e.g. {missing[:5]}); the class index must follow the "
                    f"{len(self.class_ids)}-class order the model was trained on: restore them"
                )
            extra = sorted(present - set(self.class_ids))
            if extra:
                raise VGGFace2LayoutError(
                    f"{self.train_dir} holds folders that are not training identities in "
                    f"{self.meta_path}: {extra[:5]}"
                )
            out = {}
            for c in self.class_ids:
                files = sorted(
                    f"{c}/{e.name}"
                    for e in os.scandir(self.train_dir / c)
                    if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)
                )
                if not files:
                    raise VGGFace2LayoutError(
                        f"identity {c} has no image in {self.train_dir / c}: every training "
                        "identity needs at least one image for its gallery template"
                    )
                out[c] = files
            self._listing = out
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
            boxes = read_boxes(self.boxes_path, [_name_id(f) for f in files])
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

    def default_manifest_path(self, models: Sequence[nn.Module]) -> Path:
        key = "|".join(
            [str(self.root), repr(sorted(self._settings().items()))]
            + sorted(model_hash(m) for m in models)
        )
        tag = hashlib.sha256(key.encode()).hexdigest()[:16]
        return (
            cache_dir("manifests")
            / f"vggface2-{self.n_identities}x{self.n_images}-seed{self.seed}-{tag}.json"
        )

    def _target_models(self) -> list[FaceModel]:
        """The models the attached LightningModule holds (``models`` dict or ``model``)."""
        lm = getattr(getattr(self, "trainer", None), "lightning_module", None)
        if lm is None:
            return []
        held = getattr(lm, "models", None)
        if isinstance(held, (nn.ModuleDict, dict)):
            return [m for m in held.values() if isinstance(m, FaceModel)]
        one = getattr(lm, "model", None)
        return [one] if isinstance(one, FaceModel) else []

    def _resolve_manifest_path(self, models: Sequence[nn.Module]) -> Path | None:
        if self.manifest is not None:
            return Path(self.manifest).expanduser()
        if self._manifest_path is not None:
            return self._manifest_path
        return self.default_manifest_path(models) if models else None

    def prepare_data(self) -> None:
        """Runs the query selection once (Lightning calls this on one process per node, before
        ``setup`` on every process) when no manifest exists and the LightningModule holds the
        target model(s)."""
        models = self._target_models()
        path = self._resolve_manifest_path(models)
        if path is None or path.is_file() or not models:
            return
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else None
        self.select_queries(models, device=device, path=path)

    def select_queries(
        self,
        models: FaceModel | Sequence[FaceModel],
        *,
        device: torch.device | str | None = None,
        path: str | os.PathLike | None = None,
    ) -> QueryManifest:
        """Select the queries with the target model(s) and write the manifest (see module doc).

        A query image must be classified correctly at full resolution by every model given, so
        several targets (e.g. Base and CR) share one query set. ``device``: where the models run
        during the selection (their own device by default; restored afterwards).
        """
        models = [models] if isinstance(models, nn.Module) else list(models)
        if not models:
            raise ValueError("select_queries needs at least one model")
        self._read_classes()
        for m in models:
            if m.num_classes != len(self.class_ids):
                raise ValueError(
                    f"{type(m).__name__} classifies {m.num_classes} classes but {self.meta_path} "
                    f"lists {len(self.class_ids)} training identities; query selection needs the "
                    "target's classifier over exactly these identities"
                )
        out_path = Path(path) if path is not None else self._resolve_manifest_path(models)
        assert out_path is not None
        self.listing()  # checks the layout before any model runs
        index = {c: i for i, c in enumerate(self.class_ids)}
        eligible = [c for c in self.class_ids if len(self.split(c)[0]) >= self.n_images]
        if len(eligible) < self.n_identities:
            raise ValueError(
                f"only {len(eligible)} identities have {self.n_images} or more query-split images "
                f"(query_fraction={self.query_fraction}); lower n_identities ({self.n_identities}) "
                "or n_images, or raise query_fraction"
            )
        order = [eligible[i] for i in seeded_order(eligible, self.seed, "identity")]
        states = [(m, m.training, _model_device_of(m)) for m in models]
        run_device = torch.device(device) if device is not None else states[0][2]
        selected: list[QueryRecord] = []
        chosen: list[str] = []
        rejected, skipped = [], []
        try:
            for m, _, _ in states:
                m.eval().to(run_device)
            window = max(2 * self.n_identities, 8)
            pos = 0
            while len(chosen) < self.n_identities and pos < len(order):
                block = order[pos : pos + window]
                pos += window
                cand = {c: self.split(c)[0] for c in block}
                files = [f for c in block for f in cand[c]]
                boxes = (
                    read_boxes(self.boxes_path, [_name_id(f) for f in files])
                    if self.crop_margin is not None
                    else None
                )
                row = {f: i for i, f in enumerate(files)}
                for c in block:
                    if len(chosen) == self.n_identities:
                        break
                    picked, seen = self._select_identity(
                        cand[c], boxes, row, models, run_device, skipped
                    )
                    if len(picked) < self.n_images:
                        rejected.append({"class_id": c, "correct": len(picked), "candidates": seen})
                        continue
                    chosen.append(c)
                    for f in picked:
                        b = boxes[row[f]].tolist() if boxes is not None else None
                        selected.append(
                            QueryRecord(f, c, index[c], stable_id(f"vggface2/{f}"), box=b)
                        )
        finally:
            for m, training, dev in states:
                m.train(training).to(dev)
        if len(chosen) < self.n_identities:
            raise ValueError(
                f"only {len(chosen)} of {len(eligible)} identities have {self.n_images} query "
                f"images that every target classifies correctly at full resolution (needed "
                f"{self.n_identities}); lower n_identities/n_images or check the weights"
            )
        warn_skipped(skipped, "selecting the queries")
        opened = [chosen[i] for i in seeded_order(chosen, self.seed, "open-set")]
        non_mated = sorted(index[c] for c in opened[: len(chosen) // 2])
        mated = sorted(index[c] for c in opened[len(chosen) // 2 :])
        gallery_files = [f for c in self.class_ids for f in self.split(c)[1]]
        manifest = QueryManifest(
            root=str(self.root),
            model_hashes=[model_hash(m) for m in models],
            num_classes=len(self.class_ids),
            class_ids_digest=self._class_digest(),
            queries=selected,
            open_set={"mated": mated, "non_mated": non_mated},
            gallery={"n_images": len(gallery_files), "digest": digest_lines(gallery_files)},
            skipped=[{"path": p, "error": e} for p, e in skipped],
            rejected_identities=rejected,
            **self._settings(),
        )
        manifest.save(out_path)
        self._manifest_path = out_path
        return manifest

    def _select_identity(
        self,
        candidates: list[str],
        boxes: np.ndarray | None,
        row: dict[str, int],
        models: list[FaceModel],
        device: torch.device,
        skipped: list[tuple[str, str]],
    ) -> tuple[list[str], int]:
        """The first ``n_images`` candidates (in order) every model classifies correctly."""
        picked: list[str] = []
        seen = 0
        step = max(self.batch_size, self.n_images)
        for start in range(0, len(candidates), step):
            chunk = candidates[start : start + step]
            table = self._table(
                chunk, boxes=boxes[[row[f] for f in chunk]] if boxes is not None else None
            )
            ds = self._make_dataset(table, [0])
            items = [ds[i] for i in range(len(ds))]
            for f, it in zip(chunk, items, strict=True):
                if isinstance(it, SkippedItem):
                    skipped.append((f, it.error))
            batch = ds.collate(items)
            seen += len(items)
            if len(batch) == 0:
                continue
            x = batch.images.to(device)
            ok = torch.ones(len(batch), dtype=torch.bool, device=device)
            with torch.no_grad():
                for m in models:
                    ok &= m(x).argmax(1) == batch.identity.to(device)
            good = [p for p, k in zip(batch.paths, ok.tolist(), strict=True) if k]
            picked.extend(good[: self.n_images - len(picked)])
            if len(picked) == self.n_images:
                break
        return picked, seen

    # ------------------------------------------------------------ set-up
    def _prepare(self) -> None:
        self._read_classes()
        models = self._target_models()
        path = self._resolve_manifest_path(models)
        if path is None:
            raise FileNotFoundError(
                "VGGFace2DataModule has no query manifest: give manifest=<file>, or run "
                "select_queries(model) once, or attach a LightningModule holding the target "
                "model so that prepare_data selects the queries"
            )
        manifest = QueryManifest.load(path)
        self._check_manifest(manifest, path, models)
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

    def _check_manifest(
        self, manifest: QueryManifest, path: Path, models: Sequence[nn.Module]
    ) -> None:
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
        for m in models:
            h = model_hash(m)
            if h not in manifest.model_hashes:
                raise ValueError(
                    f"manifest {path} was selected with the models {manifest.model_hashes}, not "
                    f"with {type(m).__name__} (weights {h}); select the queries again for it"
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


def _model_device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
