"""Query selection is its own step: it writes the manifest, datamodules only read it; a run
without a manifest stops naming the command that writes it; `crossres select-queries` and
`crossres test` run the step; the datamodule room imports nothing from the rooms above it."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import crossres.datamodules
from cli_configs import crossres_config, datamodule, frozen_target
from crossres.cli import main
from crossres.datamodules.cr_data import CrossResolutionDataModule
from crossres.datamodules.manifest import QueryManifest, model_hash
from crossres.datamodules.query_selection import prepare_queries, select_queries
from crossres.datamodules.vggface2 import VGGFace2DataModule
from crossres.errors import NotPreparedError
from crossres.models import registry
from crossres.store import ResultStore
from test_vggface2 import CLASS_IDS, SMALL, ColourNet, make_tree

COMMAND = "crossres select-queries --config FILE"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "vggface2")


def test_selection_writes_a_manifest_a_fresh_datamodule_reads_back(tree, tmp_path):
    model = ColourNet()
    path = tmp_path / "m.json"
    selecting = VGGFace2DataModule(str(tree), str(path), n_identities=4, n_images=3, **SMALL)
    assert select_queries(selecting, model) == path
    on_disk = json.loads(path.read_text())
    assert on_disk["model_hashes"] == [model_hash(model)]
    # the selecting datamodule itself reads what was written, as any other process does
    selecting.setup("test")

    fresh = VGGFace2DataModule(str(tree), str(path), n_identities=4, n_images=3, **SMALL)
    fresh.setup("test")
    manifest = QueryManifest.load(path)
    for dm in (selecting, fresh):
        table = dm.query_table
        assert table.paths == [q["path"] for q in on_disk["queries"]]
        assert table.sample_id.tolist() == [q["sample_id"] for q in on_disk["queries"]]
        assert table.identity.tolist() == [
            CLASS_IDS.index(q["class_id"]) for q in on_disk["queries"]
        ]
        assert dm.manifest_hash == manifest.content_hash()
        assert dm.nonmated_identities == on_disk["open_set"]["non_mated"]
    assert len(fresh.query_table) == 4 * 3
    # the queries are those the model gets right at full resolution (the selection rule)
    for batch in fresh.test_dataloader():
        full = batch.resolution == 0
        with torch.no_grad():
            assert (model(batch.images[full]).argmax(1) == batch.identity[full]).all()
    np.testing.assert_array_equal(selecting.query_table.boxes, fresh.query_table.boxes)


def test_a_datamodule_without_its_manifest_names_the_command(tree, tmp_path):
    with pytest.raises(NotPreparedError, match=f"no query manifest.*{COMMAND}"):
        VGGFace2DataModule(str(tree), **SMALL).setup("test")
    missing = tmp_path / "absent.json"
    with pytest.raises(NotPreparedError, match=f"{missing}.*{COMMAND}"):
        VGGFace2DataModule(str(tree), str(missing), **SMALL).setup("test")
    # the training datamodule stops the same way (it no longer reaches for a model)
    cr = CrossResolutionDataModule(VGGFace2DataModule(str(tree), **SMALL))
    with pytest.raises(NotPreparedError, match=COMMAND):
        cr.setup("fit")
    # a step that may not select (a non-launching DDP process) leaves it missing: same error
    late = VGGFace2DataModule(str(tree), n_identities=2, n_images=2, **SMALL)
    path = prepare_queries(late, [ColourNet()], select=False)
    assert path is not None and not path.exists()
    with pytest.raises(NotPreparedError, match=COMMAND):
        late.setup("test")


def _imports(tree: ast.AST, module: str) -> set[str]:
    """Every module a source file imports, function-level imports included."""
    package = module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def test_the_datamodule_room_imports_nothing_from_the_rooms_above_it():
    root = Path(crossres.datamodules.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) > 5
    forbidden = ("crossres.lightning_modules", "crossres.callbacks", "crossres.cli")
    bad = []
    for f in files:
        module = "crossres." + ".".join(f.relative_to(root.parent).with_suffix("").parts)
        for name in _imports(ast.parse(f.read_text(encoding="utf-8")), module):
            if any(name == x or name.startswith(x + ".") for x in forbidden):
                bad.append(f"{f.name}: {name}")
    assert not bad, bad


# ---------------------------------------------------------------- the command line


@pytest.fixture
def colournet(monkeypatch: pytest.MonkeyPatch) -> str:
    name = "test_colournet"
    monkeypatch.setitem(registry._REGISTRY, name, lambda weights=None, **kw: ColourNet(**kw))
    return name


def write_config(tmp_path: Path, tree: Path, model: str) -> Path:
    config = crossres_config(
        frozen_target(model, "colour"),
        datamodule(
            "VGGFace2DataModule",
            root=str(tree),
            n_identities=3,
            n_images=2,
            resolutions=[8, 0],
            batch_size=8,
        ),  # fmt: skip
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_select_queries_command_then_test_reads_its_manifest(
    tree, tmp_path, colournet, monkeypatch, capsys
):
    monkeypatch.setenv("CROSSRES_CACHE", str(tmp_path / "cache"))
    config = write_config(tmp_path, tree, colournet)
    assert main(["select-queries", "--config", str(config)]) == 0
    written = list((tmp_path / "cache" / "manifests").glob("vggface2-3x2-seed0-*.json"))
    assert len(written) == 1 and f"query manifest: {written[0]}" in capsys.readouterr().out
    manifest = QueryManifest.load(written[0])
    assert manifest.model_hashes == [model_hash(ColourNet())] and len(manifest.queries) == 6
    mtime = written[0].stat().st_mtime_ns
    main(["test", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run")])
    assert written[0].stat().st_mtime_ns == mtime  # read, not selected again
    # no attack: one clean row per query and resolution
    assert len(ResultStore(tmp_path / "run").rows()) == len(manifest.queries) * 2


def test_the_test_command_selects_first_when_the_manifest_is_missing(
    tree, tmp_path, colournet, monkeypatch
):
    monkeypatch.setenv("CROSSRES_CACHE", str(tmp_path / "cache"))
    config = write_config(tmp_path, tree, colournet)
    main(["test", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run")])
    written = list((tmp_path / "cache" / "manifests").glob("vggface2-3x2-seed0-*.json"))
    assert len(written) == 1
    # the same selection as the module function's on a fresh datamodule
    dm = VGGFace2DataModule(
        str(tree), str(tmp_path / "m.json"), n_identities=3, n_images=2, **SMALL
    )
    by_function = QueryManifest.load(select_queries(dm, ColourNet()))
    assert QueryManifest.load(written[0]).content_hash() == by_function.content_hash()
