"""Restricted unpicklers: weight files are data, never code.

``NumpyUnpickler`` resolves only the globals a pickle of numpy arrays needs (protocols 2-5,
Python 2 names included). ``stub_pickle_module`` reads a whole pickled ``nn.Module`` (the CR
paper's MMdnn ``KitModel``) with every class replaced by an inert stand-in, and
``module_tensors`` takes its tensors out. Anything that would call a function other than
tensor/array rebuilding and plain containers raises ``Refused`` before the call happens.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import pickle
import types
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch

__all__ = [
    "NumpyUnpickler",
    "Refused",
    "Stub",
    "looks_like_module",
    "module_tensors",
    "stub_pickle_module",
]


def _numpy_attr(module: str, name: str):
    # numpy >= 2 keeps these under numpy._core (numpy.core is a deprecated alias); 1.x under core.
    for candidate in (module.replace("numpy.core", "numpy._core"), module):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise AttributeError(f"{module}.{name}")


# What a pickle of numpy arrays needs (py2 and py3, protocols 2-5) and nothing else.
_NUMPY_GLOBALS: dict[tuple[str, str], object] = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _NUMPY_GLOBALS[(_mod, "_reconstruct")] = _numpy_attr("numpy.core.multiarray", "_reconstruct")
    _NUMPY_GLOBALS[(_mod, "scalar")] = _numpy_attr("numpy.core.multiarray", "scalar")
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _NUMPY_GLOBALS[(_mod, "_frombuffer")] = _numpy_attr("numpy.core.numeric", "_frombuffer")
_NUMPY_GLOBALS.update(
    {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("_codecs").encode,
        ("collections", "OrderedDict"): OrderedDict,
    }
)


def _py3_name(module: str, name: str) -> tuple[str, str]:
    # Python-2 names (``__builtin__.set``, ``copy_reg._reconstructor``) as the stock
    # Unpickler's fix_imports maps them; an overridden find_class receives them unmapped.
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class Refused(pickle.UnpicklingError):
    def __init__(self, qualname: str, how: str) -> None:
        self.qualname = qualname
        super().__init__(f"the pickle {how} {qualname}")


class NumpyUnpickler(pickle.Unpickler):
    """Unpickler for {name: numpy array} files: resolves only the numpy globals arrays need;
    any other global (a class, ``os.system``, ...) is refused before it can be called."""

    def find_class(self, module: str, name: str):
        module, name = _py3_name(module, name)
        try:
            return _NUMPY_GLOBALS[(module, name)]
        except KeyError:
            raise Refused(f"{module}.{name}", "refers to") from None


class _StubMeta(type):
    # Calling a stand-in (pickle REDUCE/INST, i.e. "run this callable") is refused: in a real
    # load this is where a pickle executes code.
    def __call__(cls, *args, **kwargs):
        raise Refused(cls._qualname, "calls")


class Stub(metaclass=_StubMeta):
    """Inert stand-in for a class named in the file; NEWOBJ + BUILD just record the state."""

    _qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_stub_args"] = args
        obj.__dict__["_stub_state"] = None
        obj.__dict__["_stub_items"] = {}
        return obj

    def __setstate__(self, state) -> None:
        self.__dict__["_stub_state"] = state

    def __setitem__(self, key, value) -> None:  # dict subclasses (SETITEMS)
        self.__dict__["_stub_items"][key] = value

    def append(self, value) -> None:  # list subclasses (APPENDS)
        self.__dict__["_stub_items"][len(self._stub_items)] = value

    def extend(self, values) -> None:
        for v in values:
            self.append(v)

    def __repr__(self) -> str:
        return f"<stand-in for {self._qualname}>"


def _safe_reconstructor(cls, base, state):
    # copyreg._reconstructor (pickle protocol < 2): only stand-ins may be rebuilt this way.
    if isinstance(cls, _StubMeta):
        return cls.__new__(cls)
    raise Refused(f"copyreg._reconstructor({cls!r})", "calls")


def _torch_rebuild_globals() -> dict[tuple[str, str], object]:
    import torch._utils as tu

    allowed: dict[tuple[str, str], object] = {
        ("torch._utils", n): getattr(tu, n)
        for n in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter")
        if hasattr(tu, n)
    }
    if hasattr(tu, "_rebuild_parameter_with_state"):
        allowed[("torch._utils", "_rebuild_parameter_with_state")] = (
            tu._rebuild_parameter_with_state
        )
    allowed.update(
        {
            ("torch", "Size"): torch.Size,
            ("torch", "device"): torch.device,
            ("builtins", "set"): set,
            ("builtins", "frozenset"): frozenset,
            ("copyreg", "_reconstructor"): _safe_reconstructor,
        }
    )
    return allowed


class _ModuleStubUnpickler(pickle.Unpickler):
    """For whole pickled modules: tensors, numpy arrays and containers are rebuilt; every other
    global becomes an inert stand-in class; calling one is refused."""

    _allowed: dict[tuple[str, str], object] | None = None
    _stubs: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if type(self)._allowed is None:
            type(self)._allowed = {**_NUMPY_GLOBALS, **_torch_rebuild_globals()}
        module, name = _py3_name(module, name)
        hit = self._allowed.get((module, name))
        if hit is not None:
            return hit
        qualname = f"{module}.{name}"
        stub = self._stubs.get(qualname)
        if stub is None:
            stub = _StubMeta(name, (Stub,), {"_qualname": qualname, "__module__": __name__})
            self._stubs[qualname] = stub
        return stub


def stub_pickle_module() -> types.ModuleType:
    mod = types.ModuleType("crossres_stub_pickle")
    mod.Unpickler = _ModuleStubUnpickler  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: _ModuleStubUnpickler(f, **kw).load()  # type: ignore[attr-defined]
    return mod


def module_tensors(root: Stub) -> dict[str, torch.Tensor]:
    """State dict of a stand-in ``nn.Module`` tree (its ``_parameters``, persistent
    ``_buffers`` and ``_modules``), as ``Module.state_dict`` would name them."""
    out: dict[str, torch.Tensor] = {}

    def walk(obj: Stub, prefix: str) -> None:
        state = obj._stub_state
        if not isinstance(state, Mapping):
            return
        for k, v in (state.get("_parameters") or {}).items():
            if isinstance(v, torch.Tensor):
                out[prefix + k] = torch.Tensor.detach(v)  # (not an attribute the file set)
        skip = state.get("_non_persistent_buffers_set") or set()
        for k, v in (state.get("_buffers") or {}).items():
            if isinstance(v, torch.Tensor) and k not in skip:
                out[prefix + k] = torch.Tensor.detach(v)
        for k, child in (state.get("_modules") or {}).items():
            if isinstance(child, Stub):
                walk(child, f"{prefix}{k}.")

    walk(root, "")
    return out


def looks_like_module(obj) -> bool:
    return (
        isinstance(obj, Stub)
        and isinstance(obj._stub_state, Mapping)
        and "_modules" in obj._stub_state
    )
