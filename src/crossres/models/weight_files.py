"""Reading a weight file into named tensors, whatever its format, without running it.

The format is recognised from the file's bytes, never its extension (``detect_format``):
PyTorch files (zip or legacy; a plain state dict, a Lightning checkpoint, any dict holding
``state_dict`` / ``model_state_dict`` / ``model``, read with ``weights_only=True``), pickles
of numpy arrays (``senet50_ft_weight.pkl``), whole pickled modules (read inert, see
``weight_pickles``) and safetensors.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from crossres.errors import CrossresError
from crossres.models.weight_pickles import (
    NumpyUnpickler,
    Refused,
    looks_like_module,
    module_tensors,
    stub_pickle_module,
)

__all__ = ["FORMATS", "WeightFileError", "detect_format", "read_tensors"]


class WeightFileError(CrossresError, ValueError):
    """A weight file that cannot be read or does not fit the model; ``problems`` lists each
    offending key (or other cause), one per line of the message."""

    def __init__(self, path: str | Path, message: str, problems: list[str] | None = None):
        self.path = str(path)
        self.problems = list(problems or [])
        text = f"{self.path}: {message}"
        if self.problems:
            text += "\n  - " + "\n  - ".join(self.problems)
        super().__init__(text)


class MissingWeightFileError(CrossresError, FileNotFoundError):
    """The weight file named in the configuration is not there."""


# ----------------------------------------------------------------------------- format detection

_ZIP_MAGIC = b"PK\x03\x04"
# torch.serialization.MAGIC_NUMBER as pickled (LONG1, 10 bytes) at the head of a legacy file.
_TORCH_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

FORMATS = ("torch-zip", "torch-legacy", "pickle", "safetensors")


def detect_format(path: str | Path) -> str:
    """ "torch-zip", "torch-legacy", "pickle" (protocol 2-5) or "safetensors", from the bytes."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightFileError(f"weight file {str(path)!r} does not exist (or is not a file)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise WeightFileError(path, "the file is empty")
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "torch-legacy" if _TORCH_LEGACY_MAGIC in head[:32] else "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 8 + header_len <= size:
            return "safetensors"
    raise WeightFileError(
        path,
        f"unknown weight file format (first bytes {head[:8]!r}); crossres reads PyTorch files "
        "(torch.save, zip or legacy), pickles of numpy arrays (protocol 2-5, e.g. "
        "senet50_ft_weight.pkl) and safetensors",
    )


# ----------------------------------------------------------------------------- reading


def _as_tensor(path: Path, name: str, value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return torch.Tensor.detach(value)
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise WeightFileError(path, f"entry {name!r} is an object array, not numbers")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise WeightFileError(path, f"entry {name!r} is a {type(value).__name__}, not an array")


def _is_array(v) -> bool:
    return isinstance(v, torch.Tensor | np.ndarray)


_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")


def _unwrap(path: Path, obj) -> tuple[str, dict[str, torch.Tensor]]:
    """Find the state dict inside what a file holds; returns (what held it, tensors)."""
    if looks_like_module(obj):
        return f"pickled-module[{obj._qualname}]", module_tensors(obj)
    if not isinstance(obj, Mapping):
        raise WeightFileError(
            path, f"holds a {type(obj).__name__}, not a state dict or a checkpoint dict"
        )
    for key in _CONTAINER_KEYS:
        inner = obj.get(key)
        if looks_like_module(inner):
            return f"checkpoint[{key}]=pickled-module[{inner._qualname}]", module_tensors(inner)
        if isinstance(inner, Mapping) and any(_is_array(v) for v in inner.values()):
            kind = (
                "lightning-checkpoint"
                if key == "state_dict" and "pytorch-lightning_version" in obj
                else f"checkpoint[{key}]"
            )
            return kind, {str(k): _as_tensor(path, k, v) for k, v in inner.items() if _is_array(v)}
    arrays = {str(k): _as_tensor(path, k, v) for k, v in obj.items() if _is_array(v)}
    if not arrays:
        keys = ", ".join(map(repr, list(obj)[:12]))
        raise WeightFileError(
            path,
            f"no tensors found: the file holds a dict with keys {keys}; expected a state dict "
            f"or a checkpoint with one of {', '.join(_CONTAINER_KEYS)}",
        )
    return "state-dict", arrays


def _refusal(path: Path, err: Refused) -> WeightFileError:
    return WeightFileError(
        path,
        f"refused: {err} and crossres runs nothing from a weight file (weights are data, not "
        "code). If the file is a trusted whole model, load it yourself and save its tensors: "
        "torch.save(model.state_dict(), 'weights.pt')",
    )


def _read_pickle(path: Path) -> object:
    try:
        with open(path, "rb") as f:
            return NumpyUnpickler(f, encoding="latin1").load()
    except Refused as err:
        raise _refusal(path, err) from None
    except Exception as err:  # noqa: BLE001 - any parse failure of a foreign file
        raise WeightFileError(
            path, f"could not read the pickle (truncated or corrupt?): {type(err).__name__}: {err}"
        ) from None


def _read_torch(path: Path, fmt: str) -> object:
    if fmt == "torch-zip":
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise WeightFileError(
                path, f"could not read the PyTorch file (truncated or corrupt?): {err}"
            ) from None
        if any(n.endswith("constants.pkl") for n in names):
            raise WeightFileError(
                path,
                "is a TorchScript archive (it holds code); if you trust it, load it with "
                "torch.jit.load and save model.state_dict() instead",
            )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # not tensors-only: maybe a whole pickled module; try the inert read below
    except Exception as err:  # noqa: BLE001
        raise WeightFileError(
            path,
            f"could not read the PyTorch file (truncated or corrupt?): {type(err).__name__}: {err}",
        ) from None
    try:
        return torch.load(
            path,
            map_location="cpu",
            weights_only=False,  # safe: every global goes through _ModuleStubUnpickler
            pickle_module=stub_pickle_module(),
            encoding="latin1",
        )
    except Refused as err:
        raise _refusal(path, err) from None
    except Exception as err:  # noqa: BLE001
        raise WeightFileError(
            path,
            f"could not read the PyTorch file (truncated or corrupt?): {type(err).__name__}: {err}",
        ) from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise WeightFileError(path, "is a safetensors file: pip install safetensors") from err
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001
        raise WeightFileError(
            path, f"could not read the safetensors file: {type(err).__name__}: {err}"
        ) from None


def read_tensors(path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """Every tensor of a weight file, by name, without running anything from it.

    Returns (format description, {name: tensor}); see ``LoadReport.format``.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "safetensors":
        return fmt, _read_safetensors(path)
    obj = _read_pickle(path) if fmt == "pickle" else _read_torch(path, fmt)
    kind, tensors = _unwrap(path, obj)
    if not tensors:
        raise WeightFileError(path, f"no tensors found in the {kind}")
    name = "numpy-pickle" if fmt == "pickle" else fmt
    return f"{name}/{kind}", tensors
