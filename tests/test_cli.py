"""The benchmark through its command line: smoke run, resume after SIGKILL, DDP parity,
bad input, refused reruns (changed config or weights), the run directory, and the live
metrics against the report's tables. Synthetic faces and a tiny seeded model keep each run
to seconds."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from cli_configs import TINY_TARGET, crossres_config, cw, dr, tiny_synthetic, with_overrides
from crossres.cli import main
from crossres.datamodules import SyntheticFacesDataModule
from crossres.io import sha256_file
from crossres.models.tiny import TinyFaceNet
from crossres.report.tables import summarize
from crossres.store import ResultStore

CONFIG = crossres_config(
    TINY_TARGET,
    tiny_synthetic(),
    [cw("CW-L2 (2-8)", binary_search_steps=2, steps=8), dr("DR (8-6)", epsilon=8 / 255, steps=6)],
)
N_QUERIES = 6 * 2 * 2  # identities x query images x resolutions
N_ROWS = N_QUERIES * 3  # clean + two attacks


def write_config(tmp_path: Path, **overrides) -> Path:
    cfg = with_overrides(CONFIG, overrides)
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(config: Path, run_dir: Path, *extra: str) -> int:
    return main(
        ["test", "--config", str(config), "--trainer.default_root_dir", str(run_dir), *extra]
    )


def kill_when(
    config: Path, run_dir: Path, ready: Callable[[int], bool], timeout: float = 240
) -> int:
    """Run ``crossres test`` in a process group of its own, SIGKILL it as soon as
    ``ready(stored rows)`` holds (polled), and return the rows it left: some, not all."""
    proc = subprocess.Popen(
        cli_command(config, run_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                n = len(ResultStore(run_dir).rows())
            except Exception:  # the first file may be mid-creation
                n = 0
            if ready(n):
                break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = len(ResultStore(run_dir).rows())
    assert 0 < partial < N_ROWS, f"kill landed outside the run ({partial} rows)"
    return partial


def csv_logger(save_dir: Path) -> list[str]:
    return [
        "--trainer.logger=pytorch_lightning.loggers.CSVLogger",
        f"--trainer.logger.save_dir={save_dir}",
    ]


def logged_metrics(save_dir: Path) -> dict[str, float]:
    """The last value logged under every name (the metric callback logs its final, global
    values after the running ones), checking that running values were logged before it."""
    (path,) = save_dir.rglob("metrics.csv")
    out: dict[str, float] = {}
    steps: set[str] = set()
    with path.open() as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if v != "" and k != "step"})
            steps.add(row["step"])
    assert len(steps) >= 2, "only the final values were logged, no running ones"
    return out


def assert_metrics_equal_tables(logged: dict[str, float], run_dir: Path) -> None:
    """Every table value the metric classes compute was logged, and equals the report's."""
    expected = {}
    for (model, attack, res), cell in tables(run_dir).items():
        for name in ("success_rate", "hit_rate", "fpir_at_fnir"):
            value = getattr(cell, name)
            if not math.isnan(value):
                expected[f"{model}/{attack}/r{res}/{name}"] = value
    assert len(expected) >= 2 * 2 * 3 + 2 * 2  # success for both attacks, hit, FPIR
    assert {k: logged.get(k) for k in expected} == expected  # exact: same definitions


def cli_command(config: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "crossres.cli",
        "test",
        "--config",
        str(config),
        "--trainer.default_root_dir",
        str(run_dir),
        *extra,
    ]


def tables(run_dir: Path) -> dict:
    return {(c.model, c.attack, c.resolution): c for c in summarize(ResultStore(run_dir).rows())}


