"""A TorchFunctionMode that proves device-clean code on the CPU.

CI has no GPU, so a tensor made on the default device where the input's device was known
(``torch.zeros(n)`` instead of ``torch.zeros(n, device=x.device)``) passes every CPU test and
breaks the first CUDA run. ``DeviceGuard`` sees every torch call made while it is active and
records, with the file and line, each factory call (``torch.zeros/ones/empty/full/arange/
tensor/eye/rand*/linspace...``) made from crossres' own source without an explicit
``device=``: such a tensor lands on the default device, whatever the inputs' device. It also
counts host synchronisations made from crossres' source (``.item()``, ``bool(t)``,
``int(t)``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``nonzero``, boolean-mask indexing),
so a test can check that an attack's iteration adds none, or a bounded number.

Only calls whose caller is in ``src/crossres`` count: torch's and the libraries' internals
are not ours to fix (and the meta-device test covers what they create).
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

SOURCE = str(Path(__file__).resolve().parents[1] / "src" / "crossres")
INSTALLED = "site-packages/crossres/"

FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.range,
    torch.tensor,
    torch.as_tensor,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.linspace,
    torch.logspace,
    torch.empty_strided,
    torch.scalar_tensor,
}
SYNCS = {
    torch.Tensor.item,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.masked_select,
    torch.Tensor.masked_select,
}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


def _ours(filename: str) -> bool:
    return filename.startswith(SOURCE) or INSTALLED in filename


def _caller() -> tuple[str, int] | None:
    """File and line of the first frame outside this module and torch's override machinery."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name != __file__ and "torch/overrides.py" not in name and "torch/utils/" not in name:
            return name, frame.f_lineno
        frame = frame.f_back
    return None


def _bool_index(args: tuple) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


@dataclass
class DeviceGuard(TorchFunctionMode):
    """Records default-device factory calls and host synchronisations made by crossres code."""

    violations: list[str] = field(default_factory=list)
    syncs: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        watched = func in FACTORIES or func in SYNCS or (func in INDEXING and _bool_index(args))
        if watched:
            where = _caller()
            if where is not None and _ours(where[0]):
                site = f"{Path(where[0]).name}:{where[1]}"
                if func in FACTORIES and kwargs.get("device") is None:
                    # as_tensor/tensor of a tensor keep its device
                    if not (args and isinstance(args[0], torch.Tensor)):
                        self.violations.append(f"{func.__name__} without device= at {site}")
                elif func not in FACTORIES:
                    self.syncs[f"{func.__name__} at {site}"] += 1
        return func(*args, **kwargs)

    @property
    def sync_count(self) -> int:
        return sum(self.syncs.values())
