"""W&B for real: ``crossres test`` with an offline ``WandbLogger``, read back from the run's
``.wandb`` transaction log by wandb's own reader (``wandb leet inspect --json``, the records
``wandb sync`` would upload), and compared with the result store: the results table's rows,
every metric key and value of the metric and report callbacks, the report's figures and the
clean | adversarial | perturbation examples of every (model, attack). A second run uses the
logger section of ``configs/default.yaml`` as shipped (tiny model and data in place of the
default's), so the default's logger path is exercised too."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cli_configs import TINY_TARGET, cw, dr, tiny_synthetic
from crossres.cli import main
from crossres.report.drift import drift_cells
from crossres.report.tables import summarize
from crossres.store import ResultStore, rows_to_dicts

ROOT = Path(__file__).resolve().parents[1]
DR_EPSILON = 8 / 255
N_IMAGES = 4  # ReportCallback's default log_images
CALLBACKS = [
    cw("CW-L2 (1-4)", binary_search_steps=1, steps=4),
    dr("DR (8-4)", epsilon=DR_EPSILON, steps=4),
]
MODEL = TINY_TARGET
DATA = tiny_synthetic(n_identities=4, batch_size=8)
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
METRIC_KEY = re.compile(r"^[^/]+/[^/]+/r\d+/(success_rate|hit_rate|fpir_at_fnir|mean_l2)$")


@pytest.fixture(autouse=True)
def wandb_home(tmp_path, monkeypatch, one_thread):
    """wandb's settings, cache and artifact staging in tmp, never the user's home; the mode
    left to the logger's own ``offline`` flag."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_NAME", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)


def run_and_finish(cfg: dict, tmp_path: Path, *extra: str) -> Path:
    """``crossres test`` in this process, then ``wandb.finish()``: the logger leaves its run
    open until the process exits (the CLI's case), and the log is complete only after it."""
    import wandb

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    try:
        code = main(
            ["test", "--config", str(config), "--trainer.default_root_dir", str(run_dir), *extra]
        )
    finally:
        wandb.finish()
    assert code == 0
    return run_dir


def read_log(save_dir: Path) -> tuple[Path, list[dict]]:
    """The single offline run under ``save_dir``: its files folder and its records, as
    wandb's own reader of ``.wandb`` files prints them."""
    (log,) = save_dir.glob("wandb/offline-run-*/run-*.wandb")
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert records and records[-1]["type"] == "exit", "the run's log is incomplete"
    assert records[-1]["exit"].get("exit_code", 0) == 0
    return log.parent / "files", records


def history(records: list[dict]) -> dict:
    """The last value logged under every (flattened) history key."""
    last: dict = {}
    for r in records:
        if r["type"] == "history":
            last.update(r["history"]["item"])
    return last


def expected_metrics(rows) -> dict[str, float]:
    """What the metric callback (success, hit, FPIR) and the report callback (mean L2) log
    at the end: every defined value of the report's tables, by their documented names."""
    out = {}
    for c in summarize(rows):
        for name in ("success_rate", "hit_rate", "fpir_at_fnir", "mean_l2"):
            value = getattr(c, name)
            if not math.isnan(value):
                out[f"{c.model}/{c.attack}/r{c.resolution}/{name}"] = value
    return out


def assert_results_table(logged: dict, files: Path, rows) -> None:
    assert logged["results._type"] == "table-file"
    assert logged["results.nrows"] == len(rows) > 0
    table = json.loads((files / logged["results.path"]).read_text())
    stored = rows_to_dicts(rows)
    assert table["columns"] == list(stored[0])
    key = ("model", "attack", "sample_id", "resolution")
    index = [table["columns"].index(k) for k in key]
    got = sorted(tuple(d[i] for i in index) for d in table["data"])
    assert got == sorted(tuple(d[k] for k in key) for d in stored)


