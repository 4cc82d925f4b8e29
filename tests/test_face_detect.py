"""The ``detect`` extra: dlib's detector and 5-point predictor find the landmarks of photos that
come without them. Reference: the landmarks recorded for the embedded faces, which
``scripts/annotate_embedded_faces.py`` computed with the same procedure (now this class) and
the dlib of the record; then a ``FolderFacesDataModule(detector="dlib")`` on whole photos
must align every face exactly as the recorded landmarks do."""

from __future__ import annotations

import random
import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from crossres.datamodules.embedded_sources import load_embedded_faces, read_rgb
from crossres.datamodules.folder import FolderFacesDataModule, load_face
from crossres.datamodules.folder_layout import FaceAnnotation
from crossres.errors import CrossresError

dlib = pytest.importorskip("dlib", reason="the test extra installs dlib-bin")
from crossres.datamodules.faces.detect import DlibFaceLandmarks  # noqa: E402

PEOPLE = ("Barack_Obama", "Emmanuel_Macron", "Jacinda_Ardern")  # whole photos, 2+ each


def one_face_photos():
    faces = load_embedded_faces()
    per_photo = Counter(str(p.path) for p in faces)
    return [p for p in faces if p.landmarks is not None and per_photo[str(p.path)] == 1]


def recorded(p) -> tuple:
    return tuple((float(x), float(y)) for x, y in p.landmarks)


@pytest.fixture(scope="module")
def finder() -> DlibFaceLandmarks:
    return DlibFaceLandmarks()


def test_detector_finds_the_recorded_landmarks_exactly(finder):
    photos = one_face_photos()
    sample = random.Random(0).sample(photos, 24)  # of 624; all 40 of a seed-0 draw measured equal
    for p in sample:
        assert finder(read_rgb(p.path)) == recorded(p), p.path


def test_a_photo_without_a_face_gives_none(finder):
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    assert finder(noise) is None


def test_folder_datamodule_detects_aligns_caches_and_reports(tmp_path, monkeypatch):
    photos = one_face_photos()  # from the faces cache, before the test's own cache is set
    monkeypatch.setenv("CROSSRES_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "photos"
    source = {}
    for p in photos:
        if p.identity in PEOPLE:
            (root / p.identity).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p.path, root / p.identity / p.path.name)
            source[f"{p.identity}/{p.path.name}"] = p
    (root / "Nobody_Found").mkdir()
    noise = np.random.default_rng(1).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "Nobody_Found" / "noise.png")

    def make() -> FolderFacesDataModule:
        dm = FolderFacesDataModule(
            root=str(root), detector="dlib", resolutions=[0], input_size=150,
            resize_shortest=None, manifest=str(tmp_path / "manifest.json"), verbose=False,
        )  # fmt: skip
        dm.setup("test")
        return dm

    dm = make()
    d = dm.describe()
    assert d["aligned"]["detected"] == d["aligned"]["landmarks"] == len(source) == 10
    assert [f["path"] for f in d["unreadable"]["files"]] == ["Nobody_Found/noise.png"]
    assert "no face found" in d["unreadable"]["files"][0]["error"]
    assert "10 detected" in dm.summary
    chip = dm.face_chip_size()
    for table in (dm.query_table, dm.gallery_table()):
        dataset = dm._make_dataset(table, [0])
        for i, rel in enumerate(table.paths):
            want = load_face(
                source[rel].path, FaceAnnotation(landmarks=recorded(source[rel])),
                crop_margin=0.3, chip_size=chip,
            )  # fmt: skip
            assert np.array_equal(np.asarray(dataset.load_image(i)), np.asarray(want)), rel
    again = make()  # the second set-up reads the cache: nothing detected anew, same manifest
    assert again._new_detections == 0 and again.manifest_hash == dm.manifest_hash


def test_without_dlib_the_detector_is_one_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_dlib(name, *args, **kwargs):
        if name == "dlib":
            raise ImportError("No module named 'dlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dlib)
    with pytest.raises(CrossresError, match=r"crossres\[detect\]"):
        DlibFaceLandmarks()


def test_unknown_detector_is_refused():
    with pytest.raises(CrossresError, match="detector must be 'none' or 'dlib'"):
        FolderFacesDataModule(root="anywhere", detector="mtcnn")
