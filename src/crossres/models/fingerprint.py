"""What identifies a model's weights, for the caches keyed by them (templates, manifests)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

__all__ = ["model_hash", "state_hash"]


def state_hash(model: nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.dtype == torch.bfloat16:
            t = t.float()
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def model_hash(model: nn.Module) -> str:
    """What identifies a model's weights: ``pretrained_cfg.weights_hash`` (sha256 of the weight
    file) when it has one, else ``"state-"`` + ``state_hash(model)``, so that randomly
    initialised or fine-tuned models are told apart too."""
    cfg = getattr(model, "pretrained_cfg", None)
    weights_hash = getattr(cfg, "weights_hash", "") if cfg is not None else ""
    if weights_hash:
        return str(weights_hash)
    return "state-" + state_hash(model)
