"""Bad input, everywhere a user types: each row of README's "When something is wrong" table is a
test here. What the user must see: one line ``crossres: <message>`` naming the bad thing, no
traceback, exit status 2 (non-zero where noted), and the rows finished before a mid-run
failure still in the store.

The configuration errors run the CLI in this process (``crossres.cli.main`` returns the exit
status, stderr is captured); the disk-full case runs it in a subprocess under a file-size
limit, as a user's shell would see it. A tiny seeded model and synthetic faces (VGGFace2's
layout on a fake tree for the image files) keep each run to seconds."""

from __future__ import annotations

import dataclasses
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch._utils import ExceptionWrapper  # what DataLoader workers send their errors in

from cli_configs import TINY_TARGET, crossres_config, dr, tiny_synthetic, with_overrides
from crossres.cli import _crossres_error, _one_line, main
from crossres.datamodules.base import CorruptImageError
from crossres.datamodules.manifest import QueryManifest, model_hash
from crossres.datamodules.query_selection import select_queries
from crossres.datamodules.vggface2 import VGGFace2DataModule
from crossres.models import build_model
from crossres.models.tiny import TinyFaceNet
from crossres.store import ResultStore
from test_vggface2 import SMALL, ColourNet, make_tree

DR = dr("DR (8-2)", epsilon=8 / 255, steps=2)
CONFIG = crossres_config(TINY_TARGET, tiny_synthetic(), [DR])


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """Templates and manifests go to a cache of this module's own."""
    cache = tmp_path_factory.getbasetemp() / "bad-input-cache"
    monkeypatch.setenv("CROSSRES_CACHE", str(cache))
    torch.set_num_threads(1)


