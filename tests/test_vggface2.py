"""VGGFace2 on a tiny fake tree (real JPEG files, meta and box CSVs): selection -> manifest ->
loading -> gallery, end to end, and the bad-input cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from crossres.datamodules.base import CorruptImageError, seeded_order
from crossres.datamodules.manifest import QueryManifest, model_hash
from crossres.datamodules.query_selection import prepare_queries, select_queries
from crossres.datamodules.resolution import ResolutionTransform
from crossres.datamodules.vggface2 import (
    VGGFace2DataModule,
    VGGFace2LayoutError,
    read_identity_meta,
    vggface2_crop_box,
)
from crossres.io import atomic_write_text
from crossres.models.base import FaceModel, PretrainedConfig
from crossres.models.templates import compute_templates

COLORS = np.array(
    [[220, 40, 40], [40, 200, 40], [40, 40, 220], [210, 210, 40], [210, 40, 210], [40, 210, 210]],
    dtype=np.float64,
)
CLASS_IDS = [f"n{i:06d}" for i in (2, 3, 5, 8, 13, 21)]  # sorted, with gaps as in VGGFace2
SMALL = dict(input_size=32, resize_shortest=36, resolutions=[8, 16, 0], batch_size=8)


class ColourNet(FaceModel):
    """Conv + linear: the feature is the mean colour (1x1 conv, global mean); the classifier
    picks the nearest identity colour (logits 2 f.c - |c|^2)."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__(
            PretrainedConfig(
                input_size=(3, 32, 32), resize_shortest=36, feature_dim=3, num_classes=6
            )
        )
        self.conv = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(3, 6)
        p = torch.tensor(COLORS / 255.0, dtype=torch.float32) * 0.6 + 0.5 * 0.4  # face share ~0.6
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.conv.bias.fill_(shift)
            self.fc.weight.copy_(2 * p)
            self.fc.bias.copy_(-(p**2).sum(1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)


def write_face(
    path: Path, colour: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    img = 128 + rng.normal(0, 12, (h, w, 3))
    x, y, bw, bh = box
    img[y : y + bh, x : x + bw] = colour + rng.normal(0, 10, (bh, bw, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=95)


def make_tree(root: Path, n_images: int = 8) -> Path:
    (root / "meta").mkdir(parents=True)
    (root / "bb_landmark").mkdir()
    meta = ["Class_ID, Name, Sample_Num, Flag, Gender"]
    boxes = ['"NAME_ID","X","Y","W","H"']
    for k, cid in enumerate(CLASS_IDS):
        name = '"Smith, John"' if k == 1 else f'"Person_{k}"'
        meta.append(f"{cid}, {name}, {n_images}, 1, m")
        (root / "train" / cid).mkdir(parents=True)
        for j in range(n_images):
            stem = f"{j + 1:04d}_01"
            size = (56 + 3 * j, 64 + 2 * j)
            box = (8 + j, 10, 34, 40)
            write_face(root / "train" / cid / f"{stem}.jpg", COLORS[k], box, size, seed=100 * k + j)
            boxes.append(f'"{cid}/{stem}",{box[0]},{box[1]},{box[2]},{box[3]}')
    meta.append('n000034, "Test_Only", 5, 0, f')  # a test-set identity: not a class
    (root / "meta" / "identity_meta.csv").write_text("\n".join(meta) + "\n")
    (root / "bb_landmark" / "loose_bb_train.csv").write_text("\n".join(boxes) + "\n")
    return root


def recolour(root: Path, relpath: str, k: int) -> None:
    """Give an image the colour of identity ``k`` (a face the model gets wrong)."""
    with Image.open(root / "train" / relpath) as im:
        size = im.size
    write_face(root / "train" / relpath, COLORS[k], (8, 10, 34, 40), size, seed=7)


def selected(dm: VGGFace2DataModule, model: FaceModel) -> QueryManifest:
    """The query selection step, and the manifest it wrote."""
    return QueryManifest.load(select_queries(dm, model))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "vggface2")


def test_identity_meta_and_crop_box_conventions(tree):
    meta = read_identity_meta(tree / "meta" / "identity_meta.csv")
    assert meta["n000003"] == ("Smith, John", 1) and meta["n000034"] == ("Test_Only", 0)
    # demo_proj.m by hand: centre (30, 45), width max(40, 50 * 112/128) * 1.3 = 56.875,
    # height 65; corners rounded half away from zero
    assert vggface2_crop_box((10, 20, 40, 50), (100, 100)) == (2, 13, 58, 78)
    # a wide box keeps its width; clipped at the image border
    assert vggface2_crop_box((0, 0, 80, 40), (70, 200)) == (0, 0, 70, 46)
    assert vggface2_crop_box((10, 20, 40, 50), (100, 100), margin=0.0) == (8, 20, 52, 70)


def test_selection_manifest_loading_and_gallery_end_to_end(tree, tmp_path):
    model = ColourNet()
    dm = VGGFace2DataModule(
        str(tree), str(tmp_path / "m.json"), n_identities=5, n_images=3, **SMALL
    )
    dm._read_classes()
    assert dm.class_ids == CLASS_IDS and dm.identity_names[1] == "Smith, John"
    # identities are examined in a seeded order: the first loses two of its four query
    # candidates (too few left: passed over), the second loses its first candidate
    order = [CLASS_IDS[i] for i in seeded_order(CLASS_IDS, 0, "identity")]
    rejected, one_wrong = order[0], order[1]
    wrong = dm.split(one_wrong)[0][0]
    recolour(tree, wrong, (CLASS_IDS.index(one_wrong) + 1) % 6)
    for f in dm.split(rejected)[0][:2]:
        recolour(tree, f, (CLASS_IDS.index(rejected) + 1) % 6)

    manifest = selected(dm, model)
    on_disk = json.loads((tmp_path / "m.json").read_text())
    assert on_disk["model_hashes"] == [model_hash(model)] and on_disk["seed"] == 0
    assert manifest.rejected_identities == [{"class_id": rejected, "correct": 2, "candidates": 4}]
    chosen = sorted({q.class_id for q in manifest.queries})
    assert chosen == [c for c in CLASS_IDS if c != rejected]
    paths = [q.path for q in manifest.queries]
    assert len(paths) == 15 == len(set(paths)) and wrong not in paths
    for q in manifest.queries:
        assert q.path in dm.split(q.class_id)[0] and q.identity == CLASS_IDS.index(q.class_id)
    assert len(manifest.open_set["non_mated"]) == 2 and len(manifest.open_set["mated"]) == 3
    assert sorted(manifest.open_set["non_mated"] + manifest.open_set["mated"]) == sorted(
        CLASS_IDS.index(c) for c in chosen
    )

    # the same selection again gives the same manifest content
    again = VGGFace2DataModule(
        str(tree), str(tmp_path / "m2.json"), n_identities=5, n_images=3, **SMALL
    )
    assert selected(again, model).content_hash() == manifest.content_hash()

    # a later run (another process) only reads the manifest
    run = VGGFace2DataModule(
        str(tree), str(tmp_path / "m.json"), n_identities=5, n_images=3, **SMALL
    )
    run.setup("test")
    assert run.num_classes == 6 and run.manifest_hash == manifest.content_hash()
    assert run.nonmated_identities == manifest.open_set["non_mated"]
    seen = []
    for b in run.test_dataloader():
        assert b.images.shape[1:] == (3, 32, 32)
        assert all(p.startswith("n0000") for p in b.paths)
        seen += list(zip(b.sample_id.tolist(), b.resolution.tolist(), strict=True))
        with torch.no_grad():  # every query is classified correctly at full resolution
            full = b.resolution == 0
            assert (model(b.images[full]).argmax(1) == b.identity[full]).all()
    assert len(seen) == len(set(seen)) == 15 * 3

    # gallery: every identity's non-query-split images, templates = mean feature of them
    gallery = run.gallery_table()
    assert len(gallery) == 6 * 4 and not set(gallery.paths) & set(paths)
    g = compute_templates(
        model, run.gallery_dataloader(), num_classes=run.num_classes, cache=tmp_path / "t"
    )
    assert g.ids.tolist() == list(range(6)) and g.manifest_hash == run.manifest_hash
    boxes = {
        line.split(",")[0].strip('"'): [float(v) for v in line.split(",")[1:]]
        for line in (tree / "bb_landmark" / "loose_bb_train.csv").read_text().splitlines()[1:]
    }
    prep = ResolutionTransform(0, input_size=32, resize_shortest=36)
    for k, cid in enumerate(CLASS_IDS):
        files = [p for p in gallery.paths if p.startswith(cid)]
        feats = []
        for p in files:
            with Image.open(tree / "train" / p) as im:
                im = im.convert("RGB")
                crop = im.crop(vggface2_crop_box(boxes[p[:-4]], im.size))
            feats.append(model.features(prep(crop)[None])[0])
        torch.testing.assert_close(
            g.features[k], torch.stack(feats).mean(0).detach(), rtol=1e-5, atol=1e-6
        )
    assert (model.classify(g.features).argmax(1) == g.ids).all()


def test_prepare_queries_selects_once_and_other_weights_are_refused(tree, tmp_path, monkeypatch):
    # what `crossres test` runs before testing: select when the manifest is missing
    monkeypatch.setenv("CROSSRES_CACHE", str(tmp_path / "cache"))
    model = ColourNet()
    dm = VGGFace2DataModule(str(tree), n_identities=3, n_images=2, **SMALL)
    prepare_queries(dm, [model], device=torch.device("cpu"))
    written = list((tmp_path / "cache" / "manifests").glob("vggface2-3x2-seed0-*.json"))
    assert len(written) == 1
    dm.setup("test")
    assert len(dm.query_table) == 6

    # the same model in another process finds the same manifest
    mtime = written[0].stat().st_mtime_ns
    dm2 = VGGFace2DataModule(str(tree), n_identities=3, n_images=2, **SMALL)
    assert prepare_queries(dm2, [model]) == written[0]
    dm2.setup("test")
    assert dm2.manifest_hash == dm.manifest_hash
    assert written[0].stat().st_mtime_ns == mtime  # selected once

    # other weights with that manifest: refused
    other = ColourNet(shift=0.01)
    dm3 = VGGFace2DataModule(str(tree), str(written[0]), n_identities=3, n_images=2, **SMALL)
    prepare_queries(dm3, [other])
    with pytest.raises(ValueError, match="selected with the models"):
        dm3.setup("test")
    # other settings with that manifest: refused, naming the setting
    dm4 = VGGFace2DataModule(
        str(tree), str(written[0]), n_identities=3, n_images=2, seed=1, **SMALL
    )
    with pytest.raises(ValueError, match="seed=0.*seed=1"):
        dm4.setup("test")


def test_corrupt_query_candidate_stops_or_is_skipped_and_counted(tree, tmp_path):
    dm = VGGFace2DataModule(
        str(tree), str(tmp_path / "m.json"), n_identities=6, n_images=2, **SMALL
    )
    dm._read_classes()
    garbage = dm.split(CLASS_IDS[0])[0][0]
    (tree / "train" / garbage).write_bytes(b"this is not a JPEG")
    truncated = dm.split(CLASS_IDS[1])[0][0]
    data = (tree / "train" / truncated).read_bytes()
    (tree / "train" / truncated).write_bytes(data[: len(data) // 2])
    model = ColourNet()
    with pytest.raises(
        CorruptImageError, match=r"cannot read image .*n0000(02|03)/.*skip_corrupt=True"
    ):
        selected(dm, model)
    assert not (tmp_path / "m.json").exists()

    dm = VGGFace2DataModule(
        str(tree), str(tmp_path / "m.json"), n_identities=6, n_images=2, skip_corrupt=True, **SMALL
    )
    with pytest.warns(UserWarning, match="2 unreadable image"):
        manifest = selected(dm, model)
    skipped = {s["path"] for s in manifest.skipped}
    assert skipped == {garbage, truncated}
    assert not skipped & {q.path for q in manifest.queries}
    assert QueryManifest.load(tmp_path / "m.json").skipped == manifest.skipped


def test_corrupt_gallery_image_names_the_file(tree, tmp_path):
    # through a worker process: the error crosses the process boundary with the file's name
    dm = VGGFace2DataModule(
        str(tree), str(tmp_path / "m.json"), n_identities=2, n_images=2, num_workers=1, **SMALL
    )
    model = ColourNet()
    selected(dm, model)
    dm.setup("test")
    bad = dm.gallery_table().paths[5]
    (tree / "train" / bad).write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(CorruptImageError, match=bad):
        compute_templates(model, dm.gallery_dataloader(), num_classes=6, cache=False)


def test_missing_files_name_the_expected_layout(tree, tmp_path):
    model = ColourNet()
    (tree / "bb_landmark" / "loose_bb_train.csv").rename(tmp_path / "boxes.csv")
    dm = VGGFace2DataModule(
        str(tree), str(tmp_path / "m.json"), n_identities=2, n_images=2, **SMALL
    )
    with pytest.raises(
        VGGFace2LayoutError, match=r"bb_landmark/loose_bb_train.csv.*crop_margin=None"
    ):
        selected(dm, model)
    # without the boxes, the loose crops are used as they are
    loose = VGGFace2DataModule(
        str(tree), str(tmp_path / "m.json"), n_identities=2, n_images=2, crop_margin=None, **SMALL
    )
    assert len(selected(loose, model).queries) == 4
    (tmp_path / "boxes.csv").rename(tree / "bb_landmark" / "loose_bb_train.csv")

    (tree / "meta" / "identity_meta.csv").rename(tmp_path / "meta.csv")
    with pytest.raises(VGGFace2LayoutError, match=r"meta/identity_meta.csv.*train/<class_id>"):
        selected(dm, model)
    (tmp_path / "meta.csv").rename(tree / "meta" / "identity_meta.csv")

    with pytest.raises(FileNotFoundError, match=r"query manifest not found: .*nope.json"):
        VGGFace2DataModule(str(tree), str(tmp_path / "nope.json"), **SMALL).setup("test")
    # written whole (with their sidecars) but not readable as this version's manifest
    atomic_write_text(
        tmp_path / "broken.json", '{"format": "crossres-query-manifest", ', sidecar=True
    )
    with pytest.raises(ValueError, match=r"broken.json is not readable JSON"):
        QueryManifest.load(tmp_path / "broken.json")
    good = json.loads((tmp_path / "m.json").read_text())
    atomic_write_text(tmp_path / "old.json", json.dumps({**good, "version": 0}), sidecar=True)
    with pytest.raises(ValueError, match=r"old.json has version 0.*select the queries again"):
        QueryManifest.load(tmp_path / "old.json")
    del good["open_set"]
    atomic_write_text(tmp_path / "partial.json", json.dumps(good), sidecar=True)
    with pytest.raises(ValueError, match=r"partial.json lacks the keys \['open_set'\]"):
        QueryManifest.load(tmp_path / "partial.json")
    with pytest.raises(FileNotFoundError, match="no query manifest"):
        VGGFace2DataModule(str(tree), **SMALL).setup("test")


def test_layout_and_size_errors(tree, tmp_path):
    model = ColourNet()
    dm = VGGFace2DataModule(
        str(tree), str(tmp_path / "m.json"), n_identities=2, n_images=5, **SMALL
    )
    with pytest.raises(ValueError, match="only 0 identities have 5 or more query-split images"):
        selected(dm, model)
    # the box of a query candidate missing from the CSV
    dm = VGGFace2DataModule(
        str(tree), str(tmp_path / "m.json"), n_identities=6, n_images=2, **SMALL
    )
    dm._read_classes()
    name = dm.split("n000002")[0][0][:-4]
    csv = tree / "bb_landmark" / "loose_bb_train.csv"
    csv.write_text(
        "\n".join(x for x in csv.read_text().splitlines() if not x.startswith(f'"{name}"'))
    )
    with pytest.raises(VGGFace2LayoutError, match=rf"no box for \['{name}'\]"):
        selected(dm, model)
    # an identity folder that is empty, then missing
    for f in (tree / "train" / "n000021").iterdir():
        f.unlink()
    dm = VGGFace2DataModule(
        str(tree), str(tmp_path / "m.json"), n_identities=2, n_images=2, **SMALL
    )
    with pytest.raises(VGGFace2LayoutError, match=r"identity n000021 has no image"):
        selected(dm, model)
    (tree / "train" / "n000021").rmdir()
    dm = VGGFace2DataModule(
        str(tree), str(tmp_path / "m.json"), n_identities=2, n_images=2, **SMALL
    )
    with pytest.raises(VGGFace2LayoutError, match=r"1 training identities .* no folder"):
        selected(dm, model)
    # a classifier over another number of classes
    small = ColourNet()
    small.pretrained_cfg = PretrainedConfig(num_classes=5)
    with pytest.raises(ValueError, match="classifies 5 classes"):
        selected(dm, small)


def test_a_changed_gallery_is_detected(tree, tmp_path):
    dm = VGGFace2DataModule(
        str(tree), str(tmp_path / "m.json"), n_identities=2, n_images=2, **SMALL
    )
    selected(dm, ColourNet())
    (tree / "train" / dm.split("n000008")[1][0]).unlink()  # a gallery image disappears
    later = VGGFace2DataModule(
        str(tree), str(tmp_path / "m.json"), n_identities=2, n_images=2, **SMALL
    )
    later.setup("test")  # the queries are intact: the run can start
    with pytest.raises(
        ValueError, match=r"\(23 images\) differs from the one the manifest .*\(24 images\)"
    ):
        later.gallery_dataloader()
