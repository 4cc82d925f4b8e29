"""torchmetrics ``Metric`` classes: per-sample states, exact under DDP, functional compute.

Every class keeps one small record per search (never the [n_probe, n_gallery] scores) in
list states reduced with ``dist_reduce_fx="cat"``, together with the sample id. In
``compute`` the records are gathered from every process, sorted by sample id, and the
duplicates that ``DistributedSampler`` adds to even out the shards are dropped (the first
record of a sample id is kept), so the result is exactly the single-process one. The
numbers themselves come from ``crossres.metrics.functional``.

Identification records (``ProbeSummary``): mate rank, mate score and the top score over the
gallery. These are sufficient for CMC at every rank and for FPIR/FNIR at every threshold
and candidate-list length R: a non-mated search has a candidate in the top R scoring >= T
iff its top-1 score is >= T, and a mated search is a miss iff its mate ranks beyond R or
scores < T. ``update`` accepts the score matrix of a batch, a ``ProbeSummary`` or a
``scoring.SearchResult`` (chunked search of a huge gallery).

Verification records: one per comparison pair, keyed by (sample id of the probe, column of
the pair in the probe's row), so a probe repeated by the sampler repeats its keys and all of
its pairs are dropped together.

Caveat: a process that never calls ``update`` contributes an empty float state (torchmetrics'
convention), which cannot be gathered with the int64 states of the others; every process
should see at least one batch, as with DistributedSampler.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from crossres.metrics import functional as MF
from crossres.metrics import verification as MV
from crossres.metrics.functional import DetCurve, ProbeSummary
from crossres.metrics.scoring import SearchResult
from crossres.metrics.verification import Roc

__all__ = [
    "CMC",
    "DETCurve",
    "AttackSuccessRate",
    "FPIRAtFNIR",
    "HitRate",
    "TARAtFAR",
    "VerificationROC",
]


def _first_occurrence(sample_id: Tensor) -> Tensor:
    """Positions of the first record of each sample id, in increasing sample-id order."""
    order = torch.sort(sample_id, stable=True).indices
    sid = sample_id[order]
    first = torch.ones_like(sid, dtype=torch.bool)
    first[1:] = sid[1:] != sid[:-1]
    return order[first]


def _check_sample_id(sample_id: Any, n: int) -> Tensor:
    if not isinstance(sample_id, Tensor) or sample_id.ndim != 1 or sample_id.shape[0] != n:
        shape = tuple(sample_id.shape) if isinstance(sample_id, Tensor) else type(sample_id)
        raise ValueError(f"sample_id must be a 1-D tensor of {n} ids (one per sample), got {shape}")
    if sample_id.is_floating_point():
        raise ValueError(f"sample_id must be integer, got {sample_id.dtype}")
    return sample_id.long()


class AttackSuccessRate(Metric):
    """Share of successful attacks among correctly classified clean samples.

    ``update(clean_pred, adv_pred, labels, sample_id, targets=None)`` with class indices [B]
    or logits [B, C]; ``targeted=True`` requires ``targets`` (success = the adversarial
    prediction is the target). NaN when no sample is correctly classified.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, *, targeted: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.targeted = targeted
        for name in ("sample_id", "clean_pred", "adv_pred", "labels", "targets"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        clean_pred: Tensor,
        adv_pred: Tensor,
        labels: Tensor,
        sample_id: Tensor,
        targets: Tensor | None = None,
    ) -> None:
        clean = MF._as_pred(clean_pred, "clean_pred").long()
        adv = MF._as_pred(adv_pred, "adv_pred").long()
        n = clean.shape[0]
        if adv.shape != clean.shape or labels.shape != clean.shape:
            raise ValueError(
                f"clean_pred, adv_pred and labels must give one class per sample, got "
                f"{tuple(clean.shape)}, {tuple(adv.shape)}, {tuple(labels.shape)}"
            )
        if self.targeted and targets is None:
            raise ValueError("AttackSuccessRate(targeted=True).update needs targets")
        if not self.targeted and targets is not None:
            raise ValueError("targets given to an untargeted AttackSuccessRate; use targeted=True")
        self.sample_id.append(_check_sample_id(sample_id, n))
        self.clean_pred.append(clean)
        self.adv_pred.append(adv)
        self.labels.append(labels.long())
        self.targets.append(labels.long() if targets is None else targets.long())

    def compute(self) -> Tensor:
        keep = _first_occurrence(dim_zero_cat(self.sample_id))
        return MF.attack_success_rate(
            dim_zero_cat(self.clean_pred)[keep],
            dim_zero_cat(self.adv_pred)[keep],
            dim_zero_cat(self.labels)[keep],
            targets=dim_zero_cat(self.targets)[keep] if self.targeted else None,
        )