@pytest.mark.slow
def test_offline_run_holds_table_metrics_figures_and_examples(tmp_path):
    save_dir = tmp_path / "wb"
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "enable_checkpointing": False,
            **QUIET,
            "logger": {
                "class_path": "pytorch_lightning.loggers.WandbLogger",
                "init_args": {"offline": True, "save_dir": str(save_dir), "project": "crossres"},
            },
            "callbacks": CALLBACKS,
        },
        "model": MODEL,
        "data": DATA,
    }
    run_dir = run_and_finish(cfg, tmp_path)
    files, records = read_log(save_dir)
    logged = history(records)
    rows = ResultStore(run_dir).rows()
    assert len(rows) == 4 * 2 * 2 * 3  # identities x query images x resolutions x (clean + 2)

    assert_results_table(logged, files, rows)

    # metric keys: exactly the tables' defined cells, with the tables' values
    expected = expected_metrics(rows)
    metrics = {k: v for k, v in logged.items() if METRIC_KEY.match(k)}
    assert metrics.keys() == expected.keys()
    assert metrics == pytest.approx(expected, rel=1e-12, abs=0)
    # the report's numbers with their intervals (run_payload's ci/ keys) say the same (the
    # clean rows have no perturbation, so no mean_l2 interval)
    with_ci = {k: v for k, v in expected.items() if not re.match(r"[^/]+/clean/.*mean_l2$", k)}
    assert {k: logged[f"ci/{k}"] for k in with_ci} == pytest.approx(with_ci, rel=1e-12, abs=0)
    for attack in ("CW-L2 (1-4)", "DR (8-4)"):
        assert {f"tiny/{attack}/r{r}/success_rate" for r in (8, 0)} <= metrics.keys()

    # the feature drift table (report.drift), one scalar set per target and resolution
    cells = drift_cells(rows)
    assert cells and {f"drift/{c.model}/r{c.resolution}": c.mean for c in cells} == {
        k: v for k, v in logged.items() if re.fullmatch(r"drift/[^/]+/r\d+", k)
    }
    assert all(logged[f"drift/{c.model}/r{c.resolution}_n"] == c.n for c in cells)

    # the report's figures, one image each
    pngs = sorted((run_dir / "figures").glob("*.png"))
    assert pngs
    for png in pngs:
        assert logged[f"figures/{png.stem}._type"] == "image-file"
        assert (files / logged[f"figures/{png.stem}.path"]).is_file()

    # examples: per (model, attack), up to N_IMAGES grids clean | adversarial | perturbation
    for attack in ("CW-L2 (1-4)", "DR (8-4)"):
        key = f"examples/tiny/{attack}"
        assert logged[f"{key}._type"] == "images/separated"
        names = logged[f"{key}.filenames"]
        assert 1 <= len(names) == logged[f"{key}.count"] <= N_IMAGES
        for name in names:
            grid = np.asarray(Image.open(files / name).convert("RGB")).astype(int)
            assert grid.shape == (64, 3 * 64, 3)
            clean, adversarial, perturbation = grid[:, :64], grid[:, 64:128], grid[:, 128:]
            # synthetic faces: a mean colour in [0.3, 0.7] plus waves, never near black
            assert 40 < clean.mean() < 215 and 40 < adversarial.mean() < 215
            if attack.startswith("DR"):
                # within the L-inf budget (each side rounded to 1/255 once)
                assert np.abs(adversarial - clean).max() <= 255 * DR_EPSILON + 1
            # |delta| scaled to its maximum: all 0 where the attack stopped at the source
            assert perturbation.max() in (0, 255)
            if (adversarial != clean).any():
                assert perturbation.max() == 255
    assert len(logged["examples/tiny/DR (8-4).filenames"]) == N_IMAGES  # every query attacked


def test_default_config_logger_path(tmp_path):
    """configs/default.yaml's trainer section as shipped (its W&B logger without a save_dir,
    so the CLI puts the run's log in the run directory; its DR attack), tiny model and data."""
    default = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    trainer = dict(default["trainer"])
    assert trainer["logger"]["class_path"] == "pytorch_lightning.loggers.WandbLogger"
    assert "save_dir" not in trainer["logger"]["init_args"]
    del trainer["default_root_dir"]  # the test's run directory instead
    trainer["callbacks"] = [
        c for c in trainer["callbacks"] if c["init_args"]["name"] == "DR (4-10)"
    ]
    assert len(trainer["callbacks"]) == 1
    cfg = {**default, "trainer": {**trainer, **QUIET}, "model": MODEL, "data": DATA}
    run_dir = run_and_finish(cfg, tmp_path, "--report.write_report=false")

    files, records = read_log(run_dir)  # the logger wrote into the run directory
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    init_args = default["trainer"]["logger"]["init_args"]
    assert run["project"] == init_args["project"]
    assert run["display_name"] == init_args["name"]
    assert run["telemetry"]["feature"]["offline"] is True
    rows = ResultStore(run_dir).rows()
    assert len(rows) == 4 * 2 * 2 * 2  # clean + DR
    logged = history(records)
    assert_results_table(logged, files, rows)
    metrics = {k: v for k, v in logged.items() if METRIC_KEY.match(k)}
    assert metrics == pytest.approx(expected_metrics(rows), rel=1e-12, abs=0)
    assert len(logged["examples/tiny/DR (4-10).filenames"]) == N_IMAGES
