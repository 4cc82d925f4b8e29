"""``crossres transfer``: stored adversarials evaluated on another target and at other resolutions.

A run that kept its adversarials (``AttackCallback(keep_adversarials=True)``) can ask whether
they transfer: from Base to CR and back, to any registry model, or to another resolution. The
evaluated target is scored exactly as in the run (the frozen target's ``rows``), and the rows go
into the same result store under the attack name ``"<attack> @<source>-><evaluated>"`` (plus
``" @<r0>->(R)px"`` with ``--resolution``), with ``params["transfer"]`` naming source model,
attack and resolution. Norms and iterations are the source rows' (the perturbation is the
source's, measured in its space). Clean rows of the evaluated target are written where the
store has none (a new model, a new resolution), so its tables have their baseline.

How a stored image reaches the evaluated target:

- model-input space (the paper's): the stored image is the source's model input. With a new
  resolution R it is degraded like a photograph (shortest side down to R, back up to its size,
  PIL's bilinear filter in torch); then resized straight to the evaluated model's input when
  that differs.
- low-resolution space: the stored image is the capture at the source's resolution r0. With a
  new resolution R it is re-captured (resized to the R capture's size of the original image);
  then it goes through the evaluated model's own upsampling (``upsample_to_model_input``:
  back to the original size, the model's resize and crop), as ``LowResolutionInput`` does.

Success is the source attack's objective on the evaluated target: untargeted, a top-1 other
than the evaluated target's attack label (its class of the identity, or its clean top-1 for an
identity it has no class for); targeted, the target's class; impersonation / dodging, the
evaluated gallery's k-NN (the attack's own k and metric). The clean reference (clean top-1,
attack label, clean score against the target) is the evaluated target's on the clean image at
the evaluated resolution. Transfer from a target to itself reproduces the run's rows, up to
the storage error of the images (``adversarial_store``: uint8 exact, float16 ~1e-5).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from crossres.adversarial_store import AdversarialImageStore
from crossres.attacks.objectives import Dodging, Impersonation
from crossres.callbacks.attack import template_scores
from crossres.datamodules.base import MultiResolutionDataModule
from crossres.datamodules.resolution import check_resolutions
from crossres.errors import CrossresError
from crossres.lightning_modules.frozen_target import ClassifierTarget
from crossres.models.resampling import degraded_size, resize_bilinear, upsample_to_model_input
from crossres.store import CLEAN, ResultRow, ResultStore, params_json
from crossres.types import FaceBatch

TRANSFER = "transfer"


@dataclass
class Clean:
    """The evaluated target's view of one clean query at the evaluated resolution."""

    features: torch.Tensor  # [D]
    top1: int
    attack_label: int


def transfer_name(attack: str, source: str, evaluated: str, r0: int, r: int | None) -> str:
    name = f"{attack} @{source}->{evaluated}"
    return name if r is None else f"{name} @{r0}->{r}px"


def to_model_input(
    images: torch.Tensor,
    *,
    space: str,
    r0: int,
    r: int,
    original_size: tuple[int, int],
    target: ClassifierTarget,
) -> torch.Tensor:
    """Stored adversarials of one (space, r0, original size) -> the evaluated model's input at
    resolution ``r`` (see the module docstring)."""
    cfg = target.model.pretrained_cfg
    size = tuple(cfg.input_size[1:])
    if space == "low_resolution":
        if r != r0:
            images = resize_bilinear(images, degraded_size(*original_size, r))
        return upsample_to_model_input(
            images, original_size, input_size=size, resize_shortest=cfg.resize_shortest
        )
    if space != "model_input":
        raise CrossresError(f"stored adversarials of unknown space {space!r}")
    if r != r0:
        h, w = images.shape[-2:]
        images = resize_bilinear(resize_bilinear(images, degraded_size(h, w, r)), (h, w))
    return resize_bilinear(images, size)


def achieved(
    params: dict,
    target: ClassifierTarget,
    features: torch.Tensor,
    logits: torch.Tensor,
    identities: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor | None,
) -> torch.Tensor:
    """The source attack's objective, met on the evaluated target (bool [n])."""
    objective = params.get("objective", "untargeted")
    k, metric = int(params.get("k") or 1), params.get("metric") or "euclidean"
    if objective == "untargeted":
        return logits.argmax(1) != labels.to(logits.device)
    if objective == "targeted":
        index = target.class_index(targets.to(logits.device))
        return (logits.argmax(1) == index) & (index >= 0)
    if objective == "impersonation":
        return Impersonation(target.gallery, targets, k=k, metric=metric).achieved(features)
    if objective == "dodging":
        return Dodging(target.gallery, identities, k=k, metric=metric).achieved(features)
    raise CrossresError(f"stored rows have an unknown objective {objective!r}")


def clean_pass(
    dm: MultiResolutionDataModule,
    target: ClassifierTarget,
    resolutions: list[int],
    store_done: set,
    writer,
) -> dict[tuple[int, int], Clean]:
    """The evaluated target on every clean query at ``resolutions``; its clean rows are
    written where the store has none."""
    saved = dm.resolutions
    dm.resolutions = check_resolutions(resolutions)
    out: dict[tuple[int, int], Clean] = {}
    device = target.class_ids.device
    try:
        for batch in dm.test_dataloader():
            batch = batch.to(device)
            with torch.no_grad():
                features, logits = target.model.features_and_logits(batch.images)
            top1 = target.predict(logits)
            labels = target.attack_labels(batch.identity, top1)
            keys = list(zip(batch.sample_id.tolist(), batch.resolution.tolist(), strict=True))
            for i, key in enumerate(keys):
                out[key] = Clean(features[i], int(top1[i]), int(labels[i]))
            todo = [
                i for i, (s, r) in enumerate(keys) if (target.label, CLEAN, s, r) not in store_done
            ]
            if todo:
                idx = torch.tensor(todo, dtype=torch.long)
                writer.write(
                    target.rows(
                        batch.select(idx), CLEAN, features[idx.to(device)], top1[idx.to(device)]
                    )
                )
    finally:
        dm.resolutions = saved
    return out


