"""RunDirLock with real processes: a second run on the same directory is refused at once with
the holder named, and a SIGKILLed holder never leaves the directory locked."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from crossres.errors import CrossresError
from crossres.locks import RunDirBusyError, RunDirLock

SRC = str(Path(__file__).resolve().parents[1] / "src")

# Holds the lock until its stdin closes; says so on stdout once it has it.
HOLDER = textwrap.dedent(
    """
    import sys
    from crossres.locks import RunDirLock
    with RunDirLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()
    """
)
# One attempt: exit 0 when acquired, 3 with the message when refused; prints the seconds
# acquire() took, so "at once" is measured without the interpreter's start-up.
TRY = textwrap.dedent(
    """
    import sys, time
    from crossres.locks import RunDirBusyError, RunDirLock
    t = time.monotonic()
    try:
        RunDirLock(sys.argv[1]).acquire()
    except RunDirBusyError as e:
        print(f"{time.monotonic() - t:.6f}", e, flush=True)
        sys.exit(3)
    print(f"{time.monotonic() - t:.6f}", "acquired", flush=True)
    """
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start_holder(run_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    line = proc.stdout.readline()  # blocks until the holder has the lock (or died)
    if line.strip() != "locked":
        proc.kill()
        raise AssertionError(f"holder did not lock: {line!r} {proc.stderr.read()}")
    return proc


def _try(run_dir: Path) -> tuple[int, float, str]:
    done = subprocess.run(
        [sys.executable, "-c", TRY, str(run_dir)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert done.returncode in (0, 3), done.stderr
    seconds, _, message = done.stdout.strip().partition(" ")
    return done.returncode, float(seconds), message


def test_second_process_is_refused_at_once_while_the_first_holds(tmp_path):
    run_dir = tmp_path / "run"
    holder = _start_holder(run_dir)
    try:
        rc, seconds, message = _try(run_dir)
        assert rc == 3
        assert seconds < 1.0  # non-blocking: no waiting for the holder
        assert str(run_dir) in message
        assert f"process {holder.pid} since " in message
        assert "--trainer.default_root_dir" in message
    finally:
        holder.communicate(input="", timeout=60)
    assert holder.returncode == 0
    # A clean exit releases it too.
    assert _try(run_dir)[0] == 0


def test_sigkilled_holder_leaves_no_stuck_lock(tmp_path):
    run_dir = tmp_path / "run"
    holder = _start_holder(run_dir)
    assert _try(run_dir)[0] == 3
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    assert (run_dir / ".lock").exists()  # the file stays; the kernel dropped the flock
    rc, _, message = _try(run_dir)
    assert rc == 0, message


def test_in_process_holder_refuses_another_lock_object(tmp_path):
    first = RunDirLock(tmp_path)
    with first:
        assert first.held
        with pytest.raises(RunDirBusyError, match=f"process {os.getpid()} since"):
            RunDirLock(tmp_path).acquire()
    assert not first.held
    with RunDirLock(tmp_path) as again:
        assert again.held


def test_context_manager_releases_on_error_and_release_is_idempotent(tmp_path):
    lock = RunDirLock(tmp_path)
    with pytest.raises(ValueError), lock:
        raise ValueError("boom")
    assert not lock.held
    lock.release()  # not held: a no-op
    lock.acquire()
    with pytest.raises(RuntimeError, match="already held"):
        lock.acquire()
    lock.release()
    assert (tmp_path / ".lock").read_text() == ""  # holder record cleared on release


def test_creates_the_run_directory(tmp_path):
    run_dir = tmp_path / "a" / "b"
    with RunDirLock(run_dir):
        assert (run_dir / ".lock").is_file()


def test_run_dir_that_is_a_file_is_refused_by_name(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(CrossresError, match=re.escape(str(not_a_dir / ".lock"))):
        RunDirLock(not_a_dir).acquire()
