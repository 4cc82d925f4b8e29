"""Crash-safe files and content hashes: the one place every cache and record writes through.

A file written here is either absent or complete: bytes go to a temporary file in the same
folder, are flushed to disk, then renamed over the target (``os.replace`` is atomic on
POSIX). A cache that must detect later corruption also gets ``<file>.sha256`` beside it,
written after the file itself, so a file without a matching sidecar is never trusted.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from crossres.errors import CrossresError

SIDECAR_SUFFIX = ".sha256"


class CorruptFileError(CrossresError):
    """A cached or recorded file does not match the hash written beside it."""


class DiskFullError(CrossresError, OSError):
    """A file could not be written for lack of space (or a file-size limit)."""


# ENOSPC: no space; EFBIG: a file-size limit (ulimit -f); EDQUOT: a quota
_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace choices left open: equal objects, equal text."""
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def json_hash(obj: Any) -> str:
    """sha256 of ``canonical_json(obj)``: the key of a configuration, recipe or manifest."""
    return sha256_bytes(canonical_json(obj).encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, sidecar: bool = False) -> str:
    """Write ``data`` to ``path`` atomically; returns its sha256. ``sidecar`` also writes
    ``<path>.sha256`` (after the file, so a crash in between leaves a file that is refused)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a cache file is not
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in _FULL:
            raise DiskFullError(
                f"cannot write {path}: {err.strerror} (disk full or file-size limit); what was "
                "written before is kept, free space and rerun the same command to resume"
            ) from err
        raise
    digest = sha256_bytes(data)
    if sidecar:
        atomic_write_text(sidecar_path(path), f"{digest}  {path.name}\n")
    return digest


def atomic_write_text(path: str | os.PathLike, text: str, *, sidecar: bool = False) -> str:
    return atomic_write_bytes(path, text.encode(), sidecar=sidecar)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sidecar: bool = False) -> str:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    return atomic_write_text(path, text, sidecar=sidecar)


def atomic_torch_save(obj: Any, path: str | os.PathLike, *, sidecar: bool = False) -> str:
    """``torch.save`` through a buffer, atomically. Through a buffer because torch.save names
    its zip records after the file it writes: saving to a temporary name would change the
    bytes (and so the hash) from run to run."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue(), sidecar=sidecar)


def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def recorded_hash(path: str | os.PathLike) -> str | None:
    """The sha256 recorded beside ``path`` (None when there is no sidecar)."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    text = side.read_text().split()
    return text[0] if text else ""


def verify_file(path: str | os.PathLike, *, rebuild_hint: str = "") -> str:
    """The file's sha256 after checking it equals the one recorded beside it.

    Raises ``CorruptFileError`` naming the file (and ``rebuild_hint``: the command that
    rebuilds it) when the sidecar is missing or differs: a half-written or damaged cache
    entry is never read as complete."""
    path = Path(path)
    hint = f" Rebuild it with: {rebuild_hint}" if rebuild_hint else " Delete it to rebuild it."
    expected = recorded_hash(path)
    if expected is None:
        raise CorruptFileError(f"{path} has no {SIDECAR_SUFFIX} record (incomplete write?).{hint}")
    got = sha256_file(path)
    if got != expected:
        raise CorruptFileError(
            f"{path} is corrupt: sha256 {got[:16]}... differs from the recorded "
            f"{expected[:16]}....{hint}"
        )
    return got


def is_complete(path: str | os.PathLike) -> bool:
    """True when ``path`` exists and matches its sidecar hash (no exception)."""
    try:
        verify_file(path)
    except (CorruptFileError, OSError):
        return False
    return True
