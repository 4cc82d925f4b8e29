"""Every cache of the data room is crash-safe: a damaged file (truncated, one byte flipped, or
its write stopped before the sha256 sidecar) is never read as complete. It is refused with a
message naming the file and the command that rebuilds it, and that command (or the step that
builds it when cheap) restores it equal to the original: the embedded faces' manifest, photos
and archives (``crossres fetch-faces``), a VGGFace2 query manifest
(``crossres select-queries --config FILE``) and a folder's cached query manifest (rewritten at
``setup``). The models' caches are tested beside their code: converted dlib weights
(test_dlib_resnet.py), CR weights (test_prepare.py), gallery templates (test_gallery.py)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

import crossres.datamodules.embedded_sources as es
from crossres.cli import main
from crossres.datamodules.embedded import EmbeddedFacesDataModule
from crossres.datamodules.embedded_sources import (
    HashMismatchError,
    ManifestCorruptError,
    fetch_faces,
    load_embedded_faces,
    load_record,
)
from crossres.datamodules.faces import registry
from crossres.datamodules.folder import FolderFacesDataModule
from crossres.datamodules.manifest import SELECT_COMMAND, QueryManifest
from crossres.datamodules.synthetic import synthetic_face
from crossres.errors import CrossresError
from crossres.io import CorruptFileError, is_complete, sha256_file, sidecar_path
from crossres.models import registry as model_registry
from crossres.paths import cache_dir
from test_embedded_sources import _link_tree
from test_query_selection import write_config
from test_vggface2 import ColourNet, make_tree

FETCH = "crossres fetch-faces"


def _rewrite(path: Path, data: bytes) -> None:
    path.unlink()  # never through a hard link into the shared cache
    path.write_bytes(data)


def truncate(path: Path) -> None:
    """A write cut short: the first half of the file."""
    _rewrite(path, path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path: Path) -> None:
    """Bit rot: one byte in the middle inverted (the length unchanged)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    _rewrite(path, bytes(data))


def drop_sidecar(path: Path) -> None:
    """A crash after the file's rename, before its sidecar's."""
    sidecar_path(path).unlink()


DAMAGES = [truncate, flip_byte, drop_sidecar]
CONTENT_DAMAGES = [truncate, flip_byte]  # files checked against the committed record


def names_file_and_command(err: BaseException, path: Path, command: str) -> None:
    msg = str(err)
    assert str(path) in msg, msg
    assert command in msg, msg
    assert isinstance(err, CrossresError) and "\n" not in msg  # one line from the CLI


# ----------------------------------------------------------------------------------------
# The embedded faces (crossres fetch-faces)


@pytest.fixture(scope="module")
def shared_cache() -> Path:
    fetch_faces(verbose=False)  # a no-op when cached and intact
    return cache_dir("faces")


@pytest.fixture
def faces_cache(shared_cache: Path, tmp_path: Path, monkeypatch) -> Path:
    """A private copy (hard links) of the fetched cache, with every registry refused: what
    is restored comes from the cache itself."""
    dst = tmp_path / "faces"
    _link_tree(shared_cache, dst)

    def refuse(rec, dest, log):
        raise AssertionError(f"unexpected download of {rec.filename}")

    for kind in list(registry.FETCHERS):
        monkeypatch.setitem(registry.FETCHERS, kind, refuse)
    return dst


@pytest.mark.parametrize("damage", DAMAGES)
def test_faces_manifest_damage_is_refused_and_fetch_faces_rewrites_it(
    faces_cache: Path, damage: Callable[[Path], None], capsys
):
    path = faces_cache / es.MANIFEST_NAME
    original = path.read_bytes()
    assert is_complete(path)
    damage(path)
    with pytest.raises(ManifestCorruptError) as err:
        load_embedded_faces(cache=faces_cache)
    names_file_and_command(err.value, path, FETCH)
    # the command it names rewrites it, downloading nothing
    assert es.main(["--cache", str(faces_cache), "--quiet"]) == 0
    assert path.read_bytes() == original and is_complete(path)
    assert len(load_embedded_faces(cache=faces_cache)) > 0


def test_datamodule_refetches_a_damaged_faces_manifest(faces_cache: Path):
    path = faces_cache / es.MANIFEST_NAME
    original = path.read_bytes()
    flip_byte(path)
    EmbeddedFacesDataModule(faces_cache=str(faces_cache)).prepare_data()
    assert path.read_bytes() == original and is_complete(path)


