"""Phase markers for the chaos test: where a long run is when it is killed.

``mark("templates")`` at the start of a phase appends ``templates <pid> <unix time>`` to the
file named by ``$CROSSRES_PHASE_LOG`` (one ``write`` of a whole line in append mode, so lines
of several processes never interleave), flushed before the phase goes on. Without the
variable it does nothing but read the environment: zero cost in normal runs.
"""

from __future__ import annotations

import os
import time

ENV = "CROSSRES_PHASE_LOG"


def mark(name: str) -> None:
    """Record that this process starts phase ``name`` (a word without blanks)."""
    path = os.environ.get(ENV)
    if not path:
        return
    if not name or any(c.isspace() for c in name):
        raise ValueError(f"phase name must be one word, got {name!r}")
    line = f"{name} {os.getpid()} {time.time():.6f}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # O_APPEND: one atomic append, no buffer left to flush
    finally:
        os.close(fd)
