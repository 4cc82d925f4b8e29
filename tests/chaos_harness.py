"""The chaos harness: run a ``crossres`` command line, SIGKILL its whole process group at
seeded random moments inside named phases, rerun the same command until it finishes.

It depends only on the command line, the phase markers (``crossres.phases``: lines
``name pid time`` in the file ``$CROSSRES_PHASE_LOG``) and the result store's rows, so the
pipeline behind it can change freely. A kill is aimed at the ``nth`` marker of a phase (its
``nth`` start, counted within one attempt) and lands a seeded random fraction of that phase's
typical duration after it; the phase hit is the last marker the process that wrote the aimed
marker wrote before the kill (other DDP ranks are recorded beside it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sqlite3
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from crossres.store import ResultRow, ResultStore

POLL_S = 0.002  # marker polling period: well below the shortest phase aimed at (a batch)
TIMED = ("seconds",)  # the only ResultRow columns that may differ between runs


@dataclass(frozen=True)
class Aim:
    phase: str
    nth: int  # kill after this phase's nth marker of the attempt
    fraction: float  # of the phase's typical duration, waited after the marker


@dataclass
class Kill:
    aim: Aim
    hit: str  # the phase of the aimed process's last marker before the kill
    others: list[str]  # the other processes' (DDP ranks') phases at that moment
    after_s: float  # seconds from the attempt's start to the kill


@dataclass
class Marker:
    phase: str
    pid: int
    time: float


def read_markers(log: Path, offset: int = 0) -> tuple[list[Marker], int]:
    """Complete marker lines from byte ``offset`` on, and the offset after them."""
    if not log.exists():
        return [], offset
    with open(log, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1  # a line still being appended is read next time
    out = []
    for line in data[:end].decode().splitlines():
        name, pid, t = line.split()
        out.append(Marker(name, int(pid), float(t)))
    return out, offset + end


def typical_durations(markers: Sequence[Marker], end: float) -> dict[str, float]:
    """Median time from each marker to the next marker of the same process (or to ``end``,
    the moment the run finished, for a process's last one), per phase."""
    spans: dict[str, list[float]] = {}
    for i, m in enumerate(markers):
        nxt = next((n.time for n in markers[i + 1 :] if n.pid == m.pid), end)
        spans.setdefault(m.phase, []).append(max(nxt - m.time, 0.0))
    return {k: statistics.median(v) for k, v in spans.items()}


def _group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs (zombies do not count: they hold no
    file, lock or lease, and a container's init may be slow to reap them)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def kill_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGKILL the whole process group of ``proc`` (its DDP children included) and wait until
    none of it runs any more."""
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + timeout
    while _group_alive(proc.pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"process group {proc.pid} survived SIGKILL for {timeout} s")
        time.sleep(0.01)


def _start(cmd: Sequence[str], env: dict, stderr: Path) -> subprocess.Popen:
    with open(stderr, "ab") as err:
        return subprocess.Popen(
            list(cmd),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,  # its own process group: one killpg ends every rank
        )


def run_to_end(cmd: Sequence[str], env: dict, stderr: Path, timeout: float) -> float:
    """Run ``cmd`` uninterrupted; its wall time. Raises with the stderr tail if it fails."""
    start = time.monotonic()
    proc = _start(cmd, env, stderr)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {rc}:\n{stderr.read_text()[-3000:]}")
    return time.monotonic() - start


def run_with_kills(
    cmd: Sequence[str],
    env: dict,
    *,
    log: Path,
    aims: Sequence[Aim],
    durations: dict[str, float],
    stderr: Path,
    timeout: float = 300.0,
    on_kill: Callable[[Kill], None] | None = None,
) -> tuple[list[Kill], float]:
    """Start ``cmd``; for each aim, kill the attempt in that phase and start the same command
    again; finally let it finish. Returns the kills that landed and the total wall time.
    ``on_kill`` sees each kill while the killed attempt's files are as it left them.

    An attempt that ends before its aimed phase comes has finished the run: the aims left are
    dropped, and the caller asserts on the kills that landed.
    """
    env = {**env, "CROSSRES_PHASE_LOG": str(log)}
    kills: list[Kill] = []
    begin = time.monotonic()
    for n, aim in enumerate([*aims, None], start=1):
        _, offset = read_markers(log)
        start = time.monotonic()
        proc = _start(cmd, env, stderr)
        seen, last, trigger = 0, {}, None  # last: each process's latest phase
        while True:
            if time.monotonic() - start > timeout:
                kill_group(proc)
                raise TimeoutError(f"attempt {n} ran past {timeout} s: {' '.join(cmd)}")
            new, offset = read_markers(log, offset)
            for m in new:
                last[m.pid] = m.phase
                if aim is not None and m.phase == aim.phase and trigger is None:
                    seen += 1
                    trigger = m.pid if seen >= aim.nth else None
            if trigger is not None:
                time.sleep(aim.fraction * durations.get(aim.phase, 0.0))
                t_kill = time.time()
                kill_group(proc)
                late, offset = read_markers(log, offset)
                last.update((m.pid, m.phase) for m in late if m.time <= t_kill)
                others = sorted(v for k, v in last.items() if k != trigger)
                kills.append(Kill(aim, last[trigger], others, time.monotonic() - start))
                if on_kill is not None:
                    on_kill(kills[-1])
                break
            rc = proc.poll()
            if rc is not None:
                if rc != 0:
                    raise RuntimeError(
                        f"attempt {n} exited with {rc}:\n{stderr.read_text()[-3000:]}"
                    )
                return kills, time.monotonic() - begin  # done: later aims have nothing left
            time.sleep(POLL_S)
    raise AssertionError("unreachable: the last attempt has no aim and runs to its end")


# ------------------------------------------------------------------------------ comparison


def comparable(row: ResultRow) -> tuple:
    """Every column but the timings, NaN made comparable."""
    out = []
    for name, value in dataclasses.asdict(row).items():
        if name in TIMED:
            continue
        out.append((name, "nan" if isinstance(value, float) and math.isnan(value) else value))
    return tuple(out)


def raw_keys(run_dir: Path) -> Counter:
    """How often each key occurs over every ``rank-*.sqlite`` file, row by row (not the
    merged view, which would hide a duplicate)."""
    counts: Counter = Counter()
    for path in ResultStore(run_dir).files():
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            counts.update(
                con.execute("SELECT model, attack, sample_id, resolution FROM results").fetchall()
            )
        finally:
            con.close()
    return counts


# float columns that carry a model's arithmetic: every float column of a row (new scores
# included as the store gains them) but timings and l0, a count compared exactly
MEASURED = tuple(
    f.name
    for f in dataclasses.fields(ResultRow)
    if str(f.type).startswith("float") and f.name not in ("seconds", "l0")
)


def _same(name: str, a, b, rel_tol: float, abs_tol: float) -> bool:
    if a == b:
        return True
    if name in MEASURED and isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)
    return False


def differences(
    run_dir: Path, reference_dir: Path, *, rel_tol: float = 0.0, abs_tol: float = 0.0
) -> list[str]:
    """Every way the store of ``run_dir`` departs from the reference's: keys lost, keys
    stored twice in the raw files, rows whose columns (but timings) differ. Exact unless a
    tolerance is given, which then applies to the ``MEASURED`` float columns only."""
    out = []
    got = {r.key: comparable(r) for r in ResultStore(run_dir).rows()}
    want = {r.key: comparable(r) for r in ResultStore(reference_dir).rows()}
    out += [f"lost {k}" for k in sorted(want.keys() - got.keys())]
    out += [f"extra {k}" for k in sorted(got.keys() - want.keys())]
    out += [f"stored {n} times {k}" for k, n in sorted(raw_keys(run_dir).items()) if n > 1]
    for k in sorted(want.keys() & got.keys()):
        diff = [
            (a[0], a[1], b[1])
            for a, b in zip(got[k], want[k], strict=True)
            if not _same(a[0], a[1], b[1], rel_tol, abs_tol)
        ]
        if diff:
            out.append(f"differs {k}: {diff}")
    return out
