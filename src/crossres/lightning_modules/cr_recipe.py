"""The default's CR weights: ``configs/cr_dlib.yaml``'s recipe, trained once and cached.

``ensure_cr_dlib_weights(fit=...)`` runs ``crossres fit`` on the recipe (the same as
``crossres fit --config configs/cr_dlib.yaml``; ``fit`` is the CLI's runner, passed in so that
this module never imports the CLI) unless the cache already holds the weights for this recipe,
dlib's weights and the embedded photos' split. The file is written atomically with a sha256
sidecar and a JSON record; ``crossres prepare`` calls this and then records the file as what
``build_model("dlib_resnet29_cr")`` loads (``crossres.models.prepared``).
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from crossres.datamodules.embedded import EmbeddedFacesDataModule
from crossres.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    is_complete,
    recorded_hash,
    sha256_bytes,
    sha256_file,
    sidecar_path,
    verify_file,
)
from crossres.locks import RunDirLock
from crossres.models.dlib_resnet import packaged_dlib_model_path
from crossres.paths import cache_dir
from crossres.phases import mark

__all__ = [
    "CR_DLIB_RECIPE",
    "CR_HOLDOUT",
    "CRWeights",
    "cr_dlib_weights_path",
    "ensure_cr_dlib_weights",
]

#: Runs a LightningCLI command line (``["fit", "--config", ...]``): ``crossres.cli.run_lightning``.
FitRunner = Callable[[Sequence[str]], object]

#: Photos of the training pool held out as the validation split (``configs/cr_dlib.yaml``).
CR_HOLDOUT = 48

#: ``configs/cr_dlib.yaml``: the CR fine-tune of dlib's embedder, label-free (distillation from
#: the frozen full-resolution dlib), on every embedded photo that is no query of the uncapped
#: split with 50 single-photo queries (the gallery photos and the single-face distractors: what
#: ``configs/embedded_full.yaml`` leaves out of its queries, and the default run's queries are a
#: subset of the full set's), less a seeded
#: holdout of ``CR_HOLDOUT`` photos to judge recipes on (never the queries); with
#: augmentation; the final weights are used. ``tests/test_cr_training.py`` checks the file and
#: this dict agree; ``tests/test_cr_queries.py`` that no query is trained on.
CR_DLIB_RECIPE: dict[str, Any] = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 6,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 5,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": [
            {
                "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                "init_args": {"save_last": True, "save_top_k": 0},
            },
            {"class_path": "crossres.lightning_modules.cr_training.StudentExport"},
        ],
    },
    "model": {
        "class_path": "crossres.lightning_modules.cr_training.CrossResolutionDistillation",
        "init_args": {
            "model": "dlib_resnet29",
            "label_free": True,
            "exponents": [3, 7],
            "resolution_sampling": "log_uniform",
            "lr": 0.01,
            "momentum": 0.9,
            "weight_decay": 0.0,
            "similarity": "cosine",
            "seed": 0,
        },
    },
    "data": {
        "class_path": "crossres.datamodules.cr_data.CrossResolutionDataModule",
        "init_args": {
            "source": {
                "class_path": "crossres.datamodules.embedded.EmbeddedFacesDataModule",
                "init_args": {
                    "seed": 0,
                    # the queries reserved from training: those of configs/embedded_full.yaml
                    # (every mated query uncapped, 50 single-photo non-mated queries), a
                    # superset of configs/default.yaml's
                    "n_single_queries": 50,
                    "batch_size": 16,
                    "resolutions": [16, 24, 64, 256],
                },
            },
            "augmentation": {
                "flip": 0.5,
                "crop_scale": 0.9,
                "brightness": 0.2,
                "contrast": 0.2,
                "saturation": 0.2,
            },
            "holdout": CR_HOLDOUT,
            "seed": 0,
        },
    },
}


#: Bump when the training code changes what ``CR_DLIB_RECIPE`` produces (retrains the cache).
CR_DLIB_VERSION = 1


def _recipe_key(recipe: dict[str, Any], *parts: str) -> str:
    # json.dumps with its default separators, not crossres.io.canonical_json: the key names the
    # cached file, and changing its spelling would retrain weights nobody changed
    text = f"v{CR_DLIB_VERSION}|" + json.dumps(recipe, sort_keys=True) + "|" + "|".join(parts)
    return sha256_bytes(text.encode())


@dataclass(frozen=True)
class CRWeights:
    """The cached CR dlib weights: ``path`` (a plain state dict with ``.sha256`` beside it),
    its ``sha256``, the dlib weights it was fine-tuned from (``teacher_sha256``), the photos'
    split (``manifest_hash``) and what ``ensure_cr_dlib_weights`` did: "found" (cached),
    "adopted" (cached by an older crossres without a sidecar, hash checked against its JSON
    record) or "trained"."""

    path: Path
    sha256: str
    teacher_sha256: str
    manifest_hash: str
    action: Literal["found", "adopted", "trained"]
    seconds: float = 0.0


def _with_faces_cache(recipe: dict[str, Any], faces_cache: str | None) -> dict[str, Any]:
    recipe = copy.deepcopy(recipe)
    if faces_cache is not None:
        recipe["data"]["init_args"]["source"]["init_args"]["faces_cache"] = str(faces_cache)
    return recipe


def _key_parts(recipe: dict[str, Any]) -> tuple[str, str]:
    """dlib's weight hash and the embedded split's manifest hash (needs the fetched faces)."""
    src = dict(recipe["data"]["init_args"]["source"]["init_args"])
    dm = EmbeddedFacesDataModule(**{"faces_cache": None, **src})
    dm.setup("fit")
    return sha256_file(packaged_dlib_model_path()), dm.manifest_hash


def cr_dlib_weights_path(
    *, faces_cache: str | None = None, recipe: dict[str, Any] | None = None
) -> Path:
    """Where ``ensure_cr_dlib_weights`` keeps the CR dlib weights: named by the recipe, dlib's
    own weights and the embedded split (manifest hash), so any change trains afresh."""
    recipe = _with_faces_cache(CR_DLIB_RECIPE if recipe is None else recipe, faces_cache)
    return _target(recipe, *_key_parts(recipe))


def _target(recipe: dict[str, Any], teacher_sha: str, manifest_hash: str) -> Path:
    key = _recipe_key(recipe, teacher_sha, manifest_hash)
    return cache_dir("models") / f"dlib_resnet29-cr-{key[:24]}.pt"


def _cached(target: Path, log: Callable[[str], None]) -> tuple[str, str] | None:
    """(sha256, "found" | "adopted") for a usable cached file, None when it must be trained."""
    if not target.is_file():
        return None
    if is_complete(target):
        return verify_file(target), "found"
    record = target.with_suffix(".json")
    if recorded_hash(target) is None and record.is_file():
        # written before sidecars existed: its JSON record holds the hash to check it against
        try:
            expected = str(json.loads(record.read_text())["sha256"])
        except (ValueError, KeyError, TypeError):
            expected = ""
        digest = sha256_file(target)
        if digest == expected:
            atomic_write_text(sidecar_path(target), f"{digest}  {target.name}\n")
            return digest, "adopted"
    log(f"{target} does not match its recorded sha256 (interrupted or damaged): retraining it")
    return None


def ensure_cr_dlib_weights(
    *,
    fit: FitRunner,
    faces_cache: str | None = None,
    force: bool = False,
    recipe: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> CRWeights:
    """The CR variant of dlib's embedder, trained once with ``CR_DLIB_RECIPE`` by ``fit`` (the
    CLI's runner) and cached under ``cache_dir("models")``; ``force`` retrains.

    The weights (a plain state dict: ``build_model("dlib_resnet29", weights=path)``) get a
    ``.sha256`` sidecar and a JSON record (``.json``: recipe, hashes, training time). Needs
    the embedded faces (``crossres fetch-faces``).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    recipe = _with_faces_cache(CR_DLIB_RECIPE if recipe is None else recipe, faces_cache)
    teacher_sha, manifest_hash = _key_parts(recipe)
    target = _target(recipe, teacher_sha, manifest_hash)
    # One training per cache at a time (flock: a killed one leaves no lock), in a work folder
    # named by the target, so a kill leaves one folder that the next attempt clears (whether
    # it then trains or finds the weights saved just before the kill), not a temporary folder
    # per attempt.
    work = target.with_name(target.stem + ".work")
    with RunDirLock(work, what="the CR training folder", hint="wait for that crossres prepare"):
        cached = None if force else _cached(target, log)
        if cached is not None:
            shutil.rmtree(work)  # still holding the lock: see below
            digest, action = cached
            return CRWeights(target, digest, teacher_sha, manifest_hash, action)  # type: ignore[arg-type]
        fit_dir = work / "fit"
        if fit_dir.exists():
            log(f"removing {fit_dir}: left by an interrupted training (training restarts)")
            shutil.rmtree(fit_dir)
        fit_dir.mkdir()
        config = fit_dir / "config.yaml"
        config.write_text(yaml.safe_dump(recipe, sort_keys=False))
        log(f"training the CR variant of dlib_resnet29 into {target} (once; a few minutes)")
        start = time.perf_counter()
        mark("cr-train")
        fit(["fit", "--config", str(config), "--trainer.default_root_dir", str(fit_dir)])
        seconds = time.perf_counter() - start
        exported = fit_dir / "student.pt"
        if not exported.is_file():
            raise RuntimeError(f"CR training finished without writing {exported}")
        verify_file(exported)  # StudentExport wrote its sidecar
        mark("cr-save")
        digest = atomic_write_bytes(target, exported.read_bytes(), sidecar=True)
        record = {
            "model": "dlib_resnet29",
            "weights": target.name,
            "sha256": digest,
            "teacher_sha256": teacher_sha,
            "manifest_hash": manifest_hash,
            "recipe": recipe,
            "train_seconds": round(seconds, 1),
            "torch": torch.__version__,
        }
        atomic_write_json(target.with_suffix(".json"), record)
        # still holding the lock: whoever locks a new file of this name next finds the target
        shutil.rmtree(work)
    log(f"CR dlib weights: {target} (sha256 {digest[:16]}..., {seconds:.0f} s)")
    return CRWeights(target, digest, teacher_sha, manifest_hash, "trained", seconds)
