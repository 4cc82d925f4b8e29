"""benchmarks/device_check.py --dry-run: every code path of the GPU check on the CPU at toy
sizes, so the script cannot rot; the JSON has every documented key with the right types."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check") / "dc.json"
    env = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    written = json.loads(out.read_text())
    assert printed == written
    return written


def number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def test_versions_and_flags(report):
    assert report["dry_run"] is True
    for key in ("device", "torch"):
        assert isinstance(report[key], str) and report[key]
    assert report["cuda"] is None or isinstance(report["cuda"], str)


def test_cuda_vs_cpu_covers_every_attack_and_the_metrics(report):
    c = report["cuda_vs_cpu"]
    assert c["other_device"] == "cpu"  # dry run: the CPU against itself, recorded
    for name in ("cw", "ead", "jsma", "dr"):
        assert number(c[name]["max_abs_diff"]) and isinstance(c[name]["success_equal"], bool)
        assert c[name]["max_abs_diff"] == 0.0 and c[name]["success_equal"]  # CPU vs CPU
    assert c["metrics"]["max_abs_diff"] == 0.0


def test_speed_figures(report):
    tp = report["fwd_bwd_img_s"]
    assert number(tp["flops_per_image"]) and tp["flops_per_image"] > 0
    for key in ("fp32_eager", "bf16_eager", "fp32_channels_last", "bf16_channels_last"):
        v = tp["variants"][key]
        assert number(v["img_s"]) and v["img_s"] > 0
        assert number(v["fraction_of_peak"]) and isinstance(v["best_batch"], int)
    assert "skipped" in tp["variants"]["compile"]
    assert set(report["peak_tflops"]) == {"fp32", "bf16"}
    for name in ("cw", "ead", "jsma", "dr"):
        assert number(report[f"{name}_iter_over_fwd_bwd"])


def test_paper_protocol_counts_every_attack_of_the_paper_configs(report):
    p = report["paper_protocol"]
    assert number(report["paper_protocol_gpu_hours"]) and report["paper_protocol_gpu_hours"] > 0
    assert number(p["wall_hours_8_gpus_ddp"])
    rows = p["attacks"]
    by_config = {}
    for r in rows:
        by_config.setdefault(r["config"], []).append(r)
        assert r["queries"] == 2 * 4 * 100 * 10  # targets x resolutions x 1000 queries
    cw = {r["attack"]: r["fwd_bwd_per_query"] for r in by_config["table1_cw_l2.yaml"]}
    assert sorted(cw.values()) == [100.0, 1000.0]  # 10 x 10 and 10 x 100
    assert {r["fwd_bwd_per_query"] for r in by_config["table1_jsma.yaml"]} == {1000.0}
    assert len(by_config["figures_dr_100.yaml"]) >= 9  # the delta grid
    total = sum(r["gpu_hours"] for r in rows)
    assert abs(total - p["gpu_hours"]) <= 1e-9 * total


def test_loader_and_default_run(report):
    lv = report["loader_vs_step"]
    assert number(lv["loader_s_per_batch"]) and number(lv["ratio"])
    assert isinstance(lv["keeps_up"], bool)
    assert "skipped" in report["default_run"] and report["default_run_s"] is None
    assert number(report["total_s"]) and report["total_s"] < 120
