"""The VGGFace2 release on disk: where its files are and how to read them.

Layout::

    root/train/<class_id>/<image_id>_<face_id>.jpg     e.g. train/n000002/0001_01.jpg
    root/meta/identity_meta.csv                        Class_ID, Name, Sample_Num, Flag, Gender
    root/bb_landmark/loose_bb_train.csv                NAME_ID, X, Y, W, H (NAME_ID n000002/0001_01)
                                                       (root/meta/bb_landmark/ is accepted too)

Class index = position of the class id among the training identities (Flag 1 in
identity_meta.csv) in sorted order, the order ``senet50_ft``'s classifier uses.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crossres.errors import CrossresError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LAYOUT = (
    "expected the VGGFace2 release layout under root: train/<class_id>/<image>.jpg, "
    "meta/identity_meta.csv and bb_landmark/loose_bb_train.csv"
)


class VGGFace2LayoutError(CrossresError, FileNotFoundError):
    """A file or folder of the VGGFace2 layout is missing or malformed."""


def train_dir(root: Path) -> Path:
    return root / "train"


def meta_path(root: Path) -> Path:
    return root / "meta" / "identity_meta.csv"


def boxes_path(root: Path) -> Path:
    """``bb_landmark/loose_bb_train.csv`` (or under ``meta/``, where some copies put it)."""
    for p in (root / "bb_landmark", root / "meta" / "bb_landmark"):
        if (p / "loose_bb_train.csv").is_file():
            return p / "loose_bb_train.csv"
    return root / "bb_landmark" / "loose_bb_train.csv"


def name_id(relpath: str) -> str:
    """ "n000002/0001_01.jpg" -> "n000002/0001_01" (the NAME_ID of the box file)."""
    return os.path.splitext(relpath)[0]


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


def training_classes(root: Path) -> tuple[list[str], list[str]]:
    """(sorted class ids of the training identities, their names) from identity_meta.csv."""
    if not train_dir(root).is_dir():
        raise VGGFace2LayoutError(f"VGGFace2 image folder not found: {train_dir(root)}; {LAYOUT}")
    meta = read_identity_meta(meta_path(root))
    class_ids = sorted(c for c, (_, flag) in meta.items() if flag == 1)
    if not class_ids:
        raise VGGFace2LayoutError(f"{meta_path(root)} lists no training identity (Flag 1)")
    return class_ids, [meta[c][0] for c in class_ids]


def list_images(root: Path, class_ids: Sequence[str]) -> dict[str, list[str]]:
    """{class_id: sorted image paths relative to train/} for every training identity; the
    folders must be exactly the training identities, each with at least one image."""
    images = train_dir(root)
    present = {d.name for d in os.scandir(images) if d.is_dir()}
    missing = [c for c in class_ids if c not in present]
    if missing:
        raise VGGFace2LayoutError(
            f"{len(missing)} training identities of {meta_path(root)} have no folder in "
            f"{images} (e.g. {missing[:5]}); the class index must follow the "
            f"{len(class_ids)}-class order the model was trained on: restore them"
        )
    extra = sorted(present - set(class_ids))
    if extra:
        raise VGGFace2LayoutError(
            f"{images} holds folders that are not training identities in "
            f"{meta_path(root)}: {extra[:5]}"
        )
    out = {}
    for c in class_ids:
        files = sorted(
            f"{c}/{e.name}"
            for e in os.scandir(images / c)
            if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)
        )
        if not files:
            raise VGGFace2LayoutError(
                f"identity {c} has no image in {images / c}: every training "
                "identity needs at least one image for its gallery template"
            )
        out[c] = files
    return out
