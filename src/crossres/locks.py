"""One run directory, one run: an exclusive lock on ``<run_dir>/.lock`` held while a run lives.

The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on an open file. The kernel drops it when the
holding file description is closed, which happens however the process ends (SIGKILL, OOM
kill, pre-emption), so a dead run never leaves its directory stuck and there is no stale-lock
clean-up to get wrong. The lock file itself is never deleted: unlinking it would let a
second process lock a fresh file of the same name while the first still holds the old one.

The file's content (pid, host, start time) only makes the refusal message useful; the lock
is the ``flock``, never the content. Notes for the caller:

- Take it in one process per run (the launching process / global rank 0): each ``open`` is a
  separate lock, so a second rank of the same run taking it would be refused.
- The descriptor is close-on-exec, so ``subprocess`` children do not inherit the lock; a
  ``fork``ed child (e.g. a DataLoader worker) does share it until it exits.
- On Linux ``flock`` on NFS is emulated with byte-range locks and holds across clients.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from crossres.errors import CrossresError

LOCK_NAME = ".lock"


class RunDirBusyError(CrossresError):
    """Another live process holds the run directory's lock."""


class RunDirLock:
    """Exclusive, non-blocking lock of a run directory for the life of a run.

    ``with RunDirLock(run_dir): ...`` or ``lock.acquire()`` / ``lock.release()``. Acquiring
    creates the directory if needed, and raises :class:`RunDirBusyError` at once (it never
    waits) when another process, or another ``RunDirLock`` in this one, holds it.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        what: str = "run directory",
        hint: str = "wait for it or choose another --trainer.default_root_dir",
    ) -> None:
        self.run_dir = Path(run_dir)
        self.what, self.hint = what, hint  # the refusal: "<what> <dir> is in use by ...; <hint>"
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunDirLock:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunDirLock")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise CrossresError(
                f"cannot create the lock file {self.path}: {e.strerror or e}"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CrossresError(f"cannot lock {self.path}: {e.strerror or e}") from e
            raise RunDirBusyError(
                f"{self.what} {self.run_dir} is in use by {holder}; {self.hint}"
            ) from None
        self._fd = fd
        _write_holder(fd)
        return self

    def release(self) -> None:
        """Drop the lock; a no-op when not held (so ``finally: lock.release()`` is safe)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Clear the holder record while still holding the lock, so nobody reads it stale.
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        # A lock object dropped without release must not leak its descriptor (and the lock).
        if getattr(self, "_fd", None) is not None:
            self.release()


def _write_holder(fd: int) -> None:
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    data = (json.dumps(record) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _read_holder(fd: int) -> str:
    """``process PID on HOST since TIME`` from the record, or a generic phrase if the holder
    has not written it yet (it writes right after locking) or it is unreadable."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode())
        who = f"process {int(record['pid'])}"
        if record.get("host") and record["host"] != socket.gethostname():
            who += f" on {record['host']}"
        return f"{who} since {record['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
