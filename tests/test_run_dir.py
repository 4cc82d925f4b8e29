"""run.json's weight and manifest facts: recorded once, a rerun with other content refused."""

from __future__ import annotations

import json

import pytest

from crossres.errors import CrossresError
from crossres.run_dir import RunConfigMismatch, check_run_facts, claim_run_dir

WEIGHTS = {"base": {"name": "tiny_facenet", "weights": "/w/base.pt", "sha256": "a" * 64}}


def test_facts_are_recorded_next_to_the_configuration(tmp_path):
    claim_run_dir(tmp_path, config={"model": 1})
    check_run_facts(tmp_path, weights=WEIGHTS, manifest_hash="m" * 64)
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["weights"] == WEIGHTS and record["manifest_hash"] == "m" * 64
    assert record["config"] == {"model": 1}  # the claim is kept
    check_run_facts(tmp_path, weights=WEIGHTS, manifest_hash="m" * 64)  # same facts: resumes


@pytest.mark.parametrize(
    ("weights", "manifest", "message"),
    [
        ({"base": {**WEIGHTS["base"], "sha256": "b" * 64}}, "m" * 64, "'base' weights /w/base.pt"),
        (WEIGHTS, "n" * 64, "manifest hash is nnnnnnnnnnnn"),
    ],
)
def test_other_weights_or_data_are_refused(tmp_path, weights, manifest, message):
    check_run_facts(tmp_path, weights=WEIGHTS, manifest_hash="m" * 64)
    with pytest.raises(RunConfigMismatch, match=message) as err:
        check_run_facts(tmp_path, weights=weights, manifest_hash=manifest)
    assert isinstance(err.value, CrossresError) and "\n" not in str(err.value)
    assert json.loads((tmp_path / "run.json").read_text())["weights"] == WEIGHTS


def test_a_new_target_is_added_and_a_checking_process_records_nothing(tmp_path):
    check_run_facts(tmp_path, weights=WEIGHTS, manifest_hash="m")
    more = {**WEIGHTS, "cr": {"name": "tiny_facenet", "weights": None, "sha256": ""}}
    check_run_facts(tmp_path, weights=more, manifest_hash="m", record=False)
    assert json.loads((tmp_path / "run.json").read_text())["weights"] == WEIGHTS
    check_run_facts(tmp_path, weights=more, manifest_hash="m")
    assert json.loads((tmp_path / "run.json").read_text())["weights"] == more