def assert_same_tables(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for field in ("n", "success_rate", "hit_rate", "fpir_at_fnir"):
            x, y = getattr(a[key], field), getattr(b[key], field)
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y), (key, field, x, y)
        assert a[key].mean_l2 == pytest.approx(b[key].mean_l2, rel=1e-3, abs=1e-5), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """One uninterrupted single-process run, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("reference")
    config = write_config(tmp)
    run_cli(config, tmp / "run")
    return config, tmp / "run"


def test_smoke_run_writes_everything(reference):
    _, run_dir = reference
    rows = ResultStore(run_dir).rows()
    assert len(rows) == N_ROWS
    for name in ("run.json", "config.yaml", "report.md"):
        assert (run_dir / name).is_file(), name
    report = (run_dir / "report.md").read_text()
    assert "Table 1: attack success rate" in report and "CW-L2 (2-8)" in report
    # an embedder's classification attacks attack a softmax head fitted on the gallery photos
    record = json.loads((run_dir / "run.json").read_text())
    assert record["classifiers"]["tiny"]["kind"] == "softmax head"
    assert record["classifiers"]["tiny"]["training"]["train_accuracy"] > 1 / 6  # above chance
    assert "| tiny | softmax head |" in report
    # the frozen target measured each clean query's feature drift (tests/test_feature_drift.py)
    clean = [r for r in rows if r.attack == "clean"]
    assert all(r.feature_drift == 0.0 for r in clean if r.resolution == 0)
    assert all(r.feature_drift > 0 for r in clean if r.resolution == 8)
    assert "## Feature drift" in report
    dr = [r for r in rows if r.attack == "DR (8-6)"]
    assert all(r.linf <= 8 / 255 + 1e-6 for r in dr)
    assert all(r.target is not None and r.target != r.identity for r in dr)


def test_rerun_resumes_and_changed_config_is_refused(reference, tmp_path, capsys):
    config, run_dir = reference
    before = [repr(r) for r in ResultStore(run_dir).rows()]  # repr: NaN == NaN
    assert run_cli(config, run_dir) == 0  # everything stored: nothing is attacked again
    assert [repr(r) for r in ResultStore(run_dir).rows()] == before
    changed = write_config(tmp_path, **{"trainer.callbacks.0.init_args.attack.init_args.steps": 9})
    capsys.readouterr()
    assert run_cli(changed, run_dir) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and len(err.strip().splitlines()) == 1


def test_sigkill_then_resume_gives_the_same_tables(reference, tmp_path):
    config, ref_dir = reference
    run_dir = tmp_path / "killed"
    kill_when(config, run_dir, lambda n: n >= 6)
    assert run_cli(config, run_dir, *csv_logger(tmp_path / "logs")) == 0
    rows = ResultStore(run_dir).rows()
    assert len(rows) == N_ROWS and len({r.key for r in rows}) == N_ROWS
    assert_same_tables(tables(run_dir), tables(ref_dir))
    # the live metrics of the resumed run were seeded with the rows stored before the kill
    assert_metrics_equal_tables(logged_metrics(tmp_path / "logs"), run_dir)


@pytest.mark.slow
def test_ddp_two_processes_match_one(reference, tmp_path):
    config, ref_dir = reference
    run_dir = tmp_path / "ddp"
    out = subprocess.run(
        cli_command(
            config,
            run_dir,
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            *csv_logger(tmp_path / "logs"),
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list((run_dir / "results").glob("rank-*.sqlite"))) == 2
    rows = ResultStore(run_dir).rows()
    assert len(rows) == N_ROWS
    assert_same_tables(tables(run_dir), tables(ref_dir))
    # the metric states of both processes were gathered: the global values, exactly
    assert_metrics_equal_tables(logged_metrics(tmp_path / "logs"), run_dir)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"model.init_args.targets.0.name": "no_such_model"}, "unknown model 'no_such_model'"),
        ({"trainer.callbacks.1.init_args.attack.init_args.epsilon": -0.1}, "epsilon"),
        ({"trainer.callbacks.0.init_args.attack.init_args.steps": 0}, "steps"),
        ({"data.init_args.resolutions": []}, "resolutions"),
        ({"model.init_args.targets.0.weights": "/no/such/file.pt"}, "/no/such/file.pt"),
    ],
)
def test_bad_input_fails_before_crafting(tmp_path, override, message, capsys):
    config = write_config(tmp_path, **override)
    assert run_cli(config, tmp_path / "run") == 2  # one line, no traceback: test_bad_input.py
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "results").exists()


def test_gallery_command_builds_the_templates(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["gallery", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "tiny: 6 templates x 32" in out


def test_report_command_rewrites_the_report(reference, tmp_path, capsys):
    _, run_dir = reference
    (run_dir / "report.md").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert "Table 2: hit rate" in (run_dir / "report.md").read_text()
    assert main(["report", str(tmp_path)]) == 2
    assert "no results/ folder" in capsys.readouterr().err


def test_duplicate_attack_names_fail_before_crafting(tmp_path, capsys):
    config = write_config(tmp_path, **{"trainer.callbacks.1.init_args.name": "CW-L2 (2-8)"})
    assert run_cli(config, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "same name" in err and "CW-L2 (2-8)" in err
    assert not (tmp_path / "run" / "results").exists()  # not even a clean row was written


def test_store_run_dir_is_the_one_run_directory(reference, tmp_path):
    config, ref_dir = reference
    run_dir, root = tmp_path / "chosen", tmp_path / "root"
    assert run_cli(config, root, f"--store.run_dir={run_dir}") == 0
    for name in ("run.json", "config.yaml", "report.md", "results"):
        assert (run_dir / name).exists(), name
    assert not root.exists() or not any(root.iterdir())
    assert "CW-L2 (2-8)" in (run_dir / "report.md").read_text()  # the report read this store
    assert_same_tables(tables(run_dir), tables(ref_dir))


def test_rewritten_weight_file_is_refused(tmp_path, capsys):
    weights = tmp_path / "tiny.pt"
    torch.save(TinyFaceNet(seed=1).state_dict(), weights)
    cw = CONFIG["trainer"]["callbacks"][0]
    config = write_config(
        tmp_path,
        **{"model.init_args.targets.0.weights": str(weights), "trainer.callbacks": [cw]},
    )
    run_dir = tmp_path / "run"
    assert run_cli(config, run_dir) == 0
    record = json.loads((run_dir / "run.json").read_text())
    assert record["weights"]["tiny"]["sha256"] == sha256_file(weights)
    dm = SyntheticFacesDataModule(**CONFIG["data"]["init_args"])
    dm.setup("test")
    assert record["manifest_hash"] == dm.manifest_hash and len(dm.manifest_hash) == 64
    before = [repr(r) for r in ResultStore(run_dir).rows()]

    torch.save(TinyFaceNet(seed=2).state_dict(), weights)  # same path, other content
    capsys.readouterr()
    assert run_cli(config, run_dir) == 2
    err = capsys.readouterr().err
    assert "'tiny' weights" in err and str(weights) in err and len(err.strip().splitlines()) == 1
    assert [repr(r) for r in ResultStore(run_dir).rows()] == before
    assert json.loads((run_dir / "run.json").read_text())["weights"] == record["weights"]


def test_second_run_on_a_busy_run_directory_is_refused_at_once(reference, tmp_path):
    """One run directory, one run: while another process holds the directory's lock (here a
    bare holder, so that no start-up race decides the outcome), ``crossres test`` stops with one
    line naming the holder; once the holder is SIGKILLed (the kernel drops its lock), the same
    command runs."""
    config, _ = reference
    run_dir = tmp_path / "busy"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from crossres.locks import RunDirLock; "
            "lock = RunDirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run(
            cli_command(config, run_dir), capture_output=True, text=True, timeout=300
        )
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2
    err = [line for line in second.stderr.splitlines() if line.startswith("crossres:")]
    assert "Traceback" not in second.stderr
    assert len(err) == 1 and "in use by process" in err[0] and str(holder.pid) in err[0]
    assert not (run_dir / "run.json").exists()  # refused before claiming anything
    assert run_cli(config, run_dir) == 0  # the killed holder left no stuck lock
    assert len(ResultStore(run_dir).rows()) == N_ROWS
