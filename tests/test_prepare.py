"""Building a model never trains one: ``crossres prepare`` trains and records the default's CR
weights; ``build_model("dlib_resnet29_cr")`` only loads them (or says to run the command); the
CLI turns any ``CrossresError`` into one line on stderr and status 2.

The training itself is ``crossres fit`` (tested in test_cr_training.py); here ``fit`` is a
stand-in that writes the student as ``StudentExport`` does, so the cache logic is tested
without minutes of training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from crossres.cli import main as crossres_main
from crossres.errors import NotPreparedError
from crossres.io import CorruptFileError, sidecar_path
from crossres.lightning_modules.cr_export import save_state_dict
from crossres.lightning_modules.cr_recipe import CR_DLIB_RECIPE, ensure_cr_dlib_weights
from crossres.models import DlibResNet29, build_model
from crossres.models.dlib_resnet import packaged_dlib_model_path
from crossres.models.prepared import prepared_weights, record_path, record_prepared
from crossres.paths import cache_dir, sha256_file
from crossres.prepare import main as prepare_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def faces() -> str:
    """The fetched embedded faces (``make test`` fetches them first), read from their usual
    cache even after a test points ``CROSSRES_CACHE`` elsewhere."""
    path = cache_dir("faces")
    if not (path / "manifest.json").is_file():
        pytest.skip("the embedded faces are not fetched (crossres fetch-faces)")
    return str(path)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CROSSRES_CACHE", str(root))
    return root


class FakeFit:
    """Stands in for ``crossres fit``: checks the command line it is given is the recipe's,
    then exports a randomly initialised student (seeded by the call count) as StudentExport
    does."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv) -> None:
        argv = list(argv)
        self.calls.append(argv)
        assert argv[:2] == ["fit", "--config"]
        config = yaml.safe_load(Path(argv[2]).read_text())
        recipe = config
        recipe["data"]["init_args"]["source"]["init_args"].pop("faces_cache")
        assert recipe == CR_DLIB_RECIPE
        root = Path(argv[argv.index("--trainer.default_root_dir") + 1])
        torch.manual_seed(len(self.calls))
        save_state_dict(DlibResNet29(), root / "student.pt")


def test_build_model_without_prepared_weights_names_the_command(empty_cache):
    with pytest.raises(NotPreparedError, match="crossres prepare") as info:
        build_model("dlib_resnet29_cr")
    assert "\n" not in str(info.value)
    assert not list((empty_cache / "models").glob("dlib_resnet29-cr-*")), "nothing was trained"


