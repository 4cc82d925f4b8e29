"""What a run directory records about itself, and the guard against mixing configurations.

``run.json`` holds the hash of the configuration that decides the results (model, data,
attacks, seed — not the devices, which must not change them), package versions, weight-file
hashes and the data manifest hash. A rerun with the same configuration resumes; a changed one
is refused, so it never appends to an old run's rows.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

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


class RunConfigMismatch(RuntimeError):
    pass


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
                "mix with this run's. Choose another --trainer.default_root_dir, or delete the "
                "old run directory."
            )
        return path
    record = {
        "config_hash": digest,
        "config": config,
        "versions": package_versions(),
        **(extra or {}),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
    return path


def update_run_record(run_dir: str | Path, **fields) -> None:
    """Add facts known only after set-up (weight hashes, manifest hash) to ``run.json``."""
    path = Path(run_dir) / "run.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record.update(fields)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
