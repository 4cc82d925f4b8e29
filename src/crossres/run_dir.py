"""What a run directory records about itself, and the guard against mixing configurations.

``run.json`` holds the hash of the configuration that decides the results (model, data,
attacks, seed — not the devices, which must not change them), package versions, weight-file
hashes and the data manifest hash. A rerun with the same configuration resumes; a changed one
is refused, so it never appends to an old run's rows. The configuration is checked before
anything is built (``claim_run_dir``); the weight and manifest hashes, known once the models
and data are set up, are checked and recorded then (``check_run_facts``): the same weight path
with other content, or other data under the same settings, is refused like a changed
configuration.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

from crossres.errors import CrossresError
from crossres.io import atomic_write_json

PACKAGES = (
    "crossres",
    "torch",
    "pytorch-lightning",
    "torchmetrics",
    "torchattacks",
    "timm",
    "numpy",
    "scipy",
    "wandb",
)


class RunConfigMismatch(CrossresError, RuntimeError):
    """The run directory holds the results of another configuration, weights or data."""


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def claim_run_dir(run_dir: str | Path, *, config: dict, extra: dict | None = None) -> Path:
    """Create ``run.json`` or check that the stored one has the same configuration hash."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.json"
    digest = config_hash(config)
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("config_hash") != digest:
            raise RunConfigMismatch(
                f"{run_dir} holds the results of another configuration (hash "
                f"{stored.get('config_hash', '?')[:12]}, this one {digest[:12]}); its rows would "
                "mix with this run's. Choose another run directory (--trainer.default_root_dir or "
                "--store.run_dir), or delete the old one."
            )
        return path
    record = {
        "config_hash": digest,
        "config": config,
        "versions": package_versions(),
        **(extra or {}),
    }
    atomic_write_json(path, record)
    return path


def update_run_record(run_dir: str | Path, **fields) -> None:
    """Add facts known only after set-up (weight hashes, manifest hash) to ``run.json``."""
    path = Path(run_dir) / "run.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record.update(fields)
    atomic_write_json(path, record)


def check_run_facts(
    run_dir: str | Path,
    *,
    weights: dict[str, dict],
    manifest_hash: str,
    record: bool = True,
) -> None:
    """Refuse ``weights`` (target label -> {name, weights, sha256}) or ``manifest_hash`` that
    differ from what ``run.json`` recorded; then (``record``) record them. Every process of a
    run may check (they all refuse alike); only one should record."""
    path = Path(run_dir) / "run.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    problems = []
    for label, now in sorted(weights.items()):
        before = (stored.get("weights") or {}).get(label)
        if before is not None and before.get("sha256") != now.get("sha256"):
            problems.append(
                f"target {label!r} weights {now.get('weights') or '(default)'} have sha256 "
                f"{_short(now.get('sha256'))}, the stored rows were made with "
                f"{_short(before.get('sha256'))}"
            )
    before_manifest = stored.get("manifest_hash")
    if before_manifest is not None and before_manifest != manifest_hash:
        problems.append(
            f"the data manifest hash is {_short(manifest_hash)}, the stored rows were made "
            f"with {_short(before_manifest)}"
        )
    if problems:
        raise RunConfigMismatch(
            f"{run_dir} holds the results of other weights or data ({'; '.join(problems)}): "
            "its rows would mix with this run's. Choose another run directory "
            "(--trainer.default_root_dir or --store.run_dir), or delete the old one."
        )
    if record:
        update_run_record(run_dir, weights=weights, manifest_hash=manifest_hash)


def _short(digest: str | None) -> str:
    return (digest or "none")[:12]
