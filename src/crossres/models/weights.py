"""One loader for every weight file crossres meets: ``load_weights(model, path)``.

The format is recognised from the file's bytes, never its extension:

- ``senet50_ft_weight.pkl`` (VGGFace2-pytorch port): a Python-2 pickle of {name: float32
  numpy array}, read with ``encoding="latin1"`` through a restricted unpickler that allows only
  what numpy arrays need;
- PyTorch files (zip or legacy): a plain state dict, a Lightning checkpoint, any dict holding
  ``state_dict`` / ``model_state_dict`` / ``model``, read with ``weights_only=True``;
- a whole pickled ``nn.Module`` (the CR paper's MMdnn ``KitModel``): its tensors are extracted
  with every class replaced by an inert placeholder, so nothing from the file runs;
- safetensors.

Names are then matched to the model: a prefix of the file's names (``model.`` of a
LightningModule, ``module.`` of DataParallel/DDP) is stripped when that makes them match, and
the Caffe/MMdnn names of the CR paper's code (``conv2_1_1x1_reduce_bn.running_mean``,
``classifier_1.weight``, ...) are mapped one to one onto ``SEResNet50``'s.

Weight files are data, never code: a pickle that calls anything other than tensor/array
rebuilding and plain containers is refused before the call happens.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import pickle
import re
import types
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from crossres.paths import sha256_file

__all__ = [
    "LoadReport",
    "WeightFileError",
    "caffe_to_crossres_name",
    "detect_format",
    "load_weights",
    "read_tensors",
]


class WeightFileError(ValueError):
    """A weight file that cannot be read or does not fit the model; ``problems`` lists each
    offending key (or other cause), one per line of the message."""

    def __init__(self, path: str | Path, message: str, problems: list[str] | None = None):
        self.path = str(path)
        self.problems = list(problems or [])
        text = f"{self.path}: {message}"
        if self.problems:
            text += "\n  - " + "\n  - ".join(self.problems)
        super().__init__(text)


@dataclass(frozen=True)
class LoadReport:
    """What ``load_weights`` did.

    format: the file format recognised (see ``detect_format``) and, for PyTorch files, what
        held the tensors ("state-dict", "lightning-checkpoint", "checkpoint[model_state_dict]",
        "pickled-module[MainModel.KitModel]", ...).
    naming: "crossres" (names as in the model) or "caffe-mmdnn" (the CR paper's code).
    prefix: prefix stripped from the file's names ("" if none; "module." segments from
        DataParallel are dropped too when ``dropped_module`` is set).
    """

    path: str
    format: str
    sha256: str
    num_tensors: int
    num_file_tensors: int
    naming: str = "crossres"
    prefix: str = ""
    dropped_module: bool = False
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    ignored: tuple[str, ...] = field(default=(), repr=False)


# ----------------------------------------------------------------------------- format detection

_ZIP_MAGIC = b"PK\x03\x04"
# torch.serialization.MAGIC_NUMBER as pickled (LONG1, 10 bytes) at the head of a legacy file.
_TORCH_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

FORMATS = ("torch-zip", "torch-legacy", "pickle", "safetensors")


def detect_format(path: str | Path) -> str:
    """ "torch-zip", "torch-legacy", "pickle" (protocol 2-5) or "safetensors", from the bytes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {str(path)!r} does not exist (or is not a file)")
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


# ----------------------------------------------------------------------------- restricted pickles


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


class _Refused(pickle.UnpicklingError):
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
            raise _Refused(f"{module}.{name}", "refers to") from None


class _StubMeta(type):
    # Calling a stand-in (pickle REDUCE/INST, i.e. "run this callable") is refused: in a real
    # load this is where a pickle executes code.
    def __call__(cls, *args, **kwargs):
        raise _Refused(cls._qualname, "calls")


class _Stub(metaclass=_StubMeta):
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
    raise _Refused(f"copyreg._reconstructor({cls!r})", "calls")


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
            stub = _StubMeta(name, (_Stub,), {"_qualname": qualname, "__module__": __name__})
            self._stubs[qualname] = stub
        return stub


def _stub_pickle_module() -> types.ModuleType:
    mod = types.ModuleType("crossres_stub_pickle")
    mod.Unpickler = _ModuleStubUnpickler  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: _ModuleStubUnpickler(f, **kw).load()  # type: ignore[attr-defined]
    return mod


def _module_tensors(root: _Stub) -> dict[str, torch.Tensor]:
    """State dict of a stand-in ``nn.Module`` tree (its ``_parameters``, persistent
    ``_buffers`` and ``_modules``), as ``Module.state_dict`` would name them."""
    out: dict[str, torch.Tensor] = {}

    def walk(obj: _Stub, prefix: str) -> None:
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
            if isinstance(child, _Stub):
                walk(child, f"{prefix}{k}.")

    walk(root, "")
    return out


