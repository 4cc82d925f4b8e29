"""crossres's JSMA against foolbox 2.4.0's own SaliencyMapAttack outputs, sample for sample.

The outputs were made by ``scripts/make_foolbox_fixture.py`` (foolbox 2.4.0 in a throw-away
folder; versions, the exact call and the npz's sha256 in ``foolbox_jsma.json``): tiny seeded
conv nets (weights stored), untargeted, ``fast=True``, foolbox's GradientAttack target scan,
several theta / max_perturbations_per_pixel / max_iter, including budgets too small to
succeed. Measured: the same verdict on every sample and bit-identical adversarials
(max abs difference 0), so the assertion is equality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from crossres.attacks.jsma import JSMA
from crossres.io import sha256_file

FIXTURE = Path(__file__).with_name("fixtures") / "foolbox_jsma"
RECORD = json.loads((FIXTURE / "foolbox_jsma.json").read_text())
CASES = {case["name"]: case for case in RECORD["cases"]}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    path = FIXTURE / "foolbox_jsma.npz"
    assert sha256_file(path) == RECORD["npz_sha256"], f"{path} differs from its record"
    with np.load(path) as data:
        return dict(data)


def test_record_names_what_made_it() -> None:
    assert RECORD["versions"]["foolbox"] == "2.4.0"
    assert "fast=True" in RECORD["call"] and "SaliencyMapAttack" in RECORD["call"]
    assert sum(case["samples"] for case in CASES.values()) >= 64


def _net(arrays: dict[str, np.ndarray], name: str) -> nn.Module:
    # The architecture the record names; the weights are the stored ones, not re-drawn.
    w = {k: torch.from_numpy(arrays[f"{name}_{k}"]) for k in ("conv_weight", "conv_bias")}
    w |= {k: torch.from_numpy(arrays[f"{name}_{k}"]) for k in ("fc_weight", "fc_bias")}
    classes, features = w["fc_weight"].shape
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(features, classes)
    )
    net.load_state_dict(
        {
            "0.weight": w["conv_weight"],
            "0.bias": w["conv_bias"],
            "3.weight": w["fc_weight"],
            "3.bias": w["fc_bias"],
        }
    )
    assert classes == CASES[name]["classes"]
    return net.eval()


@pytest.mark.parametrize("name", sorted(CASES))
def test_jsma_equals_foolbox_sample_for_sample(arrays, name: str) -> None:
    case = CASES[name]
    net = _net(arrays, name)
    x = torch.from_numpy(arrays[f"{name}_x"])
    labels = torch.from_numpy(arrays[f"{name}_labels"])
    torch.testing.assert_close(net(x).argmax(1), labels, rtol=0, atol=0)  # the stored model
    attack = JSMA(
        max_iter=case["max_iter"],
        theta=case["theta"],
        max_perturbations_per_pixel=case["max_perturbations_per_pixel"],
    )
    result = attack(net, x, labels)
    expected_success = arrays[f"{name}_success"]
    expected = arrays[f"{name}_adversarial"]
    np.testing.assert_array_equal(result.success.numpy(), expected_success)
    ok = expected_success
    np.testing.assert_array_equal(result.adversarial[ok].numpy(), expected[ok])