def write_config(folder: Path, overrides: dict, name: str = "config.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(with_overrides(CONFIG, overrides)))
    return path


def the_error_line(stderr: str) -> str:
    """The one ``crossres:`` line of stderr; no traceback, no jsonargparse usage dump."""
    assert "Traceback" not in stderr and "usage:" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("crossres: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def run_test(config: Path, run_dir: Path, *extra: str) -> int:
    return main(
        ["test", "--config", str(config), "--trainer.default_root_dir", str(run_dir), *extra]
    )


class Payload:
    """A pickle that runs a shell command when loaded (what a malicious weight file does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    good = folder / "good.pt"
    torch.save(TinyFaceNet().state_dict(), good)
    files = {"good": good, "shape": folder / "wide.pt", "truncated": folder / "truncated.pt"}
    torch.save(TinyFaceNet(feature_dim=16).state_dict(), files["shape"])
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["malicious"] = folder / "malicious.pt"
    files["marker"] = folder / "payload-ran"
    torch.save({"body.0.weight": Payload(files["marker"])}, files["malicious"])
    return files


VGGFACE2 = {"class_path": "crossres.datamodules.VGGFace2DataModule"}
FOLDER = {"class_path": "crossres.datamodules.FolderFacesDataModule"}
TARGET_WEIGHTS = "model.init_args.targets.0.weights"

# (overrides of CONFIG, what the one line must contain): every one fails before any row
CASES = {
    "string where an int goes": (
        {"data.init_args.batch_size": "three"},
        ["data.batch_size", "three", "int"],
    ),
    "unknown key": ({"data.init_args.batchsize": 3}, ["batchsize", "not accepted"]),
    "value out of range": (
        {"trainer.callbacks.0.init_args.attack.init_args.epsilon": -0.1},
        ["epsilon must be > 0", "-0.1"],
    ),
    "unknown model": (
        {"model.init_args.targets.0.name": "no_such_model"},
        ["unknown model 'no_such_model'", "tiny_facenet"],
    ),
    "unknown attack class": (
        {"trainer.callbacks.0.init_args.attack.class_path": "crossres.attacks.NoSuchAttack"},
        ["crossres.attacks.NoSuchAttack", "NoSuchAttack"],
    ),
    "unknown objective": (
        {"trainer.callbacks.0.init_args.objective": "impersonate"},
        ["objective", "impersonate", "impersonation"],
    ),
    "resolutions empty": ({"data.init_args.resolutions": []}, ["resolutions", "at least one"]),
    "resolutions negative": (
        {"data.init_args.resolutions": [16, -8]},
        ["resolutions must be >= 0", "[-8]"],
    ),
    "missing VGGFace2 root": (
        {"data": {**VGGFACE2, "init_args": {"root": "/no/such/vggface2"}}},
        ["/no/such/vggface2"],
    ),
    "missing photo folder": (
        {"data": {**FOLDER, "init_args": {"root": "/no/such/faces"}}},
        ["/no/such/faces"],
    ),
    "missing weights file": ({TARGET_WEIGHTS: "/no/such/weights.pt"}, ["/no/such/weights.pt"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_configuration_is_one_line_and_no_row(case, tmp_path, capsys):
    overrides, expected = CASES[case]
    config = write_config(tmp_path, overrides)
    assert run_test(config, tmp_path / "run") == 2
    line = the_error_line(capsys.readouterr().err)
    for text in expected:
        assert text in line, line
    assert ResultStore(tmp_path / "run").rows() == []


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("shape", ["wide.pt", "body.8.weight", "shape mismatch", "[32, 32]", "[16, 32]"]),
        ("truncated", ["truncated.pt", "truncated or corrupt"]),
        ("malicious", ["malicious.pt", "refused", "system"]),
    ],
)
def test_bad_weight_file_is_one_line_and_no_row(kind, expected, weight_files, tmp_path, capsys):
    config = write_config(tmp_path, {TARGET_WEIGHTS: str(weight_files[kind])})
    assert run_test(config, tmp_path / "run") == 2
    line = the_error_line(capsys.readouterr().err)
    for text in expected:
        assert text in line, line
    assert not weight_files["marker"].exists()  # the payload never ran
    assert ResultStore(tmp_path / "run").rows() == []


def test_bad_yaml_syntax_or_missing_config_is_one_line(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("model:\n  class_path: [unclosed\n")
    assert run_test(config, tmp_path / "run") == 2
    line = the_error_line(capsys.readouterr().err)
    assert f"{config}, line 2, column 15" in line, line  # the file and place, not PyYAML's
    assert run_test(tmp_path / "no-such.yaml", tmp_path / "run") == 2
    line = the_error_line(capsys.readouterr().err)
    assert "does not exist" in line and str(tmp_path / "no-such.yaml") in line, line


# ------------------------------------------------------------------ a corrupt JPEG mid-run


def test_corrupt_jpeg_mid_run_stops_naming_it_and_keeps_the_finished_rows(tmp_path, capsys):
    """VGGFace2 reads every image when its batch comes (``skip_corrupt`` off by default): a
    JPEG that cannot be decoded stops the run at its batch, and the batches before it stay."""
    root = make_tree(tmp_path / "vggface2")
    selection = dict(n_identities=2, n_images=2)
    manifest_path = tmp_path / "manifest.json"
    # the queries, chosen by a model that classifies the fake faces (the tiny target cannot),
    # then handed to the tiny target as its own selection
    select_queries(
        VGGFace2DataModule(str(root), str(manifest_path), **selection, **SMALL), ColourNet()
    )
    manifest = QueryManifest.load(manifest_path)
    tiny = build_model("tiny_facenet")
    dataclasses.replace(manifest, model_hashes=[model_hash(tiny)]).save(manifest_path)
    data = {
        **VGGFACE2,
        "init_args": {
            "root": str(root),
            "manifest": str(manifest_path),
            **selection,
            "resolutions": [8, 0],
            "batch_size": 1,
        },
    }
    config = write_config(tmp_path, {"data": data})
    # items run resolution-major in manifest order: query 3 at resolution 8 is batch 3
    bad = root / "train" / manifest.queries[3].path
    intact = bad.read_bytes()
    bad.write_bytes(intact[:300])  # a truncated download
    assert run_test(config, tmp_path / "run") == 2
    line = the_error_line(capsys.readouterr().err)
    assert str(bad) in line and "skip_corrupt" in line, line
    rows = ResultStore(tmp_path / "run").rows()
    # Lightning fetches one batch ahead: batch 3 is read while batch 2 is under attack,
    # so batches 0 and 1 are finished (clean + DR rows each) and batch 2 may not be
    done = {(r.sample_id, r.resolution) for r in rows}
    first = [(q.sample_id, 8) for q in manifest.queries[:3]]
    assert set(first[:2]) <= done <= set(first), done
    for key in done:
        assert sorted(r.attack for r in rows if (r.sample_id, r.resolution) == key) == [
            "DR (8-2)",
            "clean",
        ]
    bad.write_bytes(intact)  # fixed: the same command finishes the run
    assert run_test(config, tmp_path / "run") == 0
    resumed = ResultStore(tmp_path / "run").rows()
    assert len(resumed) == 4 * 2 * 2  # queries x resolutions x (clean + DR)
    assert {repr(r) for r in rows} <= {repr(r) for r in resumed}


def test_error_from_a_loader_worker_is_its_own_line_not_the_worker_traceback():
    """With ``num_workers > 0`` PyTorch re-raises the worker's error with the worker's
    traceback as its message: the CLI prints the error's own line."""
    try:
        raise CorruptImageError("cannot read image /data/x.jpg: OSError: Truncated File Read")
    except CorruptImageError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(CorruptImageError) as err:
        wrapped.reraise()
    assert "Traceback" in str(err.value)  # what PyTorch hands over
    line = _one_line(_crossres_error(err.value))
    assert line == "cannot read image /data/x.jpg: OSError: Truncated File Read"


# ------------------------------------------------------------------ disk full mid-run

# Per-file size limit of the second run: above every file it writes besides the store's
# write-ahead log (config.yaml, run.json ~2 KB; SQLite's shared-memory index is exactly
# 32 KiB), below what the log needs for the remaining batches (two ~8 KB frames per batch).
FILE_SIZE_LIMIT = 32 * 1024


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory):
    """A run that stores 3 of its 8 batches, then the same command resumed under a file-size
    limit (EFBIG: what a full disk or quota gives a writer): its exit, stderr, and the rows
    stored before it."""
    tmp = tmp_path_factory.mktemp("disk-full")
    cache = tmp_path_factory.getbasetemp() / "bad-input-cache"
    # adversarial images off: the result store is the writer under test (the image store's
    # full-disk error is the same one line, from crossres.io, tested there)
    no_images = {"trainer.callbacks.0.init_args.keep_adversarials": False}
    config, run_dir = write_config(tmp, no_images), tmp / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CROSSRES_CACHE", str(cache))
        assert run_test(config, run_dir, "--trainer.limit_test_batches=3") == 0
    before = [repr(r) for r in ResultStore(run_dir).rows()]  # repr: NaN == NaN

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG), not the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))

    command = [sys.executable, "-m", "crossres.cli", "test", "--config", str(config)]
    out = subprocess.run(
        [*command, "--trainer.default_root_dir", str(run_dir)],
        preexec_fn=limit_file_size,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CROSSRES_CACHE": str(cache), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    return out, run_dir, before, config


def test_disk_full_exits_non_zero_and_keeps_the_stored_rows(disk_full):
    out, run_dir, before, config = disk_full
    assert out.returncode != 0
    assert "disk" in out.stderr.lower(), out.stderr[-2000:]  # sqlite: "disk I/O error"
    assert len(before) == 3 * 3 * 2  # 3 batches of 3 queries, clean + DR
    after = {repr(r) for r in ResultStore(run_dir).rows()}  # readable after the failed write
    assert set(before) <= after  # every row stored before is still there, unchanged
    assert len(after) < 6 * 2 * 2 * 2  # the limit stopped the run before its end
    assert run_test(config, run_dir) == 0  # space again: the same command finishes the run
    assert len(ResultStore(run_dir).rows()) == 6 * 2 * 2 * 2  # identities x queries x res x 2


def test_disk_full_is_one_line_naming_the_store_file(disk_full):
    out, run_dir, _, _ = disk_full
    assert out.returncode == 2
    line = the_error_line(out.stderr)
    assert str(run_dir / "results" / "rank-0.sqlite") in line and "disk" in line, line


def test_corrupt_result_file_is_named_with_what_is_recoverable(tmp_path, capsys):
    """A damaged ``rank-*.sqlite`` (here: its bytes overwritten) is reported by name, with
    what is intact and how to recover, as one line; the other files are untouched."""
    from crossres.store import ResultRow

    run_dir = tmp_path / "run"
    store = ResultStore(run_dir)
    for rank in (0, 1):
        w = store.writer(rank)
        w.write([ResultRow(model="m", attack="clean", sample_id=rank, resolution=0, identity=1)])
        w.close()
    bad = run_dir / "results" / "rank-1.sqlite"
    bad.write_bytes(b"not a database" * 100)
    assert main(["report", str(run_dir)]) == 2
    line = the_error_line(capsys.readouterr().err)
    assert str(bad) in line and "1 result file(s) are intact" in line and "rerun" in line
