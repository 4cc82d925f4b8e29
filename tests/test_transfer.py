"""``crossres transfer``: stored adversarials scored on a target again. From a target to itself
(and to a fresh instance of the same network) it reproduces the stored outcomes; rows are
named by their source, resumable, and the report gets the transfer matrix."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from crossres.cli import main
from crossres.models.resampling import degraded_size, resize_bilinear
from crossres.store import ResultStore
from crossres.transfer import to_model_input
from test_cli import CONFIG, run_cli

LOW_RES_CW = {
    "class_path": "crossres.callbacks.AttackCallback",
    "init_args": {
        "name": "CW low-res",
        "space": "low_resolution",
        "attack": {
            "class_path": "crossres.attacks.CarliniWagnerL2",
            "init_args": {"binary_search_steps": 2, "steps": 8},
        },
    },
}
OUTCOMES = ("success", "adv_top1", "clean_top1", "mate_rank", "open_mate_rank", "target", "l2")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transfer")
    cfg = copy.deepcopy(CONFIG)
    cfg["trainer"]["callbacks"].append(LOW_RES_CW)
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert run_cli(config, tmp / "run") == 0
    return tmp / "run"


def by_key(run_dir):
    return {r.key: r for r in ResultStore(run_dir).rows()}


@pytest.mark.parametrize("target", ["tiny", "tiny_facenet"])
def test_transfer_to_the_same_network_reproduces_the_stored_outcomes(run_dir, target):
    assert main(["transfer", str(run_dir), "--target", target]) == 0
    rows = by_key(run_dir)
    originals = [r for r in rows.values() if r.attack != "clean" and "@" not in r.attack]
    assert {r.space for r in originals} == {"model_input", "low_resolution"}
    for r in originals:
        t = rows[(target, f"{r.attack} @tiny->{target}", r.sample_id, r.resolution)]
        for f in OUTCOMES:
            assert getattr(t, f) == getattr(r, f), (r.key, f)
        assert t.space == r.space
        assert t.mate_score == pytest.approx(r.mate_score, abs=1e-4)
        assert json.loads(t.params)["transfer"] == {
            "source_model": "tiny",
            "source_attack": r.attack,
            "source_resolution": r.resolution,
        }
    if target != "tiny":  # a new target gets its clean rows
        assert any(k[0] == target and k[1] == "clean" for k in rows)
    before = len(rows)
    assert main(["transfer", str(run_dir), "--target", target]) == 0  # resumes: nothing new
    assert len(by_key(run_dir)) == before
    report = (run_dir / "report.md").read_text()
    assert "Transfer of stored adversarials" in report and "Verification (1:1)" in report


def test_transfer_to_another_resolution_names_both(run_dir):
    assert main(["transfer", str(run_dir), "--target", "tiny", "--resolution", "0"]) == 0
    rows = by_key(run_dir)
    moved = [r for r in rows.values() if r.attack.endswith("@8->0px")]
    same = [r for r in rows.values() if r.attack.endswith("@0->0px")]
    assert moved and same and all(r.resolution == 0 for r in moved + same)
    for r in same:  # at its own resolution the image is the stored one
        name = r.attack.removesuffix(" @0->0px").rsplit(" @", 1)[0]
        src = rows[("tiny", name, r.sample_id, 0)]
        assert (r.success, r.adv_top1) == (src.success, src.adv_top1)


class _Cfg:
    input_size = (3, 64, 64)
    resize_shortest = None


class _Target:
    class model:  # noqa: N801 - a stand-in with the one attribute read
        pretrained_cfg = _Cfg


def test_model_input_adversarials_are_degraded_like_a_photograph():
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    same = to_model_input(x, space="model_input", r0=8, r=8, original_size=(64, 64), target=_Target)
    assert torch.equal(same, x)
    low = to_model_input(x, space="model_input", r0=0, r=8, original_size=(64, 64), target=_Target)
    small = torch.nn.functional.interpolate(
        x, size=degraded_size(64, 64, 8), mode="bilinear", antialias=True, align_corners=False
    )
    ref = torch.nn.functional.interpolate(
        small, size=(64, 64), mode="bilinear", antialias=True, align_corners=False
    )
    torch.testing.assert_close(low, ref)
    cap = torch.rand(1, 3, 8, 8)
    up = to_model_input(
        cap, space="low_resolution", r0=8, r=16, original_size=(64, 64), target=_Target
    )
    assert up.shape == (1, 3, 64, 64)
    recaptured = resize_bilinear(cap, (16, 16))
    torch.testing.assert_close(up, resize_bilinear(recaptured, (64, 64)))


def test_unknown_target_is_one_line(run_dir, capsys, monkeypatch):
    import crossres.cli

    def build(*args, **kwargs):
        raise AssertionError("the run was built before --target was checked")

    monkeypatch.setattr(crossres.cli, "configured_cli", build)
    assert main(["transfer", str(run_dir), "--target", "nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and len(err.strip().splitlines()) == 1
