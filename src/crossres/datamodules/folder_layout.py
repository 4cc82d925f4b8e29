"""What a folder of faces holds: ``root/<identity>/**/<image>`` (LFW's layout), and the optional
CSV of face boxes or dlib 5-point landmarks that says where each face is.

CSV rows (a header line is allowed; blank lines and lines starting with ``#`` are skipped):
- ``path,x,y,w,h``: a face box (top-left corner and size, pixels);
- ``path,x1,y1,...,x5,y5``: dlib's 5 landmarks in ``shape_predictor_5_face_landmarks`` order
  (outer then inner corner of the eye on the image's right, outer then inner corner of the
  other eye, the base of the nose), as the embedded faces carry them.
``path`` is relative to the root (``identity/file.jpg``); coordinates are in the image as it
is shown (its EXIF orientation applied), 0-based.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from crossres.errors import CrossresError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
LAYOUT = "expected root/<identity>/<image> files (.jpg, .jpeg, .png, .bmp, .webp), LFW's layout"


class FolderLayoutError(CrossresError):
    """The folder or its annotations CSV is not what the folder datamodule reads."""


@dataclass(frozen=True)
class FaceAnnotation:
    """Where the face is in one image: a box (x, y, w, h) or the 5 landmarks, never both."""

    box: tuple[float, float, float, float] | None = None
    landmarks: tuple[tuple[float, float], ...] | None = None

    @property
    def kind(self) -> str:
        return "landmarks" if self.landmarks is not None else "box"


def _hidden(rel: PurePosixPath) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def list_identities(root: str | os.PathLike) -> dict[str, list[str]]:
    """{identity: sorted image paths relative to ``root`` (posix)} of every identity folder.

    ``FolderLayoutError`` naming the path for a missing root, a root without identity folders,
    images lying directly in the root, or an identity folder holding no image at all. Hidden
    files and folders (``.name``) are not part of the data.
    """
    root = Path(root)
    if not root.is_dir():
        raise FolderLayoutError(f"face folder not found: {root}; {LAYOUT}")
    stray = sorted(
        p.name
        for p in root.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if stray:
        raise FolderLayoutError(
            f"{len(stray)} image(s) lie directly in {root} (e.g. {stray[0]}), outside any "
            f"identity folder; {LAYOUT}"
        )
    out: dict[str, list[str]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            rel.as_posix()
            for p in d.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES
            and not _hidden(rel := PurePosixPath(p.relative_to(root).as_posix()))
            and p.is_file()
        )
        if not files:
            raise FolderLayoutError(f"identity folder {d} holds no image; {LAYOUT}")
        out[d.name] = files
    if not out:
        raise FolderLayoutError(f"face folder {root} holds no identity folder; {LAYOUT}")
    return out


def _number(text: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise FolderLayoutError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise FolderLayoutError(f"{where}: {text!r} is not a finite number")
    return v


def _relative(path: str, root: Path) -> str:
    p = PurePosixPath(path.strip().replace("\\", "/"))
    if p.is_absolute():
        try:
            p = PurePosixPath(Path(p).resolve().relative_to(root.resolve()).as_posix())
        except ValueError:
            return path.strip()  # outside the root: reported as an unknown path
    return p.as_posix()


def read_annotations(path: str | os.PathLike, root: str | os.PathLike) -> dict[str, FaceAnnotation]:
    """{image path relative to ``root``: its face} from the CSV (module docstring's format).

    ``FolderLayoutError`` naming the file and line for a row that is neither format, a number
    that is not one, a box without area, or a path listed twice.
    """
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise FolderLayoutError(f"face annotations CSV not found: {path}")
    out: dict[str, FaceAnnotation] = {}
    with path.open(newline="", encoding="utf-8-sig") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            row = [c.strip() for c in row]
            if not row or not any(row) or row[0].startswith("#"):
                continue
            where = f"{path}, line {line}"
            if len(row) not in (5, 11):
                raise FolderLayoutError(
                    f"{where}: {len(row)} columns; expected path,x,y,w,h (a face box) or path "
                    "and 10 numbers (dlib's 5 landmarks)"
                )
            if line == 1 and not any(_is_number(c) for c in row[1:]):
                continue  # a header
            numbers = [_number(c, where) for c in row[1:]]
            rel = _relative(row[0], root)
            if rel in out:
                raise FolderLayoutError(f"{where}: {rel} is listed twice")
            if len(numbers) == 4:
                if not (numbers[2] > 0 and numbers[3] > 0):
                    raise FolderLayoutError(f"{where}: the face box {numbers} has no area")
                out[rel] = FaceAnnotation(box=tuple(numbers))  # type: ignore[arg-type]
            else:
                pts = tuple((numbers[i], numbers[i + 1]) for i in range(0, 10, 2))
                out[rel] = FaceAnnotation(landmarks=pts)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
