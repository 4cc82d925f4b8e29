"""Identification metrics as definitions: the functional twins of ``crossres.metrics``.

Everything takes and returns torch tensors. Scores are similarities: higher = more alike.
Rates are float64 (exact counts / n up to rounding); counts are int64.

Definitions (NIST IR 8271, Grother, Ngan, Hanaoka 2019, "FRVT Part 2: Identification"):

- Rank of a mated search: ``1 + #(non-mate templates scoring >= the mate)``. Ties count
  against the probe: a non-mate scoring exactly the mate's score is ranked above it.
- CMC(r): share of mated searches with rank <= r (close set: every probe has one mate).
  The hit rate of the paper's Table 2 is CMC(1).
- Open set, for a threshold T and a candidate list of length R (``rank``):
  FPIR(T) = share of non-mated searches with a candidate in the top R scoring >= T;
  FNIR(T) = share of mated searches whose mate is outside the top R or scores < T.
- FPIR@FNIR(target): the smallest FPIR(T) over the thresholds with FNIR(T) <= target;
  candidate thresholds are every score and +inf; 1.0 when no threshold reaches the target
  (which happens exactly when more than ``target`` of the mates rank outside the top R).

Sufficient per-probe state (what ``ProbeSummary`` holds, and all the metric classes keep):
a candidate in the top R scores >= T if and only if the top-1 score does (the top-1
candidate is in every top R and scores the most), so FPIR at any R needs only each
non-mated search's top score; FNIR at any R needs each mated search's (mate rank, mate
score). FPIR(T) and FNIR(T) are step functions that change only at those values, so
evaluating the thresholds among them (plus +inf) gives exactly the same set of
(FPIR, FNIR) pairs, and the same FPIR@FNIR, as evaluating every score in the matrices:
any other threshold T gives the pair of the smallest of these values >= T.

How other code defines the same quantities (checked in their sources):

- The paper's own evaluation (Massoli et al., cross-resolution-face-recognition): cosine
  of L2-normalised features; FPIR counts top-1 scores ``> thr`` (strict); FNIR counts
  mates outside the top 20 or ``< thr``; thresholds ``logspace(-4, 0, 4000)``. So it
  uses a fixed R = 20 for FNIR and the top 1 for FPIR, never tries a threshold below
  1e-4 (cosine can be negative) nor above 1, reads FPIR@FNIR off a grid (off by up to
  one grid step from the value over every score), and a tie at the threshold goes the
  other way for FPIR. Numbers computed here can therefore differ slightly from Table 3.
- bob.measure (``bob/measure/__init__.py``): ``cmc`` and ``recognition_rate`` rank a
  probe by ``sum(negatives >= max(positives))``, so ties count against the probe as
  here, and several positives are reduced to the best one (here: exactly one mate is
  required). ``detection_identification_rate`` counts ``max_pos >= threshold`` with
  ``sum(negatives >= max_pos) < rank`` (rank <= R here) and ``false_alarm_rate`` counts
  ``max(negatives) >= threshold`` (the top-1 rule, same ``>=`` as here); but ``recognition_rate(threshold=...)`` drops scores ``<= threshold``
  (strict ``>``), and it removes correctly rejected open-set probes from the
  denominator, which is not a NIST rate.
- pyeer (``pyeer/eer_stats.py``, verification): ``calculate_roc`` evaluates only the
  distinct observed scores as thresholds (no +inf: the FMR = 0 end of the curve can be
  missing), with a false match for ``score >= t`` and a false non-match for ``score < t``
  (same inequalities as here). Its FNMR operating points (``get_fnmr_op``) return the FMR
  at the threshold whose FNMR is *nearest* to the target, which can have FNMR above the
  target; here the FNIR constraint is never violated. Its CMC (``pyeer/cmc_stats.py``)
  sorts candidates with Python's stable sort, so ties are broken by file order, not
  against the probe.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DetCurve",
    "OperatingPoint",
    "ProbeSummary",
    "attack_success_rate",
    "cmc",
    "cmc_from_ranks",
    "det_curve",
    "det_curve_from_summary",
    "fnir_fpir_at_threshold",
    "fnir_fpir_at_threshold_from_summary",
    "fpir_at_fnir",
    "fpir_at_fnir_from_summary",
    "locate_mates",
    "mate_rank_and_score",
    "operating_point",
    "summarize_probes",
]


class ProbeSummary(NamedTuple):
    """What one search contributes to every identification metric.

    mate_rank: int64 [P]; 1 + #(non-mates scoring >= the mate); 0 = no mate in the gallery
        (a non-mated search).
    mate_score: [P]; the mate's score, NaN for non-mated searches.
    top_score: [P]; the best score over the whole gallery.
    """

    mate_rank: Tensor
    mate_score: Tensor
    top_score: Tensor

    @property
    def mated(self) -> Tensor:
        return self.mate_rank > 0


class DetCurve(NamedTuple):
    """FPIR and FNIR at ascending thresholds (the last one is +inf: FPIR 0, FNIR 1)."""

    fpir: Tensor
    fnir: Tensor
    thresholds: Tensor


class OperatingPoint(NamedTuple):
    """Where a DET curve meets an FNIR target.

    fpir: the smallest FPIR with FNIR <= target (1.0 when unreachable); fnir: the FNIR
    there (NaN when unreachable); threshold: the largest candidate threshold giving that
    point (NaN when unreachable); reached: whether any threshold meets the target.
    """

    fpir: Tensor
    fnir: Tensor
    threshold: Tensor
    reached: bool


# ---------------------------------------------------------------------------- validation


def _check_scores(scores: Tensor, name: str) -> None:
    if not isinstance(scores, Tensor) or scores.ndim != 2:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"{name} must be a [n_probe, n_gallery] tensor, got {shape}")
    if not scores.is_floating_point():
        raise ValueError(f"{name} must be floating point (similarities), got {scores.dtype}")


def _row_max(scores: Tensor, name: str) -> Tensor:
    """Best score of each row; NaN propagates through amax, so this also checks for NaN
    without a second pass or a [P, G] temporary."""
    if scores.shape[0] == 0:
        return scores.new_empty(0)
    top = scores.amax(1)
    bad = torch.isnan(top)
    if bad.any():
        raise ValueError(
            f"{name} contains NaN in {int(bad.sum())} rows (first: row "
            f"{int(torch.nonzero(bad)[0, 0])}); check the features for NaN or inf"
        )
    return top


def _check_ids(ids: Tensor, n: int, name: str, what: str) -> None:
    if not isinstance(ids, Tensor) or ids.ndim != 1 or ids.shape[0] != n:
        shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be a 1-D tensor of {n} ids ({what}), got {shape}")


def _check_rank(rank: int, name: str = "rank") -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{name} must be an int >= 1, got {rank!r}")


def _check_target(target_fnir: float) -> None:
    if not (0.0 <= float(target_fnir) <= 1.0):
        raise ValueError(f"target_fnir must be in [0, 1], got {target_fnir!r}")


_COUNT_BLOCK = 1 << 22  # scores per temporary when counting ranks on a full matrix


def _rate(count: Tensor, n: int) -> Tensor:
    return count.to(torch.float64) / n


# ------------------------------------------------------------------ attack success rate


def _as_pred(x: Tensor, name: str) -> Tensor:
    """Class indices [N], from indices [N] or logits [N, C]."""
    if x.ndim == 2:
        return x.argmax(1)
    if x.ndim != 1:
        raise ValueError(f"{name} must be class indices [N] or logits [N, C], got {tuple(x.shape)}")
    return x


def attack_success_rate(
    clean_pred: Tensor,
    adv_pred: Tensor,
    labels: Tensor,
    *,
    targets: Tensor | None = None,
) -> Tensor:
    """Share of successful attacks among the samples the model classifies correctly when clean.

    Untargeted (``targets=None``): success = the adversarial prediction differs from the
    label. Targeted: success = the adversarial prediction equals ``targets``. The paper
    attacks only correctly classified images, so misclassified clean samples are left out
    of both numerator and denominator. Predictions may be class indices [N] or logits
    [N, C]. Returns a 0-d float64 tensor; NaN when no sample is correctly classified (the
    rate is undefined there).
    """
    clean = _as_pred(clean_pred, "clean_pred")
    adv = _as_pred(adv_pred, "adv_pred")
    n = clean.shape[0]
    _check_ids(adv, n, "adv_pred", "one prediction per sample")
    _check_ids(labels, n, "labels", "one label per sample")
    correct = clean == labels
    if targets is None:
        success = adv != labels
    else:
        _check_ids(targets, n, "targets", "one target class per sample")
        same = (targets == labels) & correct
        if same.any():
            raise ValueError(
                f"targets equal labels for {int(same.sum())} correctly classified samples "
                "(a targeted attack must aim at another class); drop them or pick new targets"
            )
        success = adv == targets
    n_correct = int(correct.sum())
    if n_correct == 0:
        return torch.tensor(math.nan, dtype=torch.float64, device=labels.device)
    return _rate((success & correct).sum(), n_correct)


# ------------------------------------------------------------------------ close set: CMC


def locate_mates(probe_ids: Tensor, gallery_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(mated [P] bool, mate column [P] int64; 0 where unmated) by binary search in the
    sorted gallery ids, O((P + G) log G) with no [P, G] mask. More than one mate is an error."""
    sorted_ids, order = gallery_ids.sort()
    pid = probe_ids.to(dtype=sorted_ids.dtype)
    lo = torch.searchsorted(sorted_ids, pid, side="left")
    n_mates = torch.searchsorted(sorted_ids, pid, side="right") - lo
    if (n_mates > 1).any():
        bad = int(torch.nonzero(n_mates > 1)[0, 0])
        raise ValueError(
            f"probe {bad} (id {int(probe_ids[bad])}) has {int(n_mates[bad])} mates in "
            "gallery_ids; the identification metrics need one template per identity "
            "(average the templates of an identity first)"
        )
    mated = n_mates == 1
    col = order[lo.clamp(max=gallery_ids.shape[0] - 1)]
    return mated, torch.where(mated, col, torch.zeros_like(col))