def test_cli_stops_with_one_line_when_the_cr_weights_are_missing(empty_cache, tmp_path, capsys):
    rc = crossres_main(
        [
            "test",
            "--config",
            str(ROOT / "configs" / "default.yaml"),
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("crossres: ") and "crossres prepare" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_cli_keeps_the_traceback_of_a_bug(monkeypatch):
    import crossres.cli as cli

    def boom(argv):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(cli, "run_lightning", boom)
    with pytest.raises(KeyError):
        cli.main(["test"])


def _write_prepared(name: str, state_model: torch.nn.Module, **facts) -> Path:
    path = cache_dir("models") / f"{name}-weights.pt"
    digest = save_state_dict(state_model, path)
    record_prepared(name, path, sha256=digest, **facts)
    return path


def test_prepared_weights_are_checked_against_sidecar_record_and_facts(empty_cache):
    torch.manual_seed(0)
    path = _write_prepared("m", torch.nn.Linear(3, 2), teacher_sha256="aa")
    assert prepared_weights("m", expect={"teacher_sha256": "aa"}) == path
    with pytest.raises(NotPreparedError, match="another teacher_sha256.*crossres prepare"):
        prepared_weights("m", expect={"teacher_sha256": "bb"})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=f"{path.name}.*crossres prepare --force"):
        prepared_weights("m")
    record_path("m").write_text("{not json")
    with pytest.raises(NotPreparedError, match="not a readable record"):
        prepared_weights("m")


def test_build_model_loads_the_recorded_cr_weights(empty_cache):
    torch.manual_seed(3)
    student = DlibResNet29()
    teacher = sha256_file(packaged_dlib_model_path())
    path = _write_prepared("dlib_resnet29_cr", student, teacher_sha256=teacher)
    model = build_model("dlib_resnet29_cr")
    for k, v in student.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.pretrained_cfg.weights_hash == sha256_file(path)
    record_prepared("dlib_resnet29_cr", path, sha256=sha256_file(path), teacher_sha256="0" * 64)
    with pytest.raises(NotPreparedError, match="teacher_sha256"):
        build_model("dlib_resnet29_cr")


def test_ensure_trains_once_adopts_old_files_and_retrains_corrupt_ones(faces, empty_cache):
    fit, logs = FakeFit(), []
    first = ensure_cr_dlib_weights(fit=fit, faces_cache=faces, log=logs.append)
    assert first.action == "trained" and len(fit.calls) == 1
    assert sha256_file(first.path) == first.sha256
    assert sidecar_path(first.path).read_text().split()[0] == first.sha256
    record = json.loads(first.path.with_suffix(".json").read_text())
    assert record["sha256"] == first.sha256 and record["teacher_sha256"] == first.teacher_sha256

    again = ensure_cr_dlib_weights(fit=fit, faces_cache=faces, log=logs.append)
    assert (again.action, again.path, len(fit.calls)) == ("found", first.path, 1)

    sidecar_path(first.path).unlink()  # as an older crossres left it: JSON record, no sidecar
    adopted = ensure_cr_dlib_weights(fit=fit, faces_cache=faces, log=logs.append)
    assert (adopted.action, adopted.sha256, len(fit.calls)) == ("adopted", first.sha256, 1)
    assert sidecar_path(first.path).is_file()

    first.path.write_bytes(first.path.read_bytes()[:-10])  # a damaged file is retrained
    redone = ensure_cr_dlib_weights(fit=fit, faces_cache=faces, log=logs.append)
    assert redone.action == "trained" and len(fit.calls) == 2
    assert any("retraining" in line for line in logs)

    forced = ensure_cr_dlib_weights(fit=fit, faces_cache=faces, force=True, log=logs.append)
    assert forced.action == "trained" and len(fit.calls) == 3 and forced.sha256 != redone.sha256
    assert not [p for p in forced.path.parent.iterdir() if p.is_dir()], "work folder left over"


def test_prepare_command_records_what_build_model_loads(faces, empty_cache, capsys):
    fit = FakeFit()
    assert prepare_main(["--faces-cache", faces], fit=fit) == 0
    out = capsys.readouterr().out
    assert "trained" in out and len(fit.calls) == 1
    model = build_model("dlib_resnet29_cr")
    assert prepare_main(["--faces-cache", faces], fit=fit) == 0
    assert "found cached" in capsys.readouterr().out and len(fit.calls) == 1
    assert build_model("dlib_resnet29_cr").pretrained_cfg.weights_hash == (
        model.pretrained_cfg.weights_hash
    )


def test_a_killed_trainings_folder_is_cleared_and_a_live_one_refused(faces, empty_cache):
    from crossres.lightning_modules.cr_recipe import cr_dlib_weights_path
    from crossres.locks import RunDirBusyError, RunDirLock

    target = cr_dlib_weights_path(faces_cache=faces)
    work = target.with_name(target.stem + ".work")
    (work / "fit" / "checkpoints").mkdir(parents=True)  # as a SIGKILLed training left it
    (work / "fit" / "checkpoints" / "last.ckpt").write_bytes(b"half")
    logs: list[str] = []
    busy = pytest.raises(RunDirBusyError, match="CR training folder.*wait for that crossres")
    with RunDirLock(work), busy:  # a live `crossres prepare` holds the training folder
        ensure_cr_dlib_weights(fit=FakeFit(), faces_cache=faces, log=logs.append)
    fit = FakeFit()
    done = ensure_cr_dlib_weights(fit=fit, faces_cache=faces, log=logs.append)
    assert done.action == "trained" and len(fit.calls) == 1
    assert any("left by an interrupted training" in line for line in logs)
    assert not work.exists(), "the training folder outlived its training"


def test_prepare_trains_the_recipe_file_it_is_given(faces, empty_cache, tmp_path, capsys):
    recipe = yaml.safe_load(yaml.safe_dump(CR_DLIB_RECIPE))
    recipe["trainer"]["max_epochs"] = 1
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    seen = []

    def fit(argv):
        config = yaml.safe_load(Path(argv[2]).read_text())
        seen.append(config["trainer"]["max_epochs"])
        root = Path(argv[argv.index("--trainer.default_root_dir") + 1])
        save_state_dict(DlibResNet29(), root / "student.pt")

    assert prepare_main(["--faces-cache", faces, "--recipe", str(path)], fit=fit) == 0
    assert seen == [1]
    weights = prepared_weights("dlib_resnet29_cr")
    assert (
        json.loads(weights.with_suffix(".json").read_text())["recipe"]["trainer"]["max_epochs"] == 1
    )


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "no such file"),
        ("a: [", "not YAML"),
        ("trainer: {}\n", "not a CR recipe"),
        (
            "model: {init_args: {model: arcface_iresnet50}}\n"
            "data: {init_args: {source: {init_args: {}}}}\n",
            "crossres fit --config",
        ),
    ],
)
def test_a_bad_recipe_file_is_one_line(text, message, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    if text is not None:
        path.write_text(text)
    rc = crossres_main(["prepare", "--recipe", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and message in err[-1] and str(path) in err[-1]
