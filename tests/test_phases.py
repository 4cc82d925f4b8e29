"""Phase markers: one appended line per call when $CROSSRES_PHASE_LOG is set, nothing when not."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from crossres.phases import ENV, mark


def test_without_the_variable_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    mark("craft")
    assert list(tmp_path.iterdir()) == []


def test_lines_of_several_processes_are_whole(tmp_path, monkeypatch):
    log = tmp_path / "phases.log"
    monkeypatch.setenv(ENV, str(log))
    before = time.time()
    mark("templates")
    code = "from crossres.phases import mark\nfor _ in range(200): mark('store')"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(3)]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    lines = [line.split() for line in log.read_text().splitlines()]
    assert lines[0][:2] == ["templates", str(os.getpid())]
    assert before <= float(lines[0][2]) <= time.time()
    assert len(lines) == 1 + 3 * 200 and all(len(x) == 3 for x in lines)
    assert {x[1] for x in lines[1:]} == {str(p.pid) for p in procs}


@pytest.mark.parametrize("name", ["", "two words", "tab\there"])
def test_a_phase_name_is_one_word(tmp_path, monkeypatch, name):
    monkeypatch.setenv(ENV, str(tmp_path / "phases.log"))
    with pytest.raises(ValueError, match="one word"):
        mark(name)
