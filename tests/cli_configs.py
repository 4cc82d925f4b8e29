"""Building blocks of the ``crossres test`` configurations that the CLI tests write to YAML: one
place for the quiet CPU trainer, the attack callbacks, the frozen target and the datamodules,
so that each test states only what it varies."""

from __future__ import annotations

import copy
from typing import Any

QUIET_CPU_TRAINER = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def attack(name: str, class_name: str, *, objective: str | None = None, **init_args) -> dict:
    """An ``AttackCallback`` named ``name`` around ``crossres.attacks.<class_name>``."""
    args: dict[str, Any] = {"name": name}
    if objective is not None:
        args["objective"] = objective
    args["attack"] = {"class_path": f"crossres.attacks.{class_name}", "init_args": init_args}
    return {"class_path": "crossres.callbacks.AttackCallback", "init_args": args}


def cw(name: str, *, binary_search_steps: int, steps: int) -> dict:
    return attack(name, "CarliniWagnerL2", binary_search_steps=binary_search_steps, steps=steps)


def dr(name: str, *, epsilon: float, steps: int) -> dict:
    """DR impersonation, the paper's feature-space attack."""
    return attack(
        name, "DeepRepresentation", objective="impersonation", epsilon=epsilon, steps=steps
    )


def frozen_target(name: str, label: str) -> dict:
    return {
        "class_path": "crossres.lightning_modules.FrozenTarget",
        "init_args": {"targets": [{"name": name, "label": label}]},
    }


def datamodule(class_name: str, **init_args) -> dict:
    return {"class_path": f"crossres.datamodules.{class_name}", "init_args": init_args}


def crossres_config(
    model: dict, data: dict, callbacks: list[dict] | None = None, **trainer
) -> dict:
    """A whole configuration: seed 0, the quiet CPU trainer (``trainer`` overrides it)."""
    section = dict(QUIET_CPU_TRAINER)
    if callbacks is not None:
        section["callbacks"] = list(callbacks)
    section.update(trainer)
    return {"seed_everything": 0, "trainer": section, "model": model, "data": data}


def tiny_synthetic(**overrides) -> dict:
    """Synthetic faces for ``tiny_facenet``: 6 people x 4 images, 8 px and original, batches of 3."""
    args = dict(n_identities=6, n_images=4, resolutions=[8, 0], batch_size=3, input_size=64)
    return datamodule("SyntheticFacesDataModule", **{**args, **overrides})


TINY_TARGET = frozen_target("tiny_facenet", "tiny")


def with_overrides(config: dict, overrides: dict[str, Any]) -> dict:
    """A deep copy of ``config`` with dotted-path values set ("trainer.callbacks.0.init_args.
    name": list items by index)."""
    out = copy.deepcopy(config)
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[leaf] = value
    return out
