"""The committed record of the embedded faces (``crossres/data/embedded_faces.json``): for
every source archive its registry package, version, file name and sha256, and for every photo
used from it the member path, identity, licence, sha256 and dlib 5-point landmarks (computed
once by ``scripts/annotate_embedded_faces.py``, so a run needs no dlib); and the errors about
the faces."""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from crossres.errors import CrossresError, NotPreparedError
from crossres.io import CorruptFileError

RECORD_FORMAT = 1
FETCH_HINT = "run `crossres fetch-faces` (or `make data`)"


class EmbeddedFacesError(CrossresError, RuntimeError):
    """The embedded faces are missing, incomplete or do not match the committed record."""


class FacesNotFetchedError(EmbeddedFacesError, NotPreparedError):
    """No manifest in the cache: the faces were never fetched there."""


class ManifestCorruptError(EmbeddedFacesError, CorruptFileError):
    """The cache's manifest does not match its sha256 sidecar (damaged, or a write stopped
    before the sidecar); ``crossres fetch-faces`` rewrites it."""


class HashMismatchError(EmbeddedFacesError):
    """A file's sha256 differs from the committed record."""

    def __init__(self, path: Path | str, got: str, expected: str, what_to_do: str) -> None:
        self.path, self.got, self.expected = Path(path), got, expected
        super().__init__(
            f"sha256 mismatch for {path}: it is {got}, the committed record "
            f"({record_path()}) says {expected}. {what_to_do}"
        )


@dataclass(frozen=True)
class FacePhoto:
    """One face of one cached photo (a multi-face photo gives several, told apart by ``face``)."""

    path: Path
    identity: str
    source: str
    licence: str
    sha256: str
    landmarks: tuple[tuple[float, float], ...] | None
    face: int = 0
    source_key: str = ""


@dataclass(frozen=True)
class FaceRecord:
    identity: str
    landmarks: tuple[tuple[float, float], ...] | None
    note: str = ""


@dataclass(frozen=True)
class PhotoRecord:
    member: str
    sha256: str
    licence: str
    faces: tuple[FaceRecord, ...]


@dataclass(frozen=True)
class ArchiveRecord:
    """One registry archive and the photos the project uses from it."""

    key: str
    kind: str  # "debian-source" or "pypi-sdist"
    package: str
    version: str
    filename: str
    sha256: str
    size: int
    licence: str
    photos: tuple[PhotoRecord, ...]

    @property
    def label(self) -> str:
        if self.kind == "debian-source":
            return f"debian-src {self.package} {self.version} {self.filename}"
        return f"pypi sdist {self.package}=={self.version}"

    def cached_name(self, member: str) -> str:
        """Cache path of a member, relative to the cache root (ASCII, no spaces)."""
        inner = member.split("/", 1)[1] if "/" in member else member
        return f"photos/{self.key}/{_ascii_path(inner)}"


def _ascii_path(path: str) -> str:
    folded = unicodedata.normalize("NFKD", path).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^A-Za-z0-9._/+-]+", "_", folded)


def record_path() -> Path:
    """The committed record shipped inside the package."""
    return Path(str(resources.files("crossres") / "data" / "embedded_faces.json"))


def _landmarks(value: object, where: str) -> tuple[tuple[float, float], ...] | None:
    if value is None:
        return None
    pts = np.asarray(value, dtype=np.float64)
    if pts.shape != (5, 2) or not np.isfinite(pts).all():
        raise EmbeddedFacesError(
            f"{where}: landmarks must be 5 finite (x, y) points, got {value!r}"
        )
    return tuple((float(x), float(y)) for x, y in pts)


def load_record(path: Path | str | None = None) -> list[ArchiveRecord]:
    """Parse the committed record (or another file with its layout)."""
    path = Path(path) if path is not None else record_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise EmbeddedFacesError(f"cannot read the embedded-faces record {path}: {e}") from e
    if data.get("format") != RECORD_FORMAT:
        raise EmbeddedFacesError(
            f"{path}: record format {data.get('format')!r}, this crossres reads {RECORD_FORMAT}"
        )
    out = []
    for s in data["sources"]:
        photos = []
        for p in s["photos"]:
            where = f"{path} :: {s['key']} :: {p['member']}"
            faces = tuple(
                FaceRecord(f["identity"], _landmarks(f.get("landmarks"), where), f.get("note", ""))
                for f in p["faces"]
            )
            photos.append(PhotoRecord(p["member"], p["sha256"], p["licence"], faces))
        out.append(
            ArchiveRecord(
                key=s["key"],
                kind=s["kind"],
                package=s["package"],
                version=s["version"],
                filename=s["filename"],
                sha256=s["sha256"],
                size=int(s.get("size", 0)),
                licence=s.get("licence", ""),
                photos=tuple(photos),
            )
        )
    return out
