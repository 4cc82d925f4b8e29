"""Gallery templates against a brute-force mean, the cache's safety, resuming, open set."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch import nn

from crossres.datamodules.base import CorruptImageError
from crossres.datamodules.gallery import open_set_gallery
from crossres.datamodules.synthetic import SyntheticFacesDataModule, SyntheticFacesDataset
from crossres.io import CorruptFileError, sidecar_path
from crossres.models.base import FaceModel, PretrainedConfig
from crossres.models.fingerprint import model_hash
from crossres.models.templates import compute_templates, load_templates, templates_path
from crossres.paths import sha256_file


class ConvEmbedder(FaceModel):
    def __init__(self, seed: int = 0) -> None:
        super().__init__(
            PretrainedConfig(input_size=(3, 24, 24), resize_shortest=None, feature_dim=6)
        )
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(6, generator=g) * 0.1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


def datamodule(**kw) -> SyntheticFacesDataModule:
    args = dict(n_identities=5, n_images=5, image_size=24, input_size=24, batch_size=4)
    args.update(kw)
    dm = SyntheticFacesDataModule(**args)
    dm.setup("test")
    return dm


def brute_force(
    model: FaceModel, dm: SyntheticFacesDataModule, normalize: str
) -> dict[int, torch.Tensor]:
    """One image at a time, straight from the definition."""
    ds = dm.gallery_dataset()
    per_id: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for k in range(len(ds)):
            it = ds[k]
            f = model.features(it.image[None])[0].double()
            if normalize in ("before", "both"):
                f = f / f.norm()
            per_id.setdefault(it.identity, []).append(f)
    out = {}
    for i, fs in per_id.items():
        t = torch.stack(fs).mean(0)
        out[i] = t / t.norm() if normalize in ("after", "both") else t
    return out


@pytest.mark.parametrize("normalize", ["none", "before", "after", "both"])
def test_templates_are_the_mean_feature_per_identity(normalize):
    dm = datamodule()
    model = ConvEmbedder()
    model.train()
    g = compute_templates(
        model, dm.gallery_dataloader(), num_classes=dm.num_classes, normalize=normalize, cache=False
    )
    assert model.training  # mode restored
    ref = brute_force(model.eval(), dm, normalize)
    assert g.ids.tolist() == sorted(ref)
    torch.testing.assert_close(
        g.features, torch.stack([ref[i] for i in sorted(ref)]).float(), rtol=1e-5, atol=1e-6
    )
    assert g.normalized == (normalize in ("after", "both"))
    if g.normalized:
        torch.testing.assert_close(g.features.norm(dim=1), torch.ones(len(g)))


def test_cache_is_reused_only_for_the_same_model_manifest_and_option(tmp_path):
    dm = datamodule()
    model = ConvEmbedder(0)
    g1 = compute_templates(
        model, dm.gallery_dataloader(), num_classes=dm.num_classes, cache=tmp_path
    )
    path = templates_path(
        tmp_path, model_hash=model_hash(model), manifest_hash=dm.manifest_hash, normalize="none"
    )
    assert path.is_file()

    def boom(x):
        raise AssertionError("features recomputed although the cache holds them")

    model.features = boom  # a cache hit must not run the model
    g2 = compute_templates(
        model, dm.gallery_dataloader(), num_classes=dm.num_classes, cache=tmp_path
    )
    torch.testing.assert_close(g1.features, g2.features, rtol=0, atol=0)
    assert g2.model_hash == model_hash(ConvEmbedder(0)) and g2.manifest_hash == dm.manifest_hash

    other = ConvEmbedder(1)  # other weights: another key, recomputed, different templates
    g3 = compute_templates(
        other, dm.gallery_dataloader(), num_classes=dm.num_classes, cache=tmp_path
    )
    assert not torch.allclose(g1.features, g3.features)
    g4 = compute_templates(
        other,
        dm.gallery_dataloader(),
        num_classes=dm.num_classes,
        normalize="after",
        cache=tmp_path,
    )
    assert len(list(tmp_path.glob("templates-*.pt"))) == 3
    assert not torch.allclose(g3.features, g4.features)

    # a file under the wrong name is detected, never silently used
    wrong = templates_path(
        tmp_path, model_hash=model_hash(other), manifest_hash=dm.manifest_hash, normalize="both"
    )
    shutil.copy(path, wrong)
    shutil.copy(sidecar_path(path), sidecar_path(wrong))
    with pytest.raises(ValueError, match="made for something else.*model_hash"):
        compute_templates(
            other,
            dm.gallery_dataloader(),
            num_classes=dm.num_classes,
            normalize="both",
            cache=tmp_path,
        )


def test_a_damaged_cache_file_is_refused_by_name_and_recomputed(tmp_path):
    dm = datamodule()
    model = ConvEmbedder(0)
    args = dict(num_classes=dm.num_classes, cache=tmp_path)
    g1 = compute_templates(model, dm.gallery_dataloader(), **args)
    path = templates_path(
        tmp_path, model_hash=model_hash(model), manifest_hash=dm.manifest_hash, normalize="none"
    )
    assert sidecar_path(path).read_text().split()[0] == sha256_file(path)
    path.write_bytes(path.read_bytes()[:-7])  # a crash or a bad disk, after the sidecar
    keys = dict(model_hash=model_hash(model), manifest_hash=dm.manifest_hash, normalize="none")
    with pytest.raises(CorruptFileError, match=f"{path.name}.*crossres gallery"):
        load_templates(path, num_classes=dm.num_classes, **keys)
    with pytest.warns(UserWarning, match=f"recomputing the templates cache .*{path.name}"):
        g2 = compute_templates(model, dm.gallery_dataloader(), **args)
    torch.testing.assert_close(g1.features, g2.features, rtol=0, atol=0)
    load_templates(path, num_classes=dm.num_classes, **keys)  # whole again


def test_default_cache_follows_the_datasets_manifest_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSRES_CACHE", str(tmp_path))
    dm = datamodule()
    compute_templates(ConvEmbedder(), dm.gallery_dataloader(), num_classes=dm.num_classes)
    assert len(list((tmp_path / "templates").glob("templates-*.pt"))) == 1
    dm2 = datamodule(seed=5)  # another split: another manifest hash, another file
    assert dm2.manifest_hash != dm.manifest_hash
    compute_templates(ConvEmbedder(), dm2.gallery_dataloader(), num_classes=dm2.num_classes)
    assert len(list((tmp_path / "templates").glob("templates-*.pt"))) == 2


class FlakyDataset(SyntheticFacesDataset):
    """Synthetic faces whose image ``bad`` cannot be read; counts the images it loads."""

    bad: int | None = None
    loads = 0

    def load_image(self, i):
        FlakyDataset.loads += 1
        if i == self.bad:
            raise OSError("image file is truncated (3 bytes not processed)")
        return super().load_image(i)


def flaky_loader(dm: SyntheticFacesDataModule, bad: int | None, skip: bool):
    base = dm.gallery_dataset()
    ds = FlakyDataset(
        base.table,
        n_images=dm.n_images,
        seed=dm.seed,
        image_size=dm.image_size,
        resolutions=[0],
        input_size=24,
        resize_shortest=None,
        skip_corrupt=skip,
        manifest_hash=dm.manifest_hash,
    )
    ds.bad = bad
    return torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=ds.collate)


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path):
    dm = datamodule()
    model = ConvEmbedder()
    n = len(dm.gallery_table())
    bad = n - 2
    FlakyDataset.loads = 0
    with pytest.raises(CorruptImageError, match="synthetic face .*skip_corrupt=True"):
        compute_templates(
            model,
            flaky_loader(dm, bad, False),
            num_classes=dm.num_classes,
            cache=tmp_path,
            checkpoint_every=1,
        )
    assert list(tmp_path.glob("*.partial")), "no partial sums were kept"
    FlakyDataset.loads = 0
    g = compute_templates(
        model,
        flaky_loader(dm, None, False),
        num_classes=dm.num_classes,
        cache=tmp_path,
        checkpoint_every=1,
    )
    assert FlakyDataset.loads == n - bad + (bad % 2)  # only the batches not yet summed
    assert not list(tmp_path.glob("*.partial"))
    ref = compute_templates(model, dm.gallery_dataloader(), num_classes=dm.num_classes, cache=False)
    torch.testing.assert_close(g.features, ref.features, rtol=1e-6, atol=1e-7)


def test_skip_corrupt_leaves_the_image_out_and_records_it(tmp_path):
    dm = datamodule()
    model = ConvEmbedder()
    with pytest.warns(UserWarning, match="1 unreadable image"):
        g = compute_templates(
            model, flaky_loader(dm, 0, True), num_classes=dm.num_classes, cache=tmp_path
        )
    blob = torch.load(next(tmp_path.glob("templates-*.pt")), weights_only=True)
    assert len(blob["skipped"]) == 1 and "truncated" in blob["skipped"][0][1]
    assert blob["n_images"] == len(dm.gallery_table()) - 1
    first = int(dm.gallery_table().identity[0])
    assert int(blob["counts"][g.ids.tolist().index(first)]) == 1  # 2 gallery images, one skipped


def test_open_set_gallery_and_errors():
    dm = datamodule(n_identities=6)
    g = compute_templates(
        ConvEmbedder(), dm.gallery_dataloader(), num_classes=dm.num_classes, cache=False
    )
    og = open_set_gallery(g, dm.open_set)
    assert set(og.ids.tolist()) == set(range(6)) - set(dm.open_set.non_mated)
    assert len(og) == 6 - 3
    keep = [g.ids.tolist().index(i) for i in og.ids.tolist()]
    torch.testing.assert_close(og.features, g.features[keep])
    with pytest.raises(ValueError, match="normalize must be one of"):
        compute_templates(
            ConvEmbedder(), dm.gallery_dataloader(), num_classes=6, normalize="l2", cache=False
        )
    with pytest.raises(ValueError, match="original resolution"):
        compute_templates(ConvEmbedder(), dm.test_dataloader(), num_classes=6, cache=False)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        compute_templates(ConvEmbedder(), dm.gallery_dataloader(), num_classes=3, cache=False)
    assert np.isfinite(g.features.numpy()).all()


def test_weights_changed_in_memory_are_not_served_stale_templates(tmp_path):
    """A model keeps its weight file's hash after fine-tuning in memory; the cache also checks
    the weights themselves."""
    dm = datamodule()
    model = ConvEmbedder()
    model.pretrained_cfg = PretrainedConfig(
        input_size=(3, 24, 24), resize_shortest=None, weights_hash="ab" * 32
    )
    compute_templates(model, dm.gallery_dataloader(), num_classes=dm.num_classes, cache=tmp_path)
    with torch.no_grad():
        model.conv.bias.add_(1.0)
    with pytest.raises(ValueError, match="state_hash"):
        compute_templates(
            model, dm.gallery_dataloader(), num_classes=dm.num_classes, cache=tmp_path
        )
