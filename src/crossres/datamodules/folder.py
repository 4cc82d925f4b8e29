"""Your own faces: any folder with one sub-folder of photos per person (LFW's layout, a
company's enrolment set), optionally with a CSV of face boxes or 5-point landmarks
(``folder_layout.py`` has the formats).

Alignment, for the target's input: a photo with landmarks becomes a dlib face chip (the
embedded faces' ``face_chip``: ``dlib.get_face_chip``'s similarity alignment, padding 0.25, as
large as the model's input before its crop); a photo with a box is cropped as VGGFace2 crops
(``vggface2_crop_box``: the box extended by ``crop_margin`` = 0.3, i.e. x1.3); any other photo
goes whole to the resolution pipeline (shortest side to the model's resize, centre crop).
With ``detector="dlib"`` (the ``detect`` extra) a photo the CSV does not annotate gets the
landmarks of its largest face from dlib's detector and shape predictor (``faces/detect.py``,
the procedure that annotated the embedded faces), cached per photo content under
``cache_dir("detections")``; a photo where no face is found is counted and reported like an
unreadable one, never used whole.

Protocol: the one of the embedded faces (``identity_split.py``): every readable photo of an
identity with ``min_images``+ readable photos is split (seeded) into gallery and query photos,
half of those identities (seeded) leave the open-set gallery; identities with fewer readable
photos are non-mated queries (``n_single_queries`` of them) or distractor templates. Nothing is
left out silently: every photo is read once at ``setup``; unreadable ones and identities with
too few photos are counted in a one-line summary, in ``describe()`` and in the query manifest
(``manifest.py``'s format, written once per content to ``cache_dir("manifests")``; its
``content_hash`` keys the gallery-template cache). Class index = position of the folder name in
sorted order; sample id = hash of the relative path and the file's sha256.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

from crossres.datamodules.base import (
    PAPER_RESOLUTIONS,
    READ_ERRORS,
    FaceImageDataset,
    FaceTable,
    MultiResolutionDataModule,
    OpenSetSplit,
    distributed_info,
    stable_id,
)
from crossres.datamodules.faces.chips import CHIP_PADDING, face_chip
from crossres.datamodules.faces.detect import DlibFaceLandmarks
from crossres.datamodules.folder_layout import (
    IMAGE_SUFFIXES,
    FaceAnnotation,
    FolderLayoutError,
    list_identities,
    read_annotations,
)
from crossres.datamodules.identity_split import check_split_arguments, split_identities
from crossres.datamodules.manifest import QueryManifest, QueryRecord, digest_lines
from crossres.datamodules.resolution import ResolutionTransform
from crossres.datamodules.vggface2_crop import vggface2_crop_box
from crossres.errors import ConfigValueError
from crossres.io import atomic_write_json, is_complete, sha256_file
from crossres.paths import cache_dir

__all__ = ["IMAGE_SUFFIXES", "FolderFacesDataModule", "FolderFacesDataset", "load_face"]


def _decode(path: str | os.PathLike) -> Image.Image:
    """RGB, fully decoded (truncated files raise here), EXIF orientation applied."""
    with Image.open(path) as im:
        im.load()
        if im.getexif().get(0x0112, 1) != 1:  # EXIF Orientation: coordinates assume it
            im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


def load_face(
    path: str | os.PathLike,
    annotation: FaceAnnotation | None,
    *,
    crop_margin: float,
    chip_size: int,
    chip_padding: float = CHIP_PADDING,
) -> Image.Image:
    """One photo aligned as the module docstring says (chip, VGGFace2 crop, or whole)."""
    img = _decode(path)
    if annotation is None:
        return img
    if annotation.landmarks is not None:
        chip = face_chip(
            np.asarray(img), annotation.landmarks, size=chip_size, padding=chip_padding
        )
        return Image.fromarray(chip)
    assert annotation.box is not None
    return img.crop(vggface2_crop_box(annotation.box, img.size, crop_margin))


class FolderFacesDataset(FaceImageDataset):
    """Photos under ``root`` (table paths relative to it), aligned by ``load_face``."""

    def __init__(
        self,
        table: FaceTable,
        *,
        root: str | os.PathLike,
        annotations: Mapping[str, FaceAnnotation],
        crop_margin: float,
        chip_size: int,
        chip_padding: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(table, **kwargs)
        self.root = Path(root)
        self.annotations = annotations
        self.crop_margin = crop_margin
        self.chip_size = chip_size
        self.chip_padding = chip_padding

    def describe_source(self, i: int) -> str:
        return str(self.root / self.table.paths[i])

    def load_image(self, i: int) -> Image.Image:
        rel = self.table.paths[i]
        return load_face(
            self.root / rel,
            self.annotations.get(rel),
            crop_margin=self.crop_margin,
            chip_size=self.chip_size,
            chip_padding=self.chip_padding,
        )


class FolderFacesDataModule(MultiResolutionDataModule):
    """Faces in ``root/<identity>/<image>`` (see the module docstring).

    annotations: CSV of face boxes or landmarks (paths relative to ``root``), or None.
    crop_margin: VGGFace2's box extension (0.3) for photos with a box.
    chip_size: side of the landmark chips; None: the model's resize (or input) side.
    min_images: readable photos an identity needs to be split into gallery and query photos.
    query_fraction, max_queries_per_identity, n_single_queries, max_distractors: the split
        (``identity_split.py``).
    detector: "none" (default) or "dlib": find the landmarks of photos the CSV does not
        annotate (needs ``pip install 'crossres[detect]'``).
    manifest: where to write the query manifest; None: ``cache_dir("manifests")``, named by
        its content hash.
    verbose: print the one-line summary at ``setup`` (rank 0).
    """

    def __init__(
        self,
        root: str,
        *,
        annotations: str | None = None,
        detector: Literal["none", "dlib"] = "none",
        crop_margin: float = 0.3,
        chip_size: int | None = None,
        chip_padding: float = CHIP_PADDING,
        min_images: int = 2,
        query_fraction: float = 0.5,
        max_queries_per_identity: int | None = None,
        n_single_queries: int = 0,
        max_distractors: int | None = None,
        manifest: str | None = None,
        verbose: bool = True,
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
        check_split_arguments(
            query_fraction=query_fraction,
            n_single_queries=n_single_queries,
            max_queries_per_identity=max_queries_per_identity,
            max_distractors=max_distractors,
            min_images=min_images,
        )
        if crop_margin < 0:
            raise ValueError(f"crop_margin must be >= 0, got {crop_margin}")
        if detector not in ("none", "dlib"):
            raise ConfigValueError(f"detector must be 'none' or 'dlib', got {detector!r}")
        if (chip_size is not None and chip_size < 1) or chip_padding < 0:
            raise ValueError(
                f"chip_size must be >= 1 or None and chip_padding >= 0, got {chip_size}, "
                f"{chip_padding}"
            )
        self.root = Path(root).expanduser().resolve()
        self.annotations_path = Path(annotations).expanduser().resolve() if annotations else None
        self.detector = detector
        self.crop_margin = float(crop_margin)
        self.chip_size = chip_size
        self.chip_padding = float(chip_padding)
        self.min_images = int(min_images)
        self.query_fraction = float(query_fraction)
        self.max_queries_per_identity = max_queries_per_identity
        self.n_single_queries = int(n_single_queries)
        self.max_distractors = max_distractors
        self.manifest = manifest
        self.verbose = bool(verbose)
        self.annotations: dict[str, FaceAnnotation] = {}
        self._finder: DlibFaceLandmarks | None = None
        self._detected: dict[str, Any] = {}  # photo sha256 -> landmarks (None: no face)
        self._new_detections = 0
        self.loaded_manifest: QueryManifest | None = None
        self.manifest_file: Path | None = None
        self.summary = ""
        self._report: dict[str, Any] = {}

    # ------------------------------------------------------------ alignment
    def face_chip_size(self) -> int:
        """The landmark chips' side: ``chip_size``, else the model's resize or input side."""
        if self.chip_size is not None:
            return int(self.chip_size)
        if self.resize_shortest is not None:
            return int(self.resize_shortest)
        size = ResolutionTransform(None, input_size=self.input_size, resize_shortest=None)
        return max(size.input_size)

    def _scan_one(self, rel: str) -> tuple[str, str | None]:
        """(sha256, None) for a photo that loads and aligns, ("", error) otherwise; with the
        detector, a photo without annotation gets its detected landmarks first."""
        path = self.root / rel
        try:
            digest = sha256_file(path)
            if self._finder is not None and rel not in self.annotations:
                found = self._detected.get(digest, False)
                if found is False:  # not in the cache
                    found = self._finder(np.asarray(_decode(path)))
                    self._detected[digest] = found
                    self._new_detections += 1
                if found is None:
                    return "", "no face found by dlib's detector (annotate it in the CSV)"
                self.annotations[rel] = FaceAnnotation(landmarks=tuple(map(tuple, found)))
            load_face(
                path,  # not the bytes read: PIL's errors would name a BytesIO's address
                self.annotations.get(rel),
                crop_margin=self.crop_margin,
                chip_size=self.face_chip_size(),
                chip_padding=self.chip_padding,
            )
        except READ_ERRORS as e:
            return "", f"{type(e).__name__}: {e}"
        return digest, None

    def _detection_cache(self) -> Path:
        assert self._finder is not None
        return cache_dir("detections") / f"dlib-{self._finder.version}.json"

    def _load_detections(self) -> dict[str, Any]:
        """The detections cache (photo sha256 -> landmarks or None); a damaged one is
        ignored: detecting again is the rebuild."""
        path = self._detection_cache()
        if not is_complete(path):
            return {}
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return {}

    # ------------------------------------------------------------ set-up
    def _prepare(self) -> None:
        listing = list_identities(self.root)
        files = [f for fs in listing.values() for f in fs]
        self.annotations = {}
        if self.annotations_path is not None:
            self.annotations = read_annotations(self.annotations_path, self.root)
            unknown = sorted(set(self.annotations) - set(files))
            if unknown:
                raise FolderLayoutError(
                    f"{self.annotations_path} names {len(unknown)} image(s) not under "
                    f"{self.root}: {', '.join(unknown[:5])}"
                    + (" ..." if len(unknown) > 5 else "")
                    + " (paths are relative to the root, e.g. identity/photo.jpg)"
                )
        self._finder = DlibFaceLandmarks() if self.detector == "dlib" else None
        annotated = set(self.annotations)
        self._detected = self._load_detections() if self._finder is not None else {}
        self._new_detections = 0
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            scanned = dict(zip(files, pool.map(self._scan_one, files), strict=True))
        if self._new_detections and distributed_info()[0] == 0:
            atomic_write_json(self._detection_cache(), self._detected, sidecar=True)
        unreadable = [(f, err) for f, (_, err) in scanned.items() if err is not None]
        sha = {f: s for f, (s, err) in scanned.items() if err is None}
        groups = {n: [f for f in fs if f in sha] for n, fs in listing.items()}
        detected = set(self.annotations) - annotated
        split = split_identities(
            {n: fs for n, fs in groups.items() if fs},
            seed=self.seed,
            query_fraction=self.query_fraction,
            max_queries_per_identity=self.max_queries_per_identity,
            n_single_queries=self.n_single_queries,
            max_distractors=self.max_distractors,
            min_images=self.min_images,
            source=f"the face folder {self.root}",
            hint=f" (readable photos; {len(unreadable)} unreadable)",
        )
        self.identity_names = sorted(listing)
        index = {n: i for i, n in enumerate(self.identity_names)}

        def sample_id(f: str) -> int:
            return stable_id(f"folder/{f}/{sha[f]}")

        def table(pairs: list[tuple[str, str]]) -> FaceTable:
            return FaceTable(
                paths=[f for _, f in pairs],
                identity=np.array([index[n] for n, _ in pairs], dtype=np.int64),
                sample_id=np.array([sample_id(f) for _, f in pairs], dtype=np.int64),
            )

        self._query_table, self._gallery = table(split.query), table(split.gallery)
        self.open_set = OpenSetSplit(
            mated=tuple(sorted(index[n] for n in split.mated)),
            non_mated=tuple(sorted(index[n] for n in split.non_mated)),
        )
        use = {n: "non-mated query" for n in split.single_queries}
        use.update({n: "distractor" for n in split.distractors})
        bad = {n: sum(f not in sha for f in fs) for n, fs in listing.items()}
        too_few = [
            {
                "identity": n,
                "images": len(groups[n]),
                "unreadable": bad[n],
                "use": use.get(n, "unused"),
            }
            for n in self.identity_names
            if len(groups[n]) < self.min_images
        ]
        manifest = QueryManifest(
            dataset="folder",
            root=str(self.root),
            seed=self.seed,
            n_identities=len(set(self._query_table.identity.tolist())),
            n_images=len(self._query_table),
            query_fraction=self.query_fraction,
            model_hashes=[],  # the queries are every query-split photo: no model selects them
            num_classes=len(self.identity_names),
            class_ids_digest=digest_lines(self.identity_names),
            crop=self._crop_settings(),
            queries=[
                QueryRecord(
                    path=f,
                    class_id=n,
                    identity=index[n],
                    sample_id=sample_id(f),
                    box=list(a.box) if (a := self.annotations.get(f)) and a.box else None,
                )
                for n, f in split.query
            ],
            open_set={
                "mated": list(self.open_set.mated),
                "non_mated": list(self.open_set.non_mated),
            },
            gallery={
                "n_images": len(split.gallery),
                "digest": digest_lines(sorted(f"{f} {sha[f]}" for _, f in split.gallery)),
            },
            skipped=[{"path": f, "error": e} for f, e in unreadable],
            rejected_identities=too_few,
        )
        self.loaded_manifest = manifest
        self.manifest_hash = manifest.content_hash()
        used = [f for _, f in split.query + split.gallery]
        aligned = {"landmarks": 0, "box": 0, "whole": 0, "detected": 0}
        for f in used:
            a = self.annotations.get(f)
            aligned[a.kind if a else "whole"] += 1
            aligned["detected"] += f in detected
        self._report = {
            "n_files": len(files),
            "n_readable": len(sha),
            "unreadable": len(unreadable),
            "too_few": len(too_few),
            "non_mated_singles": len(split.single_queries),
            "distractors": len(split.distractors),
            "unused_singles": len(split.unused_singles),
            "aligned": aligned,
        }
        rank, _ = distributed_info()
        if rank == 0:
            self.manifest_file = self._write_manifest(manifest)
        self.summary = self._summary()
        if self.verbose and rank == 0:
            print(self.summary, flush=True)

    def _crop_settings(self) -> dict[str, Any]:
        detector = {"detector": f"dlib {self._finder.version}"} if self._finder else {}
        return {
            **detector,  # absent without one: manifests written before it keep their hash
            "margin": self.crop_margin,
            "chip": [self.chip_size, self.chip_padding],
            "annotations": str(self.annotations_path) if self.annotations_path else None,
            "annotations_sha256": (
                sha256_file(self.annotations_path) if self.annotations_path else None
            ),
        }

    def _write_manifest(self, manifest: QueryManifest) -> Path:
        if self.manifest is not None:
            return manifest.save(Path(self.manifest).expanduser())
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.root.name)[:40]
        path = cache_dir("manifests") / (
            f"folder-{name}-seed{self.seed}-{self.manifest_hash[:16]}.json"
        )
        # a damaged cached copy (sidecar check) is rewritten: it is computed above anyway
        return path if is_complete(path) else manifest.save(path)

    def _summary(self) -> str:
        r, q, g = self._report, self._query_table, self._gallery
        assert q is not None and g is not None  # called at the end of _prepare
        return (
            f"face folder {self.root}: {len(self.identity_names)} identities, {r['n_files']} "
            f"photos; {len(q)} queries ({len(set(q.identity.tolist()))} identities), "
            f"{len(g)} gallery photos; {r['unreadable']} unreadable photo(s) "
            f"skipped; {r['too_few']} identit(ies) with fewer than {self.min_images} readable "
            f"photos ({r['non_mated_singles']} non-mated queries, {r['distractors']} "
            f"distractors, {r['unused_singles']} unused); aligned by landmarks "
            f"{r['aligned']['landmarks']} ({r['aligned']['detected']} detected), by box "
            f"{r['aligned']['box']}, whole "
            f"{r['aligned']['whole']}; manifest {self.manifest_file or '(rank 0 writes it)'}"
        )

    # ------------------------------------------------------------ datasets
    def _make_dataset(self, table: FaceTable, resolutions: Sequence[int]) -> FolderFacesDataset:
        return FolderFacesDataset(
            table,
            root=self.root,
            annotations=self.annotations,
            crop_margin=self.crop_margin,
            chip_size=self.face_chip_size(),
            chip_padding=self.chip_padding,
            resolutions=resolutions,
            input_size=self.input_size,
            resize_shortest=self.resize_shortest,
            manifest_hash=self.manifest_hash,
        )

    # ------------------------------------------------------------ record
    def describe(self) -> dict[str, Any]:
        """The run record: counts, what was skipped and why, and the manifest."""
        d = super().describe()
        m = self.loaded_manifest
        assert m is not None
        d.update(
            root=str(self.root),
            annotations=str(self.annotations_path) if self.annotations_path else None,
            manifest=str(self.manifest_file) if self.manifest_file else None,
            n_files=self._report["n_files"],
            n_readable=self._report["n_readable"],
            n_gallery_images=len(self.gallery_table()),
            aligned=dict(self._report["aligned"]),
            unreadable={"count": len(m.skipped), "files": [dict(s) for s in m.skipped]},
            too_few={
                "count": len(m.rejected_identities),
                "min_images": self.min_images,
                "identities": [dict(r) for r in m.rejected_identities],
            },
            summary=self.summary,
        )
        return d
