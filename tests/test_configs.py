"""Every shipped config names classes that exist with arguments they accept, and the paper's
configs carry Table 1's parameters (and are what their generator writes)."""

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def resolve(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def check_node(node) -> None:
    """Recursively: class_path importable and init_args bindable to its signature."""
    if isinstance(node, dict):
        if "class_path" in node:
            cls = resolve(node["class_path"])
            args = {
                k: v
                for k, v in (node.get("init_args") or {}).items()
                if not isinstance(v, dict) or "class_path" not in v
            }
            inspect.signature(cls).bind_partial(**args)
        for value in node.values():
            check_node(value)
    elif isinstance(node, list):
        for value in node:
            check_node(value)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_classes_and_arguments_exist(path):
    check_node(yaml.safe_load(path.read_text()))


def test_paper_configs_match_their_generator(tmp_path):
    """The generator writes into a temporary folder (tests never touch tracked files); every
    file it writes equals the shipped one, and it writes nothing the repo lacks."""
    subprocess.run(
        [sys.executable, str(ROOT / "configs" / "paper" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    generated = {p.name: p.read_text() for p in tmp_path.glob("*.yaml")}
    assert generated, "the generator wrote nothing"
    shipped = {n: (ROOT / "configs" / "paper" / n).read_text() for n in generated}
    assert generated == shipped


def test_paper_parameters_are_table_1s():
    def attacks(name):
        cfg = yaml.safe_load((ROOT / "configs" / "paper" / name).read_text())
        return [c["init_args"]["attack"]["init_args"] for c in cfg["trainer"]["callbacks"]]

    jsma = attacks("table1_jsma.yaml")
    assert [a["theta"] for a in jsma] == [0.1, 0.3, 0.5]
    assert all(a["max_iter"] == 1000 and a["max_perturbations_per_pixel"] == 10 for a in jsma)
    cw = attacks("table1_cw_l2.yaml")
    assert [(a["binary_search_steps"], a["steps"]) for a in cw] == [(10, 10), (10, 100)]
    ead = attacks("table1_ead.yaml")
    assert {(a["beta"], a["steps"]) for a in ead} == {(0.1, 10), (0.1, 100), (1.0, 10), (1.0, 100)}
    for steps in (100, 1000):
        dr = attacks(f"figures_dr_{steps}.yaml")
        assert all(a["steps"] == steps for a in dr)
        assert all(0 < a["epsilon"] <= 30 / 255 for a in dr)