def transfer(
    run_dir: str | Path,
    dm: MultiResolutionDataModule,
    target: ClassifierTarget,
    *,
    resolution: int | None = None,
    sources: list[str] | None = None,
) -> int:
    """Evaluate the stored adversarials of ``run_dir`` (of the source targets ``sources``; None:
    all) on ``target`` (built on ``dm``'s gallery) at ``resolution`` (None: each one's own).
    Writes the rows into the run's store (resumable: stored keys are skipped); returns how many
    rows it wrote."""
    run_dir = Path(run_dir)
    store = ResultStore(run_dir)
    images = AdversarialImageStore(run_dir)
    stored = {k for k in images.done_keys()}
    if not stored:
        raise CrossresError(
            f"{run_dir} holds no stored adversarials (run the attacks with keep_adversarials: "
            "true, the default, to keep them)"
        )
    rows = store.rows()
    done = {r.key for r in rows}
    source_rows: dict[tuple[int, int], list[ResultRow]] = defaultdict(list)
    for r in rows:
        if r.attack == CLEAN or TRANSFER in json.loads(r.params) or r.key not in stored:
            continue
        if sources is not None and r.model not in sources:
            continue
        source_rows[(r.sample_id, r.resolution)].append(r)
    if not source_rows:
        raise CrossresError(f"no stored adversarials of sources {sources} in {run_dir}")
    resolutions = sorted({res for _, res in source_rows} if resolution is None else {resolution})
    writer = store.writer(0)
    written = 0
    try:
        clean = clean_pass(dm, target, resolutions, done, writer)
        dm.hand_out_low_resolution()
        device = target.class_ids.device
        for batch in dm.test_dataloader():
            groups: dict[tuple, list[tuple[int, ResultRow]]] = defaultdict(list)
            for i, (s, r0) in enumerate(
                zip(batch.sample_id.tolist(), batch.resolution.tolist(), strict=True)
            ):
                for src in source_rows.get((s, r0), []):
                    r = r0 if resolution is None else resolution
                    name = transfer_name(src.attack, src.model, target.label, r0, resolution)
                    if (target.label, name, s, r) in done:
                        continue
                    hw = tuple(int(v) for v in batch.original_size[i].tolist())
                    groups[(src.model, src.attack, src.space, r0, hw)].append((i, src))
            for (_, _, space, r0, hw), members in groups.items():
                written += evaluate_group(
                    images,
                    target,
                    batch,
                    members,
                    clean,
                    space=space,
                    r0=r0,
                    original_size=hw,
                    resolution=resolution,
                    writer=writer,
                    device=device,
                )
    finally:
        writer.close()
    return written


def evaluate_group(
    images: AdversarialImageStore,
    target: ClassifierTarget,
    batch: FaceBatch,
    members: list[tuple[int, ResultRow]],
    clean: dict[tuple[int, int], Clean],
    *,
    space: str,
    r0: int,
    original_size: tuple[int, int],
    resolution: int | None,
    writer,
    device: torch.device,
) -> int:
    """Score one group of stored adversarials (one source model, attack, space, r0, size)."""
    r = r0 if resolution is None else resolution
    first = members[0][1]
    params = json.loads(first.params)
    x = images.load([src.key for _, src in members]).to(device)
    with torch.no_grad():
        model_input = to_model_input(
            x, space=space, r0=r0, r=r, original_size=original_size, target=target
        )
        features, logits = target.model.features_and_logits(model_input)
    index = torch.tensor([i for i, _ in members], dtype=torch.long)
    sub = batch.select(index)
    sub = FaceBatch(
        images=sub.images,
        identity=sub.identity.to(device),
        sample_id=sub.sample_id,
        resolution=torch.full_like(sub.resolution, r),
        paths=sub.paths,
    )
    refs = [clean[(int(s), r)] for s in sub.sample_id.tolist()]
    has_target = first.target is not None
    targets = torch.tensor([src.target for _, src in members]) if has_target else None
    labels = torch.tensor([c.attack_label for c in refs], device=device)
    success = achieved(params, target, features, logits, sub.identity, labels, targets)
    name = transfer_name(first.attack, first.model, target.label, r0, resolution)
    info = {"source_model": first.model, "source_attack": first.attack, "source_resolution": r0}
    srcs = [src for _, src in members]
    out = target.rows(
        sub,
        name,
        features,
        target.predict(logits),
        params=params_json({**params, TRANSFER: info}),
        success=success.cpu(),
        target=[s.target for s in srcs],
        l0=[s.l0 for s in srcs],
        l2=[s.l2 for s in srcs],
        linf=[s.linf for s in srcs],
        iterations=[s.iterations for s in srcs],
        clean_top1=[c.top1 for c in refs],
        seconds=0.0,
        space=space,
        target_score=template_scores(target, features, targets),
        clean_target_score=template_scores(
            target, torch.stack([c.features for c in refs]), targets
        ),
    )
    writer.write(out)
    return len(out)
