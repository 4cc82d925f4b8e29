"""The default's CR model never trains on a query: the photos ``configs/cr_dlib.yaml``'s
training loader yields are disjoint (sample ids and face keys) from the queries of
``configs/default.yaml``'s datamodule and of the full embedded set (``configs/embedded_full.yaml``)
and of ``EmbeddedFacesDataModule``'s defaults.

The training set is read from what the recipe's own ``train_dataloader`` would load (its
dataset's table, through the ``Subset`` rows), not from the split code's bookkeeping."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from torch.utils.data import Subset

from crossres.datamodules.cr_data import CrossResolutionDataModule
from crossres.datamodules.embedded import EmbeddedFacesDataModule
from crossres.lightning_modules.cr_recipe import CR_DLIB_RECIPE, CR_HOLDOUT
from crossres.paths import cache_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def faces() -> str:
    path = cache_dir("faces")
    if not (path / "manifest.json").is_file():
        pytest.skip("the embedded faces are not fetched (crossres fetch-faces)")
    return str(path)


def faces_of(dataset) -> tuple[set[int], set[str]]:
    """(sample ids, 'sha256/face' keys) of what ``dataset`` loads, through any Subset."""
    items = None
    if isinstance(dataset, Subset):
        items, dataset = list(dataset.indices), dataset.dataset
    items = range(len(dataset)) if items is None else items
    rows = {k % len(dataset.table) for k in items}  # items are resolution-major
    ids = {int(dataset.table.sample_id[i]) for i in rows}
    keys = {f"{dataset.photos[i].sha256}/{getattr(dataset.photos[i], 'face', 0)}" for i in rows}
    return ids, keys


def queries_of(init_args: dict, faces: str) -> tuple[set[int], set[str]]:
    dm = EmbeddedFacesDataModule(**{**init_args, "faces_cache": faces})
    dm.setup("test")
    return faces_of(dm.query_dataset())


def recipe_module(faces: str) -> CrossResolutionDataModule:
    data = CR_DLIB_RECIPE["data"]["init_args"]
    source = EmbeddedFacesDataModule(**{**data["source"]["init_args"], "faces_cache": faces})
    keep = {k: v for k, v in data.items() if k not in ("source", "augmentation")}
    dm = CrossResolutionDataModule(source, **keep)
    dm.setup("fit")
    return dm


def data_args(config: Path) -> dict:
    return yaml.safe_load(config.read_text())["data"]["init_args"]


def test_training_photos_are_no_query_of_the_default_or_the_full_set(faces):
    dm = recipe_module(faces)
    train_ids, train_keys = faces_of(dm.train_dataloader().dataset)
    held_ids, _ = faces_of(dm.holdout_dataloader().dataset)
    assert len(held_ids) == CR_HOLDOUT and train_ids.isdisjoint(held_ids)

    query_sets = {
        "configs/default.yaml": data_args(ROOT / "configs" / "default.yaml"),
        "configs/embedded_full.yaml": data_args(ROOT / "configs" / "embedded_full.yaml"),
        "EmbeddedFacesDataModule defaults": {},
    }
    for name, args in query_sets.items():
        q_ids, q_keys = queries_of(args, faces)
        assert q_ids, name
        assert train_ids.isdisjoint(q_ids), f"CR training photos among the queries of {name}"
        assert train_keys.isdisjoint(q_keys), f"CR training faces among the queries of {name}"

    # every photo that is no query of the full set is either trained on or held out
    full_args = data_args(ROOT / "configs" / "embedded_full.yaml")
    all_dm = EmbeddedFacesDataModule(**{**full_args, "faces_cache": faces})
    all_dm.setup("test")
    n_faces = len(all_dm.split_record)
    q_ids, _ = queries_of(full_args, faces)
    assert len(train_ids) + len(held_ids) + len(q_ids) == n_faces
