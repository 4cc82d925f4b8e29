"""The query manifest: the paper's query selection, written once, read by every later run and
every DDP process.

Selecting the queries (images the target classifies correctly at full resolution) needs the
model, so it runs once and its outcome is frozen in a JSON file: the query images, their
identities and sample ids, the seed, the gallery/query split rule with a digest of the gallery
it produced, the open-set split, the hash of every target model's weights, and the files that
were skipped as unreadable. ``content_hash`` keys what is computed from it (gallery templates).

Crash safety: written atomically with a ``<file>.sha256`` sidecar (``crossres.io``); ``load``
verifies the file against it, so a damaged manifest, or one whose write stopped before its
sidecar, is refused naming the file and ``crossres select-queries``, which selects it again
(as ``crossres test`` does by itself, ``query_selection.prepare_queries``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from crossres.errors import NotPreparedError
from crossres.io import atomic_write_text, sha256_bytes, verify_file
from crossres.models.fingerprint import model_hash, state_hash  # noqa: F401  (moved)

MANIFEST_FORMAT = "crossres-query-manifest"
MANIFEST_VERSION = 1
# the explicit step that writes a manifest (named by every error about a missing one)
SELECT_COMMAND = "crossres select-queries --config FILE"


def digest_lines(lines: list[str]) -> str:
    """sha256 of the lines joined by newlines (order matters: sort first where it should not)."""
    return sha256_bytes("\n".join(lines).encode())


@dataclass
class QueryRecord:
    """One selected query image. ``path`` is relative to the dataset root; ``identity`` is the
    class index; ``box`` the face box (x, y, w, h) in the image, when the dataset has boxes."""

    path: str
    class_id: str
    identity: int
    sample_id: int
    box: list[float] | None = None


@dataclass
class QueryManifest:
    """Everything a run needs to rebuild the paper's queries, gallery and open-set split."""

    dataset: str
    root: str
    seed: int
    n_identities: int
    n_images: int
    query_fraction: float
    model_hashes: list[str]
    num_classes: int
    class_ids_digest: str
    crop: dict[str, Any]
    queries: list[QueryRecord]
    open_set: dict[str, list[int]]  # {"mated": [...], "non_mated": [...]} class indices
    gallery: dict[str, Any]  # {"n_images": int, "digest": sha256 of the sorted gallery paths}
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "error"}
    rejected_identities: list[dict[str, Any]] = field(default_factory=list)
    created: str = ""
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    # fields that do not change what the manifest means, left out of ``content_hash``
    _VOLATILE = ("created",)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def content_hash(self) -> str:
        """sha256 of the canonical JSON of everything but the creation time."""
        d = {k: v for k, v in self.to_dict().items() if k not in self._VOLATILE}
        # not crossres.io.json_hash: its separators differ, and this hash keys the template caches
        return sha256_bytes(json.dumps(d, sort_keys=True).encode())

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically, with its sha256 sidecar (a crash never leaves half a manifest
        that reads as whole)."""
        path = Path(path)
        if not self.created:
            self.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        text = json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"
        atomic_write_text(path, text, sidecar=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> QueryManifest:
        path = Path(path)
        if not path.is_file():
            raise NotPreparedError(
                f"query manifest not found: {path}. It is written once by the query selection: "
                f"run `{SELECT_COMMAND}` with the run's YAML (`crossres test` runs it itself)"
            )
        verify_file(path, rebuild_hint=f"`{SELECT_COMMAND}` (the run's YAML)")
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"query manifest {path} is not readable JSON: {e}") from e
        if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
            raise ValueError(
                f"{path} is not a crossres query manifest (format != {MANIFEST_FORMAT!r})"
            )
        if d.get("version") != MANIFEST_VERSION:
            raise ValueError(
                f"query manifest {path} has version {d.get('version')}, this crossres reads "
                f"version {MANIFEST_VERSION}; select the queries again"
            )
        names = {f.name for f in fields(cls)}
        missing = sorted(
            n
            for n in names
            if n not in d and n not in ("skipped", "rejected_identities", "created")
        )
        if missing:
            raise ValueError(f"query manifest {path} lacks the keys {missing}")
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"query manifest {path} has unknown keys {unknown}")
        try:
            d["queries"] = [QueryRecord(**q) for q in d["queries"]]
        except TypeError as e:
            raise ValueError(f"query manifest {path}: a query record is malformed ({e})") from e
        return cls(**d)
