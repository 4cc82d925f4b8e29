"""Weights that an explicit step derives (``crossres prepare``) and a model factory only loads.

The step that trains a derived model (the CR fine-tune of dlib's embedder) writes the weights
under ``cache_dir("models")`` with a ``.sha256`` sidecar and then a small record,
``<name>.prepared.json``, that names the file, its sha256 and the facts it was derived from
(e.g. the teacher's weight hash). A factory calls ``prepared_weights(name)``: the path of a
file that matches its record and sidecar, or a one-line ``NotPreparedError`` naming the
command. Building a model therefore never trains, fetches or runs a CLI.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from crossres.errors import NotPreparedError
from crossres.io import atomic_write_json, verify_file
from crossres.paths import cache_dir

PREPARE_COMMAND = "crossres prepare"
RECORD_SUFFIX = ".prepared.json"
RECORD_FORMAT = "crossres-prepared-v1"


def record_path(name: str) -> Path:
    """Where the record of the prepared weights of model ``name`` lives."""
    return cache_dir("models") / f"{name}{RECORD_SUFFIX}"


def record_prepared(name: str, weights: str | os.PathLike, *, sha256: str, **facts: str) -> Path:
    """Record ``weights`` (a file in ``cache_dir("models")`` with its sidecar) as the prepared
    weights of ``name``; ``facts`` are checked again by ``prepared_weights(expect=...)``."""
    weights = Path(weights)
    if weights.parent.resolve() != cache_dir("models").resolve():
        raise ValueError(f"prepared weights must live in {cache_dir('models')}, got {weights}")
    record = {"format": RECORD_FORMAT, "name": name, "weights": weights.name, "sha256": sha256}
    record.update({k: str(v) for k, v in facts.items()})
    path = record_path(name)
    atomic_write_json(path, record)
    return path


def prepared_weights(name: str, *, expect: dict[str, str] | None = None) -> Path:
    """The path of the prepared weights of ``name``, after checking the file against its
    sidecar hash and its record (and the record's facts against ``expect``).

    Raises ``NotPreparedError`` (never prepared, or prepared from other inputs) or
    ``CorruptFileError`` (the file differs from its hash), both naming ``crossres prepare``.
    """
    path = record_path(name)
    if not path.is_file():
        raise NotPreparedError(
            f"the weights of {name!r} are not prepared yet: run `{PREPARE_COMMAND}` "
            f"(once; it trains them and caches them in {path.parent})"
        )
    try:
        record = json.loads(path.read_text())
        if record.get("format") != RECORD_FORMAT or record.get("name") != name:
            raise ValueError("unknown format")
        weights = path.parent / str(record["weights"])
        recorded = str(record["sha256"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise NotPreparedError(
            f"{path} is not a readable record of prepared weights ({e}): run `{PREPARE_COMMAND}`"
        ) from None
    for key, value in (expect or {}).items():
        if record.get(key) != value:
            raise NotPreparedError(
                f"the prepared weights of {name!r} were made from another {key} "
                f"({str(record.get(key))[:16]}..., now {value[:16]}...): run `{PREPARE_COMMAND}`"
            )
    if not weights.is_file():
        raise NotPreparedError(
            f"{weights} (recorded in {path}) is missing: run `{PREPARE_COMMAND}`"
        )
    digest = verify_file(weights, rebuild_hint=f"{PREPARE_COMMAND} --force")
    if digest != recorded:
        raise NotPreparedError(
            f"{weights} is not the file recorded in {path} (sha256 {digest[:16]}... instead of "
            f"{recorded[:16]}...): run `{PREPARE_COMMAND}`"
        )
    return weights
