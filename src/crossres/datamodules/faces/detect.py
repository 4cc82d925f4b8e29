"""Finding the face and its 5 landmarks in a photo that comes without them (the ``detect``
extra: ``pip install 'crossres[detect]'`` installs the ``dlib-bin`` wheel).

The procedure is the one that annotated the embedded faces (``scripts/annotate_embedded_faces
.py`` uses this class): dlib's HOG frontal-face detector on a copy scaled to at most 1000 px
(one upsampling), dlib's CNN detector (``mmod_human_face_detector.dat``, confidence > 0.5) when
HOG finds nothing, boxes scaled back, and the 5-point shape predictor
(``shape_predictor_5_face_landmarks.dat``) on the full-resolution photo. Both model files ship
in the ``face-recognition-models`` package crossres already depends on for dlib's embedder.
The landmarks are dlib's order, what ``chips.face_chip`` aligns with.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from crossres.errors import CrossresError
from crossres.models.dlib_cache import packaged_dlib_model_path

__all__ = ["MAX_DETECTION_SIDE", "DlibFaceLandmarks", "Landmarks"]

Landmarks = tuple[tuple[float, float], ...]
MAX_DETECTION_SIDE = 1000  # px: detection runs on a copy no larger (speed; faces stay findable)
CNN_CONFIDENCE = 0.5


def _dlib() -> Any:
    try:
        import dlib
    except ImportError as e:
        raise CrossresError(
            "detector='dlib' needs dlib: pip install 'crossres[detect]' (the dlib-bin wheel), "
            "or give the photos' boxes or landmarks in an annotations CSV"
        ) from e
    return dlib


class DlibFaceLandmarks:
    """``finder(rgb)`` -> the 5 landmarks of the largest face in an HxWx3 uint8 RGB photo, or
    None when no face is found. ``boxes`` and ``landmarks`` are the two steps. Thread-safe
    (dlib's detectors are not: calls are serialised)."""

    def __init__(self) -> None:
        dlib = _dlib()
        self._dlib = dlib
        self.models = Path(packaged_dlib_model_path()).parent
        self.hog = dlib.get_frontal_face_detector()
        self.cnn = dlib.cnn_face_detection_model_v1(
            str(self.models / "mmod_human_face_detector.dat")
        )
        self.predictor = dlib.shape_predictor(
            str(self.models / "shape_predictor_5_face_landmarks.dat")
        )
        self.version = str(dlib.__version__)
        self._lock = threading.Lock()

    def boxes(self, img: np.ndarray) -> list[Any]:
        """Face boxes (``dlib.rectangle``) in full-resolution coordinates."""
        h, w = img.shape[:2]
        s = min(1.0, MAX_DETECTION_SIDE / max(h, w))
        small = img
        if s < 1.0:
            small = np.asarray(
                Image.fromarray(img).resize((round(w * s), round(h * s)), Image.BILINEAR)
            )
        with self._lock:
            found = [(r.left(), r.top(), r.right(), r.bottom()) for r in self.hog(small, 1)]
            if not found:
                found = [
                    (d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom())
                    for d in self.cnn(small, 1)
                    if d.confidence > CNN_CONFIDENCE
                ]
        return [self._dlib.rectangle(*(round(v / s) for v in b)) for b in found]

    def landmarks(self, img: np.ndarray, box: Any) -> Landmarks:
        with self._lock:
            shape = self.predictor(img, box)
        return tuple((float(shape.part(i).x), float(shape.part(i).y)) for i in range(5))

    def __call__(self, img: np.ndarray) -> Landmarks | None:
        found: Sequence[Any] = self.boxes(img)
        if not found:
            return None
        return self.landmarks(img, max(found, key=lambda b: b.area()))