def _looks_like_module(obj) -> bool:
    return (
        isinstance(obj, _Stub)
        and isinstance(obj._stub_state, Mapping)
        and "_modules" in obj._stub_state
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
    if _looks_like_module(obj):
        return f"pickled-module[{obj._qualname}]", _module_tensors(obj)
    if not isinstance(obj, Mapping):
        raise WeightFileError(
            path, f"holds a {type(obj).__name__}, not a state dict or a checkpoint dict"
        )
    for key in _CONTAINER_KEYS:
        inner = obj.get(key)
        if _looks_like_module(inner):
            return f"checkpoint[{key}]=pickled-module[{inner._qualname}]", _module_tensors(inner)
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


def _refusal(path: Path, err: _Refused) -> WeightFileError:
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
    except _Refused as err:
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
            pickle_module=_stub_pickle_module(),
            encoding="latin1",
        )
    except _Refused as err:
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


# ----------------------------------------------------------------------------- Caffe/MMdnn names

_CAFFE_BLOCK = re.compile(
    r"^conv(?P<stage>[2-5])_(?P<block>[1-9]\d*)_"
    r"(?P<layer>1x1_reduce|3x3|1x1_increase|1x1_down|1x1_up|1x1_proj)(?P<bn>_bn)?$"
)
_CAFFE_CONV = {"1x1_reduce": "conv1", "3x3": "conv2", "1x1_increase": "conv3"}
_CAFFE_BN = {"1x1_reduce": "bn1", "3x3": "bn2", "1x1_increase": "bn3", "1x1_proj": "downsample.1"}
_CAFFE_SE = {"1x1_down": "conv4", "1x1_up": "conv5", "1x1_proj": "downsample.0"}
_CAFFE_TOP = {"conv1_7x7_s2": "conv1", "conv1_7x7_s2_bn": "bn1", "classifier_1": "fc"}


def caffe_to_crossres_name(name: str) -> str | None:
    """``conv3_1_1x1_proj_bn.running_var`` -> ``layer2.0.downsample.1.running_var``; None for
    a name outside the Caffe/MMdnn SE-ResNet-50 naming."""
    module, dot, param = name.rpartition(".")
    if not dot:
        return None
    if module in _CAFFE_TOP:
        return f"{_CAFFE_TOP[module]}.{param}"
    m = _CAFFE_BLOCK.match(module)
    if m is None:
        return None
    layer, bn = m["layer"], bool(m["bn"])
    ours = _CAFFE_BN.get(layer) if bn else (_CAFFE_CONV.get(layer) or _CAFFE_SE.get(layer))
    if ours is None:  # e.g. an SE conv with a _bn twin: not part of the layout
        return None
    return f"layer{int(m['stage']) - 1}.{int(m['block']) - 1}.{ours}.{param}"


# ----------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class _Plan:
    """One way to rename the file's tensors: strip ``prefix``, drop ``module`` segments, map
    Caffe names, prepend ``target_prefix`` (the model's own wrapper, e.g. ``net.``)."""

    prefix: str
    drop_module: bool
    caffe: bool
    target_prefix: str
    mapping: dict[str, str]  # file name -> model name, for the file names under ``prefix``


def _rename(key: str, drop_module: bool, caffe: bool, target_prefix: str) -> str:
    if drop_module:
        key = ".".join(p for p in key.split(".") if p != "module")
    if caffe:
        key = caffe_to_crossres_name(key) or key
    return target_prefix + key


def _plan(
    names: list[str], *, prefix: str, drop_module: bool, caffe: bool, target_prefix: str
) -> _Plan:
    mapping = {
        name: _rename(name[len(prefix) :], drop_module, caffe, target_prefix)
        for name in names
        if name.startswith(prefix)
    }
    return _Plan(prefix, drop_module, caffe, target_prefix, mapping)


