"""Kept adversarial images survive a SIGKILL: the resumed run completes them, leaves the files
written before the kill as they were, and every attacked row has exactly one stored image
(the pattern of the resume test in test_cli.py, on its configuration)."""

from __future__ import annotations

from crossres.adversarial_store import AdversarialImageStore, _read_keys
from crossres.io import sha256_file
from crossres.store import ResultStore
from test_cli import N_ROWS, kill_when, run_cli, write_config


def test_sigkill_then_resume_keeps_every_adversarial_once(tmp_path):
    config = write_config(tmp_path)
    run_dir = tmp_path / "killed"
    store = AdversarialImageStore(run_dir)
    kill_when(config, run_dir, lambda n: n >= 9 and bool(store.files()))
    before = {p: sha256_file(p) for p in store.files()}
    assert before, "no adversarial file was written before the kill"

    assert run_cli(config, run_dir) == 0
    rows = ResultStore(run_dir).rows()
    assert len(rows) == N_ROWS
    attacked = {r.key for r in rows if r.attack != "clean"}
    keys = [k for p in store.files() for k in _read_keys(p)]
    assert len(keys) == len(set(keys))  # nothing written twice
    assert set(keys) == attacked
    assert {p: sha256_file(p) for p in before} == before  # the earlier files untouched
    assert not list(run_dir.glob("adversarials/rank-*/.*.tmp"))
