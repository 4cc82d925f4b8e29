"""Where crossres keeps what it fetches or computes once (faces, converted weights, templates)."""

from __future__ import annotations

import os
from pathlib import Path

from crossres.io import sha256_file  # noqa: F401  (re-exported: older imports)


def cache_dir(*parts: str) -> Path:
    """``$CROSSRES_CACHE`` or ``$XDG_CACHE_HOME/crossres`` or ``~/.cache/crossres``, created."""
    root = os.environ.get("CROSSRES_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "crossres")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
