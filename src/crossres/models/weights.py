"""One loader for every weight file crossres meets: ``load_weights(model, path)``.

It reads the file's tensors without running anything from it (``weight_files``: format
sniffing and reading; ``weight_pickles``: the restricted unpicklers), matches their names to
the model's (``key_matching``; ``caffe_names`` for the CR paper's Caffe/MMdnn names), checks
every shape, loads in place and records the file's sha256 in the model's config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from crossres.models.caffe_names import caffe_to_crossres_name
from crossres.models.key_matching import best_plan
from crossres.models.weight_files import FORMATS, WeightFileError, detect_format, read_tensors
from crossres.paths import sha256_file

__all__ = [
    "FORMATS",
    "LoadReport",
    "WeightFileError",
    "caffe_to_crossres_name",
    "detect_format",
    "load_weights",
    "read_tensors",
]


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
    plan = best_plan(path, names, targets, prefix)

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
