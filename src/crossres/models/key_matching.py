"""Matching a file's tensor names to a model's: which prefix to strip (``model.`` of a
LightningModule, ``student.`` of a CR checkpoint), whether to drop DataParallel's ``module.``
segments, whether to map Caffe/MMdnn names, and which wrapper prefix the model adds. The plan
that matches most of the model's tensors wins; a tie between different choices is an error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crossres.models.caffe_names import caffe_to_crossres_name
from crossres.models.weight_files import WeightFileError

__all__ = ["NamePlan", "best_plan"]


@dataclass(frozen=True)
class NamePlan:
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
) -> NamePlan:
    mapping = {
        name: _rename(name[len(prefix) :], drop_module, caffe, target_prefix)
        for name in names
        if name.startswith(prefix)
    }
    return NamePlan(prefix, drop_module, caffe, target_prefix, mapping)


def best_plan(path: Path, names: list[str], targets: set[str], prefix: str | None) -> NamePlan:
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
