"""Export of a CR-trained student as a plain state dict that ``build_model(name, weights=...)``
loads, written atomically and byte-reproducibly with its sha256 beside it (``crossres.io``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
from torch import nn

from crossres.io import atomic_torch_save

__all__ = ["StudentExport", "save_state_dict"]


class StudentExport(pl.Callback):
    """At the end of ``fit``, writes the student as a plain state dict (``path``, default
    ``<default_root_dir>/student.pt``) and its sha256 in ``<path>.sha256``; ``build_model(name,
    weights=path)`` loads it."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.written: Path | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        student = getattr(pl_module, "student", None)
        if not isinstance(student, nn.Module):
            raise TypeError(f"StudentExport needs a module with a .student, got {type(pl_module)}")
        path = Path(self.path or Path(trainer.default_root_dir) / "student.pt")
        if trainer.is_global_zero:
            save_state_dict(student, path)
        trainer.strategy.barrier("student-export")
        self.written = path


def save_state_dict(model: nn.Module, path: str | os.PathLike) -> str:
    """``torch.save(model.state_dict())`` on the CPU, atomically and byte-reproducibly (the same
    tensors give the same file); writes ``<path>.sha256`` and returns the digest."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    digest = atomic_torch_save(state, path, sidecar=True)
    return digest