class _Identification(Metric):
    """Keeps one ``ProbeSummary`` record per search, keyed by sample id."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("sample_id", "mate_rank", "mate_score", "top_score"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        scores: Tensor | ProbeSummary | SearchResult,
        probe_ids: Tensor | None = None,
        gallery_ids: Tensor | None = None,
        sample_id: Tensor | None = None,
    ) -> None:
        """``scores`` [B, n_gallery] with ``probe_ids`` [B] and ``gallery_ids`` [n_gallery],
        or a ``ProbeSummary`` / ``SearchResult`` of the batch (then no ids); always
        ``sample_id`` [B]."""
        if isinstance(scores, SearchResult):
            scores = scores.summary
        if isinstance(scores, ProbeSummary):
            if probe_ids is not None or gallery_ids is not None:
                raise ValueError("give probe_ids/gallery_ids only with a score matrix")
            summary = scores
        else:
            if probe_ids is None or gallery_ids is None:
                raise ValueError("a score matrix needs probe_ids and gallery_ids")
            summary = MF.summarize_probes(scores, probe_ids, gallery_ids)
        if sample_id is None:
            raise ValueError(
                "sample_id is required: it is how duplicates from DistributedSampler padding "
                "are dropped"
            )
        n = summary.mate_rank.shape[0]
        self.sample_id.append(_check_sample_id(sample_id, n))
        self.mate_rank.append(summary.mate_rank.long())
        self.mate_score.append(summary.mate_score)
        self.top_score.append(summary.top_score)

    def _records(self) -> ProbeSummary:
        if isinstance(self.sample_id, list) and not self.sample_id:
            raise ValueError(f"{type(self).__name__}.compute called before any update")
        keep = _first_occurrence(dim_zero_cat(self.sample_id))
        return ProbeSummary(
            dim_zero_cat(self.mate_rank)[keep],
            dim_zero_cat(self.mate_score)[keep],
            dim_zero_cat(self.top_score)[keep],
        )

    def _open_set(self) -> tuple[Tensor, Tensor, Tensor]:
        s = self._records()
        m = s.mated
        return s.mate_rank[m], s.mate_score[m], s.top_score[~m]


class CMC(_Identification):
    """Close-set CMC: hit rate at ranks 1..max_rank [max_rank] (every probe must be mated)."""

    higher_is_better = True

    def __init__(self, max_rank: int = 20, **kwargs: Any) -> None:
        MF._check_rank(max_rank, "max_rank")
        super().__init__(**kwargs)
        self.max_rank = max_rank

    def compute(self) -> Tensor:
        return MF.cmc_from_ranks(self._records().mate_rank, self.max_rank)


class HitRate(CMC):
    """CMC at one rank (rank 1: the paper's hit rate), a 0-d tensor for ``self.log``."""

    def __init__(self, rank: int = 1, **kwargs: Any) -> None:
        super().__init__(max_rank=rank, **kwargs)

    def compute(self) -> Tensor:
        return super().compute()[-1]


class FPIRAtFNIR(_Identification):
    """Open set: the smallest FPIR with FNIR <= ``target_fnir`` at candidate-list length
    ``rank``. Batches may mix mated searches (probe id in the gallery) and non-mated ones."""

    higher_is_better = False

    def __init__(self, target_fnir: float = 0.01, rank: int = 1, **kwargs: Any) -> None:
        MF._check_target(target_fnir)
        MF._check_rank(rank)
        super().__init__(**kwargs)
        self.target_fnir = float(target_fnir)
        self.rank = rank

    def compute(self) -> Tensor:
        return MF.fpir_at_fnir_from_summary(
            *self._open_set(), target_fnir=self.target_fnir, rank=self.rank
        )


class DETCurve(_Identification):
    """Open set: the DET curve (FPIR, FNIR, thresholds) at candidate-list length ``rank``."""

    def __init__(self, rank: int = 1, **kwargs: Any) -> None:
        MF._check_rank(rank)
        super().__init__(**kwargs)
        self.rank = rank

    def compute(self) -> DetCurve:
        return MF.det_curve_from_summary(*self._open_set(), rank=self.rank)


def _first_pairs(sample_id: Tensor, column: Tensor) -> Tensor:
    """Positions of the first record of each (sample id, column) key."""
    by_col = torch.sort(column, stable=True).indices
    order = by_col[torch.sort(sample_id[by_col], stable=True).indices]  # by (id, column)
    sid, col = sample_id[order], column[order]
    first = torch.ones_like(sid, dtype=torch.bool)
    first[1:] = (sid[1:] != sid[:-1]) | (col[1:] != col[:-1])
    return order[first]


class _Verification(Metric):
    """Keeps every genuine and impostor comparison score, keyed by (sample id, column)."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for kind in ("genuine", "impostor"):
            for name in ("sample_id", "column", "score"):
                self.add_state(f"{kind}_{name}", default=[], dist_reduce_fx="cat")

    def update(self, genuine: Tensor | None, impostor: Tensor | None, sample_id: Tensor) -> None:
        """``genuine`` and ``impostor``: scores [B] (one pair per probe) or [B, K] (K pairs per
        probe, K may differ between the two and may be 0), or None (no such pair in this
        batch); ``sample_id`` [B]: the probe of each row."""
        if genuine is None and impostor is None:
            raise ValueError("give genuine or impostor scores (or both)")
        n = (genuine if genuine is not None else impostor).shape[0]
        sid = _check_sample_id(sample_id, n)
        for kind, scores in (("genuine", genuine), ("impostor", impostor)):
            if scores is None:
                ref = genuine if genuine is not None else impostor
                scores = ref.new_empty((n, 0))
            if not isinstance(scores, Tensor) or scores.ndim not in (1, 2) or scores.shape[0] != n:
                shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores)
                raise ValueError(
                    f"{kind} must be [B] or [B, K] scores with B = {n} (one row per sample_id), "
                    f"got {shape}"
                )
            if not scores.is_floating_point():
                raise ValueError(
                    f"{kind} must be floating point (similarities), got {scores.dtype}"
                )
            rows = scores.reshape(n, -1)
            k = rows.shape[1]
            getattr(self, f"{kind}_sample_id").append(sid.repeat_interleave(k))
            getattr(self, f"{kind}_column").append(torch.arange(k, device=sid.device).repeat(n))
            getattr(self, f"{kind}_score").append(rows.reshape(-1))

    def _scores(self, kind: str) -> Tensor:
        sid = getattr(self, f"{kind}_sample_id")
        if isinstance(sid, list) and not sid:
            raise ValueError(f"{type(self).__name__}.compute called before any update")
        sid = dim_zero_cat(sid)
        keep = _first_pairs(sid, dim_zero_cat(getattr(self, f"{kind}_column")))
        return dim_zero_cat(getattr(self, f"{kind}_score"))[keep]


class VerificationROC(_Verification):
    """Verification ROC (FAR, TAR, thresholds) over every accumulated pair, as
    ``verification.verification_roc``."""

    def compute(self) -> Roc:
        return MV.verification_roc(self._scores("genuine"), self._scores("impostor"))


class TARAtFAR(_Verification):
    """TAR at the smallest threshold with FAR <= ``far`` (0-d float64), as
    ``verification.tar_at_far``."""

    higher_is_better = True

    def __init__(self, far: float = 1e-3, **kwargs: Any) -> None:
        MV._check_far(far)
        super().__init__(**kwargs)
        self.far = float(far)

    def compute(self) -> Tensor:
        return MV.tar_at_far(self._scores("genuine"), self._scores("impostor"), self.far)