def _smallest_photo(cache: Path) -> tuple[Path, str, Path]:
    """A photo of the smallest cached archive: its path, recorded sha256 and archive."""
    rec = min(
        (r for r in load_record() if (cache / "archives" / r.filename).exists()),
        key=lambda r: r.size,
    )
    photo = rec.photos[0]
    return cache / rec.cached_name(photo.member), photo.sha256, cache / "archives" / rec.filename


@pytest.mark.parametrize("damage", CONTENT_DAMAGES)
def test_damaged_photo_is_refused_and_fetch_faces_restores_it(
    faces_cache: Path, damage: Callable[[Path], None]
):
    path, sha, _ = _smallest_photo(faces_cache)
    original = path.read_bytes()
    damage(path)
    with pytest.raises(HashMismatchError) as err:
        load_embedded_faces(cache=faces_cache)
    names_file_and_command(err.value, path, FETCH)
    fetch_faces(cache=faces_cache, verbose=False)  # from the verified cached archive
    assert path.read_bytes() == original and sha256_file(path) == sha


@pytest.mark.parametrize("damage", CONTENT_DAMAGES)
def test_damaged_archive_is_refused_by_name(faces_cache: Path, damage: Callable[[Path], None]):
    photo, _, archive = _smallest_photo(faces_cache)
    manifest = (faces_cache / es.MANIFEST_NAME).read_bytes()
    damage(archive)
    photo.unlink()  # so the archive is needed
    with pytest.raises(HashMismatchError) as err:
        fetch_faces(cache=faces_cache, verbose=False)
    names_file_and_command(err.value, archive, FETCH)
    assert "Delete it" in str(err.value)
    assert (faces_cache / es.MANIFEST_NAME).read_bytes() == manifest  # nothing rewritten


# ----------------------------------------------------------------------------------------
# A VGGFace2 query manifest (crossres select-queries --config FILE)


@pytest.fixture
def colournet(monkeypatch) -> str:
    name = "test_colournet"
    monkeypatch.setitem(model_registry._REGISTRY, name, lambda weights=None, **kw: ColourNet(**kw))
    return name


@pytest.mark.parametrize("damage", DAMAGES)
def test_query_manifest_damage_is_refused_and_select_queries_rebuilds_it(
    tmp_path: Path, monkeypatch, colournet: str, damage: Callable[[Path], None]
):
    monkeypatch.setenv("CROSSRES_CACHE", str(tmp_path / "cache"))
    config = write_config(tmp_path, make_tree(tmp_path / "vggface2"), colournet)
    assert main(["select-queries", "--config", str(config)]) == 0
    (path,) = (tmp_path / "cache" / "manifests").glob("vggface2-*.json")
    original = QueryManifest.load(path)
    damage(path)
    with pytest.raises(CorruptFileError) as err:
        QueryManifest.load(path)
    names_file_and_command(err.value, path, SELECT_COMMAND)
    # the command it names selects the queries again (a manifest that passes is kept)
    with pytest.warns(UserWarning, match=rf"query manifest {re.escape(str(path))} is damaged"):
        assert main(["select-queries", "--config", str(config)]) == 0
    rebuilt = QueryManifest.load(path)
    assert rebuilt.content_hash() == original.content_hash()
    assert rebuilt.queries == original.queries
    mtime = path.stat().st_mtime_ns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["select-queries", "--config", str(config)]) == 0
    assert path.stat().st_mtime_ns == mtime
    assert not [w for w in caught if "query manifest" in str(w.message)]


# ----------------------------------------------------------------------------------------
# A folder's cached query manifest (computed at every setup: rewritten when damaged)


def _folder(root: Path) -> Path:
    for identity in range(3):
        for index in range(3):
            out = root / f"person_{identity}" / f"{index}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            synthetic_face(0, identity, index, size=40).save(out)
    return root


@pytest.mark.parametrize("damage", DAMAGES)
def test_folder_manifest_damage_is_rewritten_equal(
    tmp_path: Path, monkeypatch, damage: Callable[[Path], None]
):
    monkeypatch.setenv("CROSSRES_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "faces")

    def setup() -> FolderFacesDataModule:
        dm = FolderFacesDataModule(
            str(root), resolutions=[0], input_size=32, resize_shortest=None, verbose=False
        )
        dm.setup("test")
        return dm

    first = setup()
    path = first.manifest_file
    assert path is not None and is_complete(path)
    original = QueryManifest.load(path)
    damage(path)
    with pytest.raises(CorruptFileError):
        QueryManifest.load(path)
    again = setup()
    assert again.manifest_file == path and is_complete(path)
    assert QueryManifest.load(path).content_hash() == original.content_hash()
    assert again.manifest_hash == first.manifest_hash