def summarize_probes(scores: Tensor, probe_ids: Tensor, gallery_ids: Tensor) -> ProbeSummary:
    """Mate rank, mate score and top score of every search in ``scores`` [n_probe, n_gallery].

    A probe whose id is not among ``gallery_ids`` is a non-mated search (rank 0, score NaN);
    a probe with more than one mate is an error (one template per identity).
    """
    _check_scores(scores, "scores")
    n_probe, n_gallery = scores.shape
    if n_gallery == 0:
        raise ValueError("scores has no gallery columns (n_gallery = 0)")
    _check_ids(probe_ids, n_probe, "probe_ids", "one id per row of scores")
    _check_ids(gallery_ids, n_gallery, "gallery_ids", "one id per column of scores")
    mated, mate_col = locate_mates(probe_ids.to(scores.device), gallery_ids.to(scores.device))
    top = _row_max(scores, "scores")
    mate_score = scores.gather(1, mate_col[:, None]).squeeze(1)
    # no id mask: the mate scores >= itself, so it is subtracted once; counted in row
    # blocks because summing a bool matrix makes an int64 copy of it (8 bytes a score)
    ahead = torch.zeros(n_probe, dtype=torch.long, device=scores.device)
    rows = max(1, _COUNT_BLOCK // n_gallery)
    for i in range(0, n_probe, rows):
        ahead[i : i + rows] = (scores[i : i + rows] >= mate_score[i : i + rows, None]).sum(1) - 1
    mate_rank = torch.where(mated, 1 + ahead, torch.zeros_like(ahead))
    mate_score = torch.where(mated, mate_score, torch.full_like(mate_score, math.nan))
    return ProbeSummary(mate_rank, mate_score, top)


def mate_rank_and_score(
    scores: Tensor, probe_ids: Tensor, gallery_ids: Tensor
) -> tuple[Tensor, Tensor]:
    """(rank, score) of each probe's mate; every probe must have exactly one mate."""
    s = summarize_probes(scores, probe_ids, gallery_ids)
    _require_all_mated(s.mate_rank, "mate_rank_and_score")
    return s.mate_rank, s.mate_score


def _require_all_mated(mate_rank: Tensor, what: str) -> None:
    missing = mate_rank < 1
    if missing.any():
        raise ValueError(
            f"{what} is close-set: {int(missing.sum())} of {mate_rank.shape[0]} probes have no "
            "mate in the gallery (first at row "
            f"{int(torch.nonzero(missing)[0, 0])}); use the open-set FPIR/FNIR metrics for them"
        )


def cmc_from_ranks(mate_rank: Tensor, max_rank: int) -> Tensor:
    """Hit rate at ranks 1..max_rank [max_rank] from the mate ranks (all >= 1)."""
    _check_rank(max_rank, "max_rank")
    if mate_rank.ndim != 1 or mate_rank.shape[0] == 0:
        raise ValueError(f"mate_rank must be a non-empty 1-D tensor, got {tuple(mate_rank.shape)}")
    _require_all_mated(mate_rank, "cmc")
    counts = torch.bincount(mate_rank.clamp(max=max_rank + 1).long(), minlength=max_rank + 2)
    return _rate(counts[1 : max_rank + 1].cumsum(0), mate_rank.shape[0])


def cmc(scores: Tensor, probe_ids: Tensor, gallery_ids: Tensor, max_rank: int) -> Tensor:
    """Close-set CMC: hit rate at ranks 1..max_rank, ties counting against the probe.

    ``scores`` [n_probe, n_gallery] (higher = more similar), each probe with exactly one
    mate. Ranks beyond n_gallery are allowed (the curve is 1 there).
    """
    _check_rank(max_rank, "max_rank")
    rank, _ = mate_rank_and_score(scores, probe_ids, gallery_ids)
    return cmc_from_ranks(rank, max_rank)


# --------------------------------------------------------------------- open set: DET


def _open_set_summary(
    mated_scores: Tensor,
    mated_probe_ids: Tensor,
    nonmated_scores: Tensor,
    gallery_ids: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_scores(mated_scores, "mated_scores")
    _check_scores(nonmated_scores, "nonmated_scores")
    if nonmated_scores.shape[1] != gallery_ids.shape[0]:
        raise ValueError(
            f"nonmated_scores has {nonmated_scores.shape[1]} columns but gallery_ids has "
            f"{gallery_ids.shape[0]} ids"
        )
    rank, score = mate_rank_and_score(mated_scores, mated_probe_ids, gallery_ids)
    return rank, score, _row_max(nonmated_scores, "nonmated_scores")


def _check_summary(mate_rank: Tensor, mate_score: Tensor, nonmated_top: Tensor) -> None:
    if mate_rank.ndim != 1 or mate_score.shape != mate_rank.shape:
        raise ValueError(
            f"mate_rank {tuple(mate_rank.shape)} and mate_score {tuple(mate_score.shape)} "
            "must be 1-D of the same length"
        )
    if nonmated_top.ndim != 1:
        raise ValueError(f"nonmated_top must be 1-D, got {tuple(nonmated_top.shape)}")
    if mate_rank.shape[0] == 0 or nonmated_top.shape[0] == 0:
        raise ValueError(
            f"open-set rates need mated and non-mated searches, got {mate_rank.shape[0]} mated "
            f"and {nonmated_top.shape[0]} non-mated"
        )
    _require_all_mated(mate_rank, "FNIR")
    if torch.isnan(mate_score).any() or torch.isnan(nonmated_top).any():
        raise ValueError("mate_score / nonmated_top contain NaN")


def _effective_mate_scores(mate_rank: Tensor, mate_score: Tensor, rank: int) -> Tensor:
    """Mate score, or -inf when the mate is outside the top ``rank`` (a miss at every T)."""
    return torch.where(mate_rank <= rank, mate_score, torch.full_like(mate_score, -math.inf))


def det_curve_from_summary(
    mate_rank: Tensor, mate_score: Tensor, nonmated_top: Tensor, *, rank: int = 1
) -> DetCurve:
    """DET curve from per-search state: mated (rank, score) and non-mated top scores."""
    _check_rank(rank)
    _check_summary(mate_rank, mate_score, nonmated_top)
    dtype = torch.promote_types(mate_score.dtype, nonmated_top.dtype)
    eff = _effective_mate_scores(mate_rank, mate_score.to(dtype), rank).sort().values
    top = nonmated_top.to(dtype=dtype, device=eff.device).sort().values
    inf = torch.full((1,), math.inf, dtype=dtype, device=eff.device)
    thresholds = torch.unique(torch.cat([eff[torch.isfinite(eff)], top, inf]))  # sorted
    misses = torch.searchsorted(eff, thresholds, side="left")  # #(mate score < T)
    alarms = top.shape[0] - torch.searchsorted(top, thresholds, side="left")  # #(top >= T)
    return DetCurve(
        fpir=_rate(alarms, top.shape[0]), fnir=_rate(misses, eff.shape[0]), thresholds=thresholds
    )


def det_curve(
    mated_scores: Tensor,
    mated_probe_ids: Tensor,
    nonmated_scores: Tensor,
    gallery_ids: Tensor,
    *,
    rank: int = 1,
) -> DetCurve:
    """FPIR and FNIR at every candidate threshold (ascending, ending with +inf).

    mated_scores [n_mated, n_gallery] with one mate each (ids in ``mated_probe_ids``);
    nonmated_scores [n_nonmated, n_gallery] against the same gallery, with no mate.
    """
    return det_curve_from_summary(
        *_open_set_summary(mated_scores, mated_probe_ids, nonmated_scores, gallery_ids),
        rank=rank,
    )


def operating_point(curve: DetCurve, target_fnir: float = 0.01) -> OperatingPoint:
    """Smallest FPIR on ``curve`` among the thresholds with FNIR <= ``target_fnir``.

    FNIR never decreases and FPIR never increases with the threshold, so this is the
    point at the largest threshold meeting the target.
    """
    _check_target(target_fnir)
    ok = torch.nonzero(curve.fnir <= float(target_fnir)).flatten()
    if ok.numel() == 0:
        nan = torch.tensor(math.nan, dtype=torch.float64, device=curve.fpir.device)
        return OperatingPoint(torch.ones_like(nan), nan, nan.clone(), False)
    best = curve.fpir[ok].min()
    i = int(ok[curve.fpir[ok] == best][-1])  # the largest threshold giving the best FPIR
    return OperatingPoint(curve.fpir[i], curve.fnir[i], curve.thresholds[i], True)


def fpir_at_fnir_from_summary(
    mate_rank: Tensor,
    mate_score: Tensor,
    nonmated_top: Tensor,
    *,
    target_fnir: float = 0.01,
    rank: int = 1,
) -> Tensor:
    """FPIR@FNIR from per-search state (see the module docstring); 1.0 when unreachable."""
    curve = det_curve_from_summary(mate_rank, mate_score, nonmated_top, rank=rank)
    return operating_point(curve, target_fnir).fpir


def fpir_at_fnir(
    mated_scores: Tensor,
    mated_probe_ids: Tensor,
    nonmated_scores: Tensor,
    gallery_ids: Tensor,
    target_fnir: float = 0.01,
    rank: int = 1,
) -> Tensor:
    """Smallest FPIR over the thresholds with FNIR <= ``target_fnir`` (0-d float64).

    Candidate thresholds: every score and +inf; 1.0 when no threshold reaches the target.
    """
    return fpir_at_fnir_from_summary(
        *_open_set_summary(mated_scores, mated_probe_ids, nonmated_scores, gallery_ids),
        target_fnir=target_fnir,
        rank=rank,
    )


def fnir_fpir_at_threshold_from_summary(
    mate_rank: Tensor,
    mate_score: Tensor,
    nonmated_top: Tensor,
    threshold: float,
    *,
    rank: int = 1,
) -> tuple[Tensor, Tensor]:
    """(FNIR, FPIR) at one threshold from per-search state."""
    _check_rank(rank)
    _check_summary(mate_rank, mate_score, nonmated_top)
    eff = _effective_mate_scores(mate_rank, mate_score, rank)
    return (
        _rate((eff < threshold).sum(), eff.shape[0]),
        _rate((nonmated_top >= threshold).sum(), nonmated_top.shape[0]),
    )


def fnir_fpir_at_threshold(
    mated_scores: Tensor,
    mated_probe_ids: Tensor,
    nonmated_scores: Tensor,
    gallery_ids: Tensor,
    threshold: float,
    *,
    rank: int = 1,
) -> tuple[Tensor, Tensor]:
    """(FNIR, FPIR) at ``threshold``: mates outside the top ``rank`` or scoring < T; non-mated
    searches with a candidate in the top ``rank`` scoring >= T."""
    return fnir_fpir_at_threshold_from_summary(
        *_open_set_summary(mated_scores, mated_probe_ids, nonmated_scores, gallery_ids),
        threshold,
        rank=rank,
    )
