"""A folder of your own faces (``FolderFacesDataModule``) on a tree built from the embedded real
faces: crops of dlib's bald_guys collage with their landmarks, Obama's photos with face boxes,
LFW chips as whole images, a corrupt JPEG, a single-photo person and a person whose only photo
is unreadable; then ``crossres test`` on it with dlib's ResNet-29."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
import yaml
from PIL import Image

from cli_configs import crossres_config, cw, datamodule, frozen_target
from crossres.cli import main
from crossres.datamodules.base import ShardSampler
from crossres.datamodules.embedded_sources import load_chip, load_embedded_faces, read_rgb
from crossres.datamodules.folder import FolderFacesDataModule
from crossres.datamodules.folder_layout import read_annotations
from crossres.datamodules.identity_split import SplitError, split_identities
from crossres.datamodules.manifest import QueryManifest
from crossres.errors import CrossresError
from crossres.models.base import PretrainedConfig
from crossres.report.tables import summarize
from crossres.store import ResultStore

BALD = [f"dlib_bald_guys_person_{i}" for i in range(1, 5)]
SUFFIX = {BALD[0]: ".PNG", BALD[1]: ".png", BALD[2]: ".webp", BALD[3]: ".bmp"}  # lossless
CHIPS = ["John_Savage", "John_Schneider"]
CORRUPT = "John_Savage/zz_corrupt.jpg"
BROKEN = "Nobody_Readable/broken.png"


def _face_box(landmarks) -> list[float]:
    """A face box around dlib's 5 points (eye corners and nose): wider than the eyes, from
    above the brows to below the mouth, as a detector's box roughly is."""
    pts = np.asarray(landmarks, dtype=np.float64)
    span = float(np.ptp(pts[:, 0]))
    cx, cy = pts[:, 0].mean(), pts[:, 1].mean()
    return [cx - 0.9 * span, cy - 1.0 * span, 1.8 * span, 2.0 * span]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    """root/<identity>/<photo>, the annotations CSV, and the embedded face of every photo."""
    root = tmp_path_factory.mktemp("folder") / "my_faces"
    faces = load_embedded_faces()
    by_id: dict[str, list] = {}
    for p in faces:
        by_id.setdefault(p.identity, []).append(p)
    rows, source = [], {}
    for name in BALD:  # crops of the collage (even offsets), landmarks shifted into them
        for k, p in enumerate(by_id[name]):
            img = Image.fromarray(read_rgb(p.path))
            pts = np.asarray(p.landmarks, dtype=np.float64)
            half = 3 * float(np.ptp(pts[:, 0])) + 40
            x0 = max(0, 2 * int((pts[:, 0].mean() - half) // 2))
            y0 = max(0, 2 * int((pts[:, 1].mean() - half) // 2))
            x1 = min(img.width, int(pts[:, 0].mean() + half))
            y1 = min(img.height, int(pts[:, 1].mean() + half))
            rel = f"{name}/{k:02d}{SUFFIX[name]}"
            (root / name).mkdir(parents=True, exist_ok=True)
            img.crop((x0, y0, x1, y1)).save(root / rel, lossless=True)
            rows.append([rel, *(pts - [x0, y0]).ravel().tolist()])
            source[rel] = p
    for name in ("Jacinda_Ardern", "Emmanuel_Macron"):  # full photos with their landmarks
        for p in by_id[name][: 1 if name == "Emmanuel_Macron" else None]:
            rel = f"{name}/{p.path.name}"
            (root / name).mkdir(exist_ok=True)
            shutil.copyfile(p.path, root / rel)
            rows.append([rel, *np.asarray(p.landmarks).ravel().tolist()])
            source[rel] = p
    boxes = {}
    (root / "Barack_Obama").mkdir()
    for p in by_id["Barack_Obama"]:  # full photos with a face box
        rel = f"Barack_Obama/{p.path.name}"
        shutil.copyfile(p.path, root / rel)
        boxes[rel] = _face_box(p.landmarks)
        rows.append([rel, *boxes[rel]])
    for name in CHIPS:  # LFW chips, no annotation: whole images
        (root / name).mkdir()
        for p in by_id[name][:4]:
            shutil.copyfile(p.path, root / name / p.path.name)
            source[f"{name}/{p.path.name}"] = p
    data = (root / f"{CHIPS[0]}/{by_id[CHIPS[0]][0].path.name}").read_bytes()
    (root / CORRUPT).write_bytes(data[: len(data) // 2])  # a truncated JPEG
    (root / "Nobody_Readable").mkdir()
    (root / BROKEN).write_bytes(b"\x89PNG\r\n\x1a\n not a png at all")
    (root / ".DS_Store").write_bytes(b"\0")  # hidden files are not data
    csv = root.parent / "faces.csv"
    csv.write_text(
        "path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\n"
        + "".join(",".join(str(v) for v in r) + "\n" for r in rows)
    )
    return {"root": root, "csv": csv, "source": source, "boxes": boxes}


def make(tree, tmp_path, **kw) -> FolderFacesDataModule:
    args = dict(
        root=str(tree["root"]),
        annotations=str(tree["csv"]),
        manifest=str(tmp_path / f"manifest-{len(list(tmp_path.glob('manifest-*')))}.json"),
        resolutions=[16, 0],
        batch_size=8,
        input_size=150,
        resize_shortest=None,
        n_single_queries=1,
    )
    args.update(kw)
    dm = FolderFacesDataModule(**args)
    dm.setup("test")
    return dm


def test_split_is_deterministic_disjoint_and_complete(tree, tmp_path, capsys):
    dm = make(tree, tmp_path)
    names = dm.identity_names
    assert names == sorted(
        [*BALD, *CHIPS, "Barack_Obama", "Jacinda_Ardern"] + ["Emmanuel_Macron", "Nobody_Readable"]
    )
    q, g = dm.query_table, dm.gallery_table()
    used = q.paths + g.paths
    assert len(used) == len(set(used))  # each photo once, in one split
    assert not set(q.sample_id.tolist()) & set(g.sample_id.tolist())
    readable = {
        p.relative_to(tree["root"]).as_posix()
        for p in tree["root"].rglob("*.*")
        if p.is_file() and not p.name.startswith(".")
    } - {CORRUPT, BROKEN}
    assert set(used) == readable  # nothing else left out
    per = Counter(names[i] for i in q.identity.tolist())
    for name, n in Counter(f.split("/")[0] for f in readable).items():
        if n >= 2:  # round(n / 2) queries clamped to [1, n - 1], the rest gallery
            assert per[name] == min(n - 1, max(1, math.floor(n * 0.5 + 0.5))), name
    # open set: half the split identities (8 // 2) and the single-photo person are non-mated
    assert names.index("Emmanuel_Macron") in dm.open_set.non_mated
    assert len(dm.open_set.mated) == 4 and len(dm.open_set.non_mated) == 5
    assert names.index("Nobody_Readable") not in set(q.identity.tolist()) | set(g.identity.tolist())

    again = make(tree, tmp_path)
    assert again.manifest_hash == dm.manifest_hash
    assert again.query_table.sample_id.tolist() == q.sample_id.tolist()
    assert again.gallery_table().sample_id.tolist() == g.sample_id.tolist()
    other = make(tree, tmp_path, seed=1)
    assert other.manifest_hash != dm.manifest_hash
    assert set(other.query_table.sample_id.tolist()) != set(q.sample_id.tolist())
    assert set(other.query_table.sample_id.tolist()) | set(
        other.gallery_table().sample_id.tolist()
    ) == set(q.sample_id.tolist()) | set(g.sample_id.tolist())  # same photos, same ids
    out = capsys.readouterr().out
    assert out.count("2 unreadable photo(s) skipped") == 3
    assert "2 identit(ies) with fewer than 2 readable photos (1 non-mated queries" in out


def test_unreadable_and_too_few_are_reported(tree, tmp_path):
    dm = make(tree, tmp_path)
    d = dm.describe()
    assert {f["path"] for f in d["unreadable"]["files"]} == {CORRUPT, BROKEN}
    assert d["unreadable"]["count"] == 2 and d["n_files"] == d["n_readable"] + 2
    too_few = {r["identity"]: r for r in d["too_few"]["identities"]}
    assert too_few == {
        "Emmanuel_Macron": {
            "identity": "Emmanuel_Macron",
            "images": 1,
            "unreadable": 0,
            "use": "non-mated query",
        },
        "Nobody_Readable": {
            "identity": "Nobody_Readable",
            "images": 0,
            "unreadable": 1,
            "use": "unused",
        },
    }
    assert d["aligned"] == {"landmarks": 24 + 2 + 1, "box": 6, "whole": 8, "detected": 0}
    saved = QueryManifest.load(d["manifest"])  # the same manifest format as VGGFace2's
    assert saved.content_hash() == dm.manifest_hash
    assert {s["path"] for s in saved.skipped} == {CORRUPT, BROKEN}
    assert "truncated" in dict((s["path"], s["error"]) for s in saved.skipped)[CORRUPT]
    assert [r["identity"] for r in saved.rejected_identities] == sorted(too_few)
    assert [r.sample_id for r in saved.queries] == dm.query_table.sample_id.tolist()
    boxed = [r for r in saved.queries if r.class_id == "Barack_Obama"]
    assert boxed and all(r.box == pytest.approx(tree["boxes"][r.path]) for r in boxed)
    raw = json.loads(Path(d["manifest"]).read_text())
    assert raw["dataset"] == "folder" and raw["model_hashes"] == []
    # min_images=4: Jacinda (2) becomes a distractor too
    strict = make(tree, tmp_path, min_images=4, n_single_queries=0)
    uses = {r["identity"]: r["use"] for r in strict.describe()["too_few"]["identities"]}
    assert uses == {
        "Emmanuel_Macron": "distractor",
        "Jacinda_Ardern": "distractor",
        "Nobody_Readable": "unused",
    }


def test_faces_are_aligned_as_the_embedded_faces_and_vggface2(tree, tmp_path):
    dm = make(tree, tmp_path)
    ds = dm._make_dataset(dm.query_table, [0])
    ds_g = dm._make_dataset(dm.gallery_table(), [0])
    checked = Counter()
    for d in (ds, ds_g):
        for i in range(len(d.table)):
            rel = d.table.paths[i]
            got = d[i].image
            assert got.shape == (3, 150, 150)
            if rel in tree["boxes"]:  # VGGFace2's crop: x1.3 around the box centre
                x, y, w, h = tree["boxes"][rel]
                img = Image.open(tree["root"] / rel).convert("RGB")
                cw, ch = max(w, h * 112 / 128) * 1.3, h * 1.3
                cx, cy = x + w / 2, y + h / 2
                region = [
                    max(0, math.floor(cx - cw / 2 + 0.5)),
                    max(0, math.floor(cy - ch / 2 + 0.5)),
                    min(img.width, math.floor(cx + cw / 2 + 0.5)),
                    min(img.height, math.floor(cy + ch / 2 + 0.5)),
                ]
                ref = img.crop(region).resize((150, 150), Image.BILINEAR)
                kind = "box"
            else:  # the embedded faces' own chip of the same face (the default run's data)
                ref = load_chip(tree["source"][rel])
                kind = "chip" if tree["source"][rel].landmarks is not None else "whole"
            torch.testing.assert_close(got, TF.to_tensor(ref), rtol=0, atol=1.5 / 255)
            checked[kind] += 1
    assert checked == {"chip": 27, "box": 6, "whole": 8}
    # a SE-ResNet-50 input: landmark chips are made at its resize side, then centre-cropped
    senet = make(tree, tmp_path).configure_for(
        PretrainedConfig(input_size=(3, 224, 224), resize_shortest=256)
    )
    assert senet.face_chip_size() == 256
    assert next(iter(senet.test_dataloader())).images.shape[1:] == (3, 224, 224)


def test_resolutions_and_exact_sharding(tree, tmp_path):
    dm = make(tree, tmp_path, resolutions=[16, 24, 0])
    ds = dm.query_dataset()
    n = len(dm.query_table)
    seen = []
    for rank in range(2):
        idx = list(ShardSampler(ds, num_replicas=2, rank=rank))
        seen += [(int(ds.table.sample_id[k % n]), dm.resolutions[k // n]) for k in idx]
    assert len(seen) == len(set(seen)) == 3 * n
    batch = next(iter(dm.test_dataloader()))
    assert set(batch.resolution.tolist()) <= {16, 24, 0}


def test_bad_folders_name_the_path(tree, tmp_path):
    with pytest.raises(CrossresError, match="face folder not found: .*nowhere"):
        make(tree, tmp_path, root=str(tmp_path / "nowhere"), annotations=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CrossresError, match="holds no identity folder"):
        make(tree, tmp_path, root=str(tmp_path / "empty"), annotations=None)
    bad = tmp_path / "bad"
    shutil.copytree(tree["root"], bad)
    (bad / "Notes_Only").mkdir()
    (bad / "Notes_Only" / "readme.txt").write_text("no photos here")
    with pytest.raises(CrossresError, match="identity folder .*Notes_Only holds no image"):
        make(tree, tmp_path, root=str(bad), annotations=None)
    shutil.rmtree(bad / "Notes_Only")
    shutil.copyfile(bad / CORRUPT, bad / "stray.jpg")
    with pytest.raises(CrossresError, match="directly in .*bad .*stray.jpg"):
        make(tree, tmp_path, root=str(bad), annotations=None)
    (bad / "stray.jpg").unlink()
    csv = tmp_path / "bad.csv"
    for text, message in [
        ("Barack_Obama/obama.jpg,1,2,3\n", "bad.csv, line 1: 4 columns"),
        ("Barack_Obama/obama.jpg,1,2,x,4\n", "line 1: 'x' is not a number"),
        ("Barack_Obama/obama.jpg,1,2,0,4\n", "line 1: the face box .* has no area"),
        ("path,x,y,w,h\nBarack_Obama/obama.jpg,1,2,nan,4\n", "line 2: 'nan' is not a finite"),
        ("a/b.jpg,1,2,3,4\nBarack_Obama/obama.jpg,1,2,3,4\n", "names 1 image.* a/b.jpg"),
        ("Barack_Obama/obama.jpg,1,2,3,4\nBarack_Obama/obama.jpg,1,2,3,4\n", "listed twice"),
    ]:
        csv.write_text(text)
        with pytest.raises(CrossresError, match=message):
            make(tree, tmp_path, root=str(bad), annotations=str(csv))
    with pytest.raises(CrossresError, match="CSV not found: .*missing.csv"):
        make(tree, tmp_path, annotations=str(tmp_path / "missing.csv"))
    # a box outside its photo is reported as unreadable (never dropped silently)
    csv.write_text("Barack_Obama/obama.jpg,99999,99999,10,10\n")
    d = make(tree, tmp_path, root=str(bad), annotations=str(csv)).describe()
    errors = {f["path"]: f["error"] for f in d["unreadable"]["files"]}
    assert "lies outside" in errors["Barack_Obama/obama.jpg"]


def test_split_needs_two_identities_with_enough_photos(tmp_path):
    with pytest.raises(SplitError, match="1 identities with 3\\+ faces"):
        split_identities({"a": ["1", "2", "3"], "b": ["1", "2"]}, seed=0, min_images=3)
    s = split_identities(
        {"a": list("123"), "b": list("456"), "c": ["7", "8"]},
        seed=0,
        min_images=3,
        max_distractors=0,
    )
    assert s.unused_singles == ["c"] and not s.distractors
    assert sorted(f for _, f in s.query + s.gallery) == list("123456")


def test_crossres_test_runs_on_a_folder(tree, tmp_path, capsys):
    """``crossres test`` end to end: dlib's ResNet-29, two resolutions, one short attack."""
    config = crossres_config(
        frozen_target("dlib_resnet29", "Base"),
        datamodule(
            "FolderFacesDataModule",
            root=str(tree["root"]),
            annotations=str(tree["csv"]),
            manifest=str(tmp_path / "manifest.json"),
            resolutions=[16, 0],
            max_queries_per_identity=1,
            batch_size=8,
        ),
        [cw("CW-L2 (1-3)", binary_search_steps=1, steps=3)],
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    torch.set_num_threads(1)
    assert main(["test", "--config", str(path), "--trainer.default_root_dir", str(run_dir)]) == 0
    assert "2 unreadable photo(s) skipped" in capsys.readouterr().out
    rows = ResultStore(run_dir).rows()
    n_queries = 8  # one photo of each of the 8 split identities (the single is not a query)
    assert len(rows) == n_queries * 2 * 2  # x resolutions x (clean + CW-L2)
    assert {r.resolution for r in rows} == {16, 0}
    assert (run_dir / "report.md").is_file()
    manifest = QueryManifest.load(tmp_path / "manifest.json")
    assert len(manifest.queries) == n_queries and len(manifest.skipped) == 2
    assert {r.sample_id for r in rows} == {q.sample_id for q in manifest.queries}
    # aligned real faces: dlib identifies all 8 clean queries at full resolution (measured 8/8;
    # a misaligned chip or a wrong crop costs several)
    clean = {c.resolution: c for c in summarize(rows) if c.attack == "clean"}
    assert clean[0].hit_rate >= 7 / 8


ROOT = Path(__file__).parents[1]


def test_readme_shows_the_example_config_and_csv_as_they_are(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Your own data") :]
    section = section[: section.index("\n## ")]
    block = section[section.index("```yaml\n") + len("```yaml\n") :]
    config = (ROOT / "configs" / "examples" / "folder_faces.yaml").read_text()
    assert yaml.safe_load(block[: block.index("```")]) == yaml.safe_load(config)
    assert yaml.safe_load(config)["data"]["init_args"]["root"] == "data/my_faces"
    csv_text = section.split("```\n")[3]  # the block after the layout block
    (tmp_path / "faces.csv").write_text(csv_text)
    faces = read_annotations(tmp_path / "faces.csv", tmp_path)
    assert faces["Ada_Lovelace/001.jpg"].box == (120, 80, 96, 118)
    assert faces["Alan_Turing/a.png"].landmarks[4] == (186, 125)
