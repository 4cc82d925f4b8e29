"""crossres.io: atomic writes leave the old file or the new one, never a mix; sidecar hashes
catch damage; a full disk is one user error naming the file."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys

import pytest

from crossres.io import (
    CorruptFileError,
    DiskFullError,
    atomic_write_bytes,
    is_complete,
    json_hash,
    sha256_bytes,
    verify_file,
)


def test_atomic_write_records_a_sidecar_and_verify_catches_damage(tmp_path):
    path = tmp_path / "a" / "blob.bin"
    digest = atomic_write_bytes(path, b"hello" * 100, sidecar=True)
    assert digest == sha256_bytes(b"hello" * 100) == verify_file(path)
    raw = bytearray(path.read_bytes())
    raw[7] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="blob.bin is corrupt"):
        verify_file(path, rebuild_hint="crossres prepare")
    assert not is_complete(path)
    (tmp_path / "a" / "blob.bin.sha256").unlink()
    with pytest.raises(CorruptFileError, match="no .sha256 record"):
        verify_file(path)
    assert list((tmp_path / "a").glob("*.tmp")) == []  # no temporary file left behind


def test_json_hash_ignores_key_order():
    assert json_hash({"a": 1, "b": [1, 2]}) == json_hash({"b": [1, 2], "a": 1})
    assert json_hash({"a": 1}) != json_hash({"a": 2})


def _limit() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_a_full_disk_is_one_user_error_and_the_old_file_survives(tmp_path):
    """Under a 4 KiB file-size limit (what a full disk or a quota gives a writer) a 64 KiB
    write raises DiskFullError naming the file; the previous complete file is untouched."""
    path = tmp_path / "big.bin"
    path.write_bytes(b"old")
    code = (
        "import sys\n"
        "from crossres.io import atomic_write_bytes, DiskFullError\n"
        "try:\n"
        "    atomic_write_bytes(sys.argv[1], b'x' * 65536)\n"
        "except DiskFullError as e:\n"
        "    print('FULL', e.errno, e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        preexec_fn=_limit,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert out.stdout.startswith("FULL"), out.stdout + out.stderr
    assert str(path) in out.stdout and "disk full" in out.stdout
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["big.bin"]


def test_disk_full_error_is_a_crossres_error_and_an_oserror():
    from crossres.errors import CrossresError

    err = DiskFullError(errno.ENOSPC, "no space")
    assert isinstance(err, CrossresError) and isinstance(err, OSError)
