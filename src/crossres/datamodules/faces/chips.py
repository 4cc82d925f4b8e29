"""Face chips exactly as ``dlib.get_face_chip`` makes them (dlib/image_transforms/
interpolation.h), in numpy: :func:`load_chip` aligns a face of a cached photo."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from crossres.datamodules.faces.record import EmbeddedFacesError, FacePhoto

# Size and padding of the chips in Debian's examples/johns (dlib's face-recognition convention).
CHIP_SIZE = 150
CHIP_PADDING = 0.25


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