def _best_plan(path: Path, names: list[str], targets: set[str], prefix: str | None) -> _Plan:
    target_prefixes = [""]
    firsts = {t.split(".", 1)[0] for t in targets}
    if len(firsts) == 1 and all("." in t for t in targets):  # a wrapper, e.g. ``net.``
        target_prefixes.append(f"{firsts.pop()}.")
    variants = [
        (drop, caffe, tp)
        for drop in (False, True)
        for caffe in (False, True)
        for tp in target_prefixes
    ]
    if prefix is not None:
        candidates = {(prefix, *v) for v in variants}
    else:
        # Only prefixes after which some name, renamed, is one of the model's.
        candidates = set()
        for name in names:
            parts = name.split(".")
            for i in range(len(parts)):
                rest = ".".join(parts[i:])
                for v in variants:
                    if _rename(rest, *v) in targets:
                        candidates.add(("".join(f"{q}." for q in parts[:i]), *v))
    plans = []
    for p, drop, caffe, tp in sorted(candidates):
        plan = _plan(names, prefix=p, drop_module=drop, caffe=caffe, target_prefix=tp)
        matched = {v for v in plan.mapping.values() if v in targets}
        if matched:
            plans.append((len(matched), plan))
    if not plans:
        raise WeightFileError(
            path,
            "none of the file's tensor names match the model's "
            f"(file: {', '.join(names[:4])}, ...; model: {', '.join(sorted(targets)[:4])}, ...)",
        )
    best = max(score for score, _ in plans)
    top = [plan for score, plan in plans if score == best]
    # Plans that pick the same file tensors for the same model names are the same choice.
    distinct = {}
    for plan in top:
        sig = frozenset((k, v) for k, v in plan.mapping.items() if v in targets)
        distinct.setdefault(sig, plan)
    if len(distinct) > 1:
        options = sorted({plan.prefix for plan in distinct.values()})
        raise WeightFileError(
            path,
            f"several parts of the file match the model equally well ({best} tensors each): "
            "pass prefix= to say which",
            [f"prefix={p!r}" for p in options],
        )
    # Among equivalent plans prefer the simplest: no renaming, no dropped segments.
    return min(top, key=lambda p: (p.caffe, p.drop_module, len(p.prefix), p.target_prefix))


def load_weights(
    model: nn.Module,
    path: str | Path,
    *,
    strict: bool = True,
    prefix: str | None = None,
) -> LoadReport:
    """Load a weight file of any recognised format into ``model`` in place.

    strict: every model tensor (BatchNorm's ``num_batches_tracked`` excepted) must come from
        the file and every file tensor under the chosen prefix must be used; otherwise one
        ``WeightFileError`` lists each missing and unexpected key. Shape mismatches are always
        an error (listing expected and found shapes).
    prefix: the part of the file's names to strip (e.g. "student."), when several parts of a
        checkpoint would fit; found automatically otherwise.

    Records the file's sha256 in ``model.pretrained_cfg.weights_hash`` when the model has one.
    """
    path = Path(path)
    fmt, tensors = read_tensors(path)
    own = model.state_dict()
    targets = set(own)
    names = list(tensors)
    plan = _best_plan(path, names, targets, prefix)

    loaded: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    unexpected: list[str] = []
    sources: dict[str, str] = {}
    for name, target in plan.mapping.items():
        if target not in targets:
            unexpected.append(name)
            continue
        if target in sources:
            problems.append(f"{name}: maps to {target}, as does {sources[target]}")
            continue
        sources[target] = name
        found, expected = tuple(tensors[name].shape), tuple(own[target].shape)
        if found != expected:
            problems.append(
                f"{target}: shape mismatch, model expects {list(expected)}, file has "
                f"{list(found)}" + (f" (as {name})" if name != target else "")
            )
            continue
        loaded[target] = tensors[name]
    missing = sorted(t for t in targets - sources.keys() if not t.endswith("num_batches_tracked"))
    if strict:
        problems += [f"{t}: missing from the file (shape {list(own[t].shape)})" for t in missing]
        problems += [
            f"{n}: unexpected, the model has no {plan.mapping[n]} (shape {list(tensors[n].shape)})"
            for n in unexpected
        ]
    if problems:
        raise WeightFileError(
            path,
            f"does not fit {type(model).__name__} ({len(problems)} problem(s); format {fmt}"
            + (f", prefix {plan.prefix!r} stripped" if plan.prefix else "")
            + (", Caffe/MMdnn names" if plan.caffe else "")
            + ")",
            problems,
        )
    with torch.no_grad():
        for target, value in loaded.items():
            own[target].copy_(value.to(device=own[target].device, dtype=own[target].dtype))

    digest = sha256_file(path)
    report = LoadReport(
        path=str(path),
        format=fmt,
        sha256=digest,
        num_tensors=len(loaded),
        num_file_tensors=len(names),
        naming="caffe-mmdnn" if plan.caffe else "crossres",
        prefix=plan.prefix,
        dropped_module=plan.drop_module,
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        ignored=tuple(n for n in names if n not in plan.mapping),
    )
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg is not None and hasattr(cfg, "weights_hash"):
        model.pretrained_cfg = replace(
            cfg,
            weights_hash=digest,
            extra={**cfg.extra, "weights_file": path.name, "weights_format": fmt},
        )
    return report
