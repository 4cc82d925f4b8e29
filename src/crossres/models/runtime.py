"""Where a computation runs and where its cache lives: the few helpers feature extraction,
head fitting and query selection share (one copy each)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from crossres.paths import cache_dir


def distributed_info() -> tuple[int, int]:
    """(rank, world_size) of the running process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); the CPU for an empty one."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def cache_directory(
    kind: str, cache: str | os.PathLike | bool | None, manifest_hash: str
) -> Path | None:
    """The folder a derived artefact of ``kind`` ("templates", "heads") is cached in.

    cache: None caches under ``cache_dir(kind)`` when the manifest hash is known (the cache key
    needs it); True always does; False never; a path is that folder."""
    if cache is None:
        directory = cache_dir(kind) if manifest_hash else None
    elif cache is False:
        directory = None
    elif cache is True:
        directory = cache_dir(kind)
    else:
        directory = Path(cache)
    if directory is not None and not manifest_hash:
        raise ValueError(
            f"caching {kind} needs a manifest hash (argument manifest_hash= or the dataset's "
            "manifest_hash), or pass cache=False"
        )
    return directory
