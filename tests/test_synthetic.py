"""Synthetic faces: seeded, the protocol's invariants, and identity structure a small model learns."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from crossres.datamodules.synthetic import SyntheticFacesDataModule, synthetic_face
from crossres.models.base import FaceModel, PretrainedConfig
from crossres.types import FaceBatch


class TinyNet(FaceModel):
    def __init__(self, num_classes: int, size: int = 32) -> None:
        super().__init__(
            PretrainedConfig(
                input_size=(3, size, size),
                resize_shortest=None,
                feature_dim=16,
                num_classes=num_classes,
            )
        )
        self.conv = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.proj = nn.Linear(8 * 4 * 4, 16)
        self.fc = nn.Linear(16, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.adaptive_avg_pool2d(self.conv(x).relu(), 4).flatten(1)
        return self.proj(h)

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)


def items(dm: SyntheticFacesDataModule) -> list[tuple[int, int, int]]:
    out = []
    for b in dm.test_dataloader():
        assert isinstance(b, FaceBatch)
        out += list(
            zip(b.sample_id.tolist(), b.resolution.tolist(), b.identity.tolist(), strict=True)
        )
    return out


def test_seeded_and_deterministic():
    a = np.asarray(synthetic_face(3, 2, 1, size=32))
    np.testing.assert_array_equal(a, np.asarray(synthetic_face(3, 2, 1, size=32)))
    assert not np.array_equal(a, np.asarray(synthetic_face(4, 2, 1, size=32)))
    assert not np.array_equal(a, np.asarray(synthetic_face(3, 2, 2, size=32)))
    dm1 = SyntheticFacesDataModule(n_identities=5, n_images=4, image_size=32, input_size=32, seed=7)
    dm2 = SyntheticFacesDataModule(n_identities=5, n_images=4, image_size=32, input_size=32, seed=7)
    b1, b2 = next(iter(dm1.test_dataloader())), next(iter(dm2.test_dataloader()))
    torch.testing.assert_close(b1.images, b2.images, rtol=0, atol=0)
    assert b1.sample_id.tolist() == b2.sample_id.tolist()
    ds = dm1.query_dataset()  # picklable, for DataLoader workers started with spawn
    torch.testing.assert_close(pickle.loads(pickle.dumps(ds))[3].image, ds[3].image, rtol=0, atol=0)


def test_protocol_invariants():
    dm = SyntheticFacesDataModule(
        n_identities=9,
        n_images=5,
        n_query_identities=6,
        image_size=32,
        input_size=32,
        resolutions=[4, 8, 0],
    )
    dm.setup("test")
    assert dm.num_classes == 9 and len(dm.identity_names) == 9
    seen = items(dm)
    keys = [(s, r) for s, r, _ in seen]
    assert (
        len(keys) == len(set(keys)) == 6 * 3 * 3
    )  # 6 identities x round(5 * 0.5) = 3 images x 3 res
    by_sample = {}
    for s, r, i in seen:
        by_sample.setdefault(s, set()).add(r)
        assert i == s // 5  # identity of a sample never changes
    assert all(rs == {4, 8, 0} for rs in by_sample.values())
    gallery = dm.gallery_table()
    assert not set(gallery.sample_id.tolist()) & set(by_sample)
    assert len(gallery) == 9 * 2  # every identity keeps 2 gallery images
    assert sorted(dm.query_identities) == sorted(dm.open_set.mated + dm.open_set.non_mated)
    assert len(dm.open_set.non_mated) == 3 and len(dm.open_set.mated) == 3
    assert dm.nonmated_identities == sorted(dm.open_set.non_mated)


def test_invalid_sizes_are_refused():
    with pytest.raises(ValueError, match="n_images >= 2"):
        SyntheticFacesDataModule(n_identities=4, n_images=1)
    with pytest.raises(ValueError, match="n_query_identities"):
        SyntheticFacesDataModule(n_identities=4, n_images=3, n_query_identities=5)


def test_a_small_model_learns_the_identities():
    """Trained on the gallery images only, a tiny conv net identifies the held-out queries at
    full resolution."""
    torch.manual_seed(0)
    dm = SyntheticFacesDataModule(
        n_identities=6, n_images=8, image_size=32, input_size=32, resolutions=[4, 0], batch_size=24
    )
    dm.setup("fit")
    model = TinyNet(dm.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    batches = list(dm.train_dataloader())
    for _ in range(25):
        for b in batches:
            loss = nn.functional.cross_entropy(model(b.images), b.identity)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    correct = {4: [], 0: []}
    with torch.no_grad():
        for b in dm.test_dataloader():
            ok = model(b.images).argmax(1) == b.identity
            for r, k in zip(b.resolution.tolist(), ok.tolist(), strict=True):
                correct[r].append(k)
    full = float(np.mean(correct[0]))
    assert full >= 0.9, correct
