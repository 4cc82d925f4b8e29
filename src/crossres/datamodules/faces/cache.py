"""The cache of the embedded faces (``crossres.paths.cache_dir("faces")``): :func:`fetch_faces`
gets what the registries offer, extracts the recorded photos, checks every hash and writes a
manifest of what is present; :func:`load_embedded_faces` reads it back, re-checking the hashes.
Where a source cannot be reached (no apt, say), the fetch says so on stderr and goes on with
what it has.

Crash safety: every file is written atomically (``crossres.io``; archives by the registry
module, into a temporary folder renamed when whole). Photos and archives are checked against
the sha256 in the committed record; the manifest, which the record cannot predict (it lists
only the sources reached), gets a ``manifest.json.sha256`` sidecar. A damaged photo or
manifest is refused by name with ``crossres fetch-faces``, which restores it (a photo from
its verified archive, the manifest by rewriting it, with no download); a damaged archive is
refused by name, to be deleted and fetched again. ``EmbeddedFacesDataModule.prepare_data``
refetches by itself when the manifest is missing or damaged.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from crossres.datamodules.faces.record import (
    FETCH_HINT,
    ArchiveRecord,
    EmbeddedFacesError,
    FacePhoto,
    FacesNotFetchedError,
    HashMismatchError,
    ManifestCorruptError,
    PhotoRecord,
    load_record,
    record_path,
)
from crossres.datamodules.faces.registry import Unreachable, download_archive
from crossres.io import (
    CorruptFileError,
    atomic_write_bytes,
    is_complete,
    sha256_bytes,
    sha256_file,
    verify_file,
)
from crossres.paths import cache_dir
from crossres.phases import mark

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
REBUILD_HINT = "`crossres fetch-faces` (or `make data`), which rewrites it without downloading"


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialise fetches into one cache across processes (POSIX advisory lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(root / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _extract(rec: ArchiveRecord, archive: Path, wanted: dict[str, PhotoRecord], root: Path) -> None:
    """Copy the ``wanted`` members of ``archive`` into the cache, checking each sha256."""
    found = set()
    try:
        with tarfile.open(archive) as tar:
            for info in tar:
                if info.name not in wanted or not info.isfile():
                    continue
                f = tar.extractfile(info)
                if f is None:
                    continue
                data = f.read()
                got = sha256_bytes(data)
                photo = wanted[info.name]
                if got != photo.sha256:
                    raise HashMismatchError(
                        f"{archive} :: {info.name}",
                        got,
                        photo.sha256,
                        "The archive itself matched its recorded hash, so the record is wrong: "
                        "re-run scripts/annotate_embedded_faces.py.",
                    )
                atomic_write_bytes(root / rec.cached_name(info.name), data)
                found.add(info.name)
                if len(found) == len(wanted):
                    break
    except (tarfile.TarError, OSError, EOFError) as e:
        raise EmbeddedFacesError(f"cannot read archive {archive}: {e}") from e
    missing = sorted(set(wanted) - found)
    if missing:
        raise EmbeddedFacesError(
            f"{archive} lacks recorded member(s) {missing[:3]}{' ...' if len(missing) > 3 else ''}"
        )


def _ensure_source(rec: ArchiveRecord, root: Path, log, warn) -> None:
    """Make every recorded photo of ``rec`` present and intact in the cache."""
    todo: dict[str, PhotoRecord] = {}
    for p in rec.photos:
        path = root / rec.cached_name(p.member)
        if not path.exists():
            todo[p.member] = p
            continue
        got = sha256_file(path)
        if got != p.sha256:
            warn(f"cached photo {path} has sha256 {got}, expected {p.sha256}: restoring it")
            todo[p.member] = p
    if not todo:
        return
    mark("fetch")
    archive = root / "archives" / rec.filename
    if archive.exists():
        got = sha256_file(archive)
        if got != rec.sha256:
            raise HashMismatchError(
                archive,
                got,
                rec.sha256,
                f"Delete it and {FETCH_HINT} again to download it afresh.",
            )
    else:
        log(f"fetching {rec.label}")
        download_archive(rec, root / "archives", log=log)
    log(f"  extracting {len(todo)} photo(s) from {rec.filename}")
    _extract(rec, archive, todo, root)


def _photo_entries(rec: ArchiveRecord) -> list[dict]:
    out = []
    for p in rec.photos:
        for i, f in enumerate(p.faces):
            out.append(
                {
                    "path": rec.cached_name(p.member),
                    "source_key": rec.key,
                    "member": p.member,
                    "face": i,
                    "identity": f.identity,
                    "source": f"{rec.label} :: {p.member}",
                    "licence": p.licence,
                    "sha256": p.sha256,
                    "landmarks": None if f.landmarks is None else [list(x) for x in f.landmarks],
                }
            )
    return out


def _resolve_cache(cache: Path | str | None) -> Path:
    if cache is None:
        return cache_dir("faces")
    root = Path(cache)
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch_faces(*, cache: Path | str | None = None, verbose: bool = True) -> Path:
    """Fetch what is reachable, check every hash, write the cached manifest; return its path.

    Idempotent: with everything cached it only re-hashes the cached photos (well under a
    second) and downloads nothing. A source that cannot be reached is reported on stderr
    and left out of the manifest; an archive whose sha256 differs from the record is refused
    with :class:`HashMismatchError`.
    """
    root = _resolve_cache(cache)
    record = load_record()
    record_sha = sha256_file(record_path())

    def log(msg: str) -> None:
        if verbose:
            print(msg, file=sys.stderr)

    def warn(msg: str) -> None:
        print(f"crossres fetch-faces: {msg}", file=sys.stderr)

    sources, photos = [], []
    with _locked(root):
        for rec in record:
            entry = {
                "key": rec.key,
                "kind": rec.kind,
                "package": rec.package,
                "version": rec.version,
                "filename": rec.filename,
                "sha256": rec.sha256,
                "licence": rec.licence,
            }
            try:
                _ensure_source(rec, root, log, warn)
            except Unreachable as e:
                warn(
                    f"{rec.label} unreachable ({e}); going on without its {len(rec.photos)} photos"
                )
                sources.append({**entry, "status": "unreachable", "reason": str(e)})
                continue
            sources.append({**entry, "status": "ok", "reason": ""})
            photos.extend(_photo_entries(rec))
        manifest = {
            "format": MANIFEST_FORMAT,
            "record_sha256": record_sha,
            "sources": sources,
            "photos": photos,
        }
        data = (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
        path = root / MANIFEST_NAME
        if not is_complete(path) or path.read_bytes() != data:
            atomic_write_bytes(path, data, sidecar=True)
    if not photos:
        warn("no source could be reached: the manifest lists no photo")
    return path


# --------------------------------------------------------------------------------------
# Reading the cache


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST_NAME
    if not path.exists():
        raise FacesNotFetchedError(
            f"no embedded faces in {root} (no {MANIFEST_NAME}): {FETCH_HINT} first "
            "(set $CROSSRES_CACHE to use another cache folder)"
        )
    _verify_manifest(root, path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise EmbeddedFacesError(f"unreadable manifest {path} ({e}): {FETCH_HINT} again") from e
    if data.get("format") != MANIFEST_FORMAT:
        raise EmbeddedFacesError(
            f"manifest {path} has format {data.get('format')!r}, expected {MANIFEST_FORMAT}: "
            f"{FETCH_HINT} again"
        )
    return data


def _verify_manifest(root: Path, path: Path) -> None:
    """Check the manifest against its sidecar, and on a mismatch once more under the fetch
    lock: a fetch in another process may be between writing the two files."""
    try:
        verify_file(path, rebuild_hint=REBUILD_HINT)
        return
    except CorruptFileError as e:
        first = str(e)
    try:
        with _locked(root):
            verify_file(path, rebuild_hint=REBUILD_HINT)
    except CorruptFileError as e:
        raise ManifestCorruptError(str(e)) from None
    except OSError:  # a read-only cache cannot be locked: the first verdict stands
        raise ManifestCorruptError(first) from None


def load_manifest(*, cache: Path | str | None = None) -> dict:
    """The cached manifest as a dict (sources with their status, photos)."""
    return _read_manifest(_resolve_cache(cache))


def load_embedded_faces(*, cache: Path | str | None = None, verify: bool = True) -> list[FacePhoto]:
    """Every face the cached manifest lists, in record order.

    Each entry must be in the committed record; with ``verify`` (default) every cached file
    is hashed and compared with the record (a few hundred ms), so a tampered or truncated
    photo stops here with :class:`HashMismatchError`.
    """
    root = _resolve_cache(cache)
    data = _read_manifest(root)
    index = {(r.key, p.member): (r, p) for r in load_record() for p in r.photos}
    hashes: dict[Path, str] = {}
    out = []
    for e in data["photos"]:
        key = (e["source_key"], e["member"])
        if key not in index:
            raise EmbeddedFacesError(
                f"manifest {root / MANIFEST_NAME} lists {e['member']!r} of {e['source_key']!r}, "
                f"which the committed record does not: {FETCH_HINT} again"
            )
        rec, photo = index[key]
        face = photo.faces[int(e["face"])]
        path = root / rec.cached_name(photo.member)
        if verify:
            if not path.exists():
                raise EmbeddedFacesError(f"cached photo {path} is missing: {FETCH_HINT} again")
            if path not in hashes:
                hashes[path] = sha256_file(path)
            if hashes[path] != photo.sha256:
                raise HashMismatchError(
                    path,
                    hashes[path],
                    photo.sha256,
                    f"The cache was altered: {FETCH_HINT} to restore it from the verified archive.",
                )
        out.append(
            FacePhoto(
                path=path,
                identity=face.identity,
                source=f"{rec.label} :: {photo.member}",
                licence=photo.licence,
                sha256=photo.sha256,
                landmarks=face.landmarks,
                face=int(e["face"]),
                source_key=rec.key,
            )
        )
    return out


def identities_with_at_least(photos: Iterable[FacePhoto], n: int) -> dict[str, list[FacePhoto]]:
    """Identities with ``n`` or more faces, sorted by name, each with its faces in input order."""
    groups: dict[str, list[FacePhoto]] = {}
    for p in photos:
        groups.setdefault(p.identity, []).append(p)
    return {k: groups[k] for k in sorted(groups) if len(groups[k]) >= n}
