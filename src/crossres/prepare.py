"""``crossres prepare``: the explicit, cached steps the default benchmark needs before
``crossres test`` (``make run`` runs it first).

1. Fetch the embedded real faces (``crossres fetch-faces``; cached, hash-checked).
2. Train the default's CR model once (``configs/cr_dlib.yaml``'s recipe, through ``crossres
   fit``) and record it as what ``build_model("dlib_resnet29_cr")`` loads. ``--force`` retrains;
   ``--recipe FILE`` trains another recipe of the same form (a ``crossres fit`` config of
   ``CrossResolutionDistillation`` on ``CrossResolutionDataModule``) and records that instead.

A killed preparation is resumed by running it again: the faces fetch keeps every verified
archive, the training restarts (from scratch: the weights are then the same bytes), and only
a complete, hash-checked file is ever recorded.

Each step says what it found or did. A second run finds everything cached and takes seconds.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from crossres.datamodules.embedded_sources import main as fetch_faces_main
from crossres.errors import ConfigValueError
from crossres.lightning_modules.cr_recipe import CRWeights, FitRunner, ensure_cr_dlib_weights
from crossres.models.prepared import record_prepared

#: The registry name whose default weights this step prepares.
CR_MODEL = "dlib_resnet29_cr"


def prepare_cr_weights(
    *,
    fit: FitRunner,
    force: bool = False,
    faces_cache: str | None = None,
    recipe: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> CRWeights:
    """Train (or find) the CR dlib weights and record them for ``build_model(CR_MODEL)``."""
    weights = ensure_cr_dlib_weights(
        fit=fit, faces_cache=faces_cache, force=force, recipe=recipe, log=log
    )
    record = record_prepared(
        CR_MODEL,
        weights.path,
        sha256=weights.sha256,
        teacher_sha256=weights.teacher_sha256,
        manifest_hash=weights.manifest_hash,
    )
    what = {
        "found": "found cached",
        "adopted": "found cached (sidecar hash added)",
        "trained": f"trained in {weights.seconds:.0f} s",
    }[weights.action]
    log(
        f"{CR_MODEL}: {what}: {weights.path} (sha256 {weights.sha256[:16]}...), recorded in {record}"
    )
    return weights


def read_recipe(path: str) -> dict[str, Any]:
    """A recipe file: a ``crossres fit`` config whose ``data`` wraps a faces source."""
    file = Path(path)
    if not file.is_file():
        raise ConfigValueError(f"--recipe {path}: no such file")
    try:
        recipe = yaml.safe_load(file.read_text())
        recipe["data"]["init_args"]["source"]["init_args"]
        recipe["model"]["init_args"]
    except yaml.YAMLError as e:
        raise ConfigValueError(f"--recipe {path}: not YAML ({e})") from e
    except (KeyError, TypeError) as e:
        raise ConfigValueError(
            f"--recipe {path}: not a CR recipe (needs model.init_args and "
            f"data.init_args.source.init_args, as configs/cr_dlib.yaml; missing {e})"
        ) from e
    model = recipe["model"]["init_args"].get("model")
    if model != "dlib_resnet29":
        raise ConfigValueError(
            f"--recipe {path}: trains {model!r}, but crossres prepare makes {CR_MODEL}, a "
            "fine-tune of dlib_resnet29; CR-train other models with crossres fit --config FILE"
        )
    return recipe


def main(argv: Sequence[str] | None, *, fit: FitRunner) -> int:
    p = argparse.ArgumentParser(prog="crossres prepare", description=__doc__)
    p.add_argument("--force", action="store_true", help="retrain the CR weights even if cached")
    p.add_argument(
        "--faces-cache", default=None, help="faces cache folder (default: the crossres cache)"
    )
    p.add_argument(
        "--recipe",
        default=None,
        metavar="FILE",
        help="train this CR recipe (a crossres fit config) instead of configs/cr_dlib.yaml's",
    )
    args = p.parse_args(list(argv or []))
    recipe = read_recipe(args.recipe) if args.recipe else None
    print("crossres prepare: embedded faces")
    rc = fetch_faces_main(["--quiet"] + (["--cache", args.faces_cache] if args.faces_cache else []))
    if rc != 0:
        print(f"crossres prepare: fetching the faces failed (status {rc}); nothing trained")
        return rc
    print(f"crossres prepare: CR weights of {CR_MODEL}")
    prepare_cr_weights(fit=fit, force=args.force, faces_cache=args.faces_cache, recipe=recipe)
    return 0
