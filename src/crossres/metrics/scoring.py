"""Similarity of probes against a gallery: one matmul per batch, chunked for huge galleries.

``similarity`` gives the full [n_probe, n_gallery] matrix (1000 x 8631 is 35 MB in float32).
For a gallery too large for that matrix (1000 x 10^6 float32 scores would be 4 GB),
``topk_similarity`` and ``search`` walk the gallery ``chunk_size`` rows at a time, keeping
a running top-k and per-probe counters: the extra memory is O(n_probe * chunk_size) (about
60-250 MB for 1000 probes and 8192-row chunks, see benchmarks/metrics.py), whatever the
gallery size.

``search`` also returns the per-probe state every identification metric needs
(``ProbeSummary``: exact mate rank with ties against the probe, mate score, top score), so
CMC and FPIR/FNIR on a huge gallery are as exact as on the full matrix. Mates are found by
binary search in the sorted gallery ids (no [n_probe, n_gallery] id mask). The running list
keeps k + 1 candidates: a mate scoring strictly above the list's last value has all the
gallery entries scoring >= it in the list, so its rank is read off the list. Only when some
mate is not (rank > k, or a tie at the list's end) does a second pass, with the same chunk
matmuls, count the gallery entries scoring >= the mate; the same calls on the same shapes
give the same bits, so both passes agree on ties.

Scores from the chunked path equal the full matmul's up to float rounding (BLAS may sum a
dot product in another order for another matrix shape); among equal scores, which gallery
indices ``torch.topk`` returns is unspecified, values are not. Cosine normalises each chunk
of templates on the fly, so pre-normalised templates are not needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from crossres.metrics.functional import ProbeSummary, locate_mates

__all__ = ["SearchResult", "SimilarityName", "TopK", "search", "similarity", "topk_similarity"]

SimilarityName = Literal["cosine", "neg_euclidean"]
_METRICS = ("cosine", "neg_euclidean")


@dataclass
class TopK:
    """values [P, k] (descending) and the gallery rows they come from, indices [P, k]."""

    values: Tensor
    indices: Tensor


@dataclass
class SearchResult:
    """Top-k candidates of each probe and its ``ProbeSummary`` (exact over the whole gallery).

    candidate_ids [P, k] are the gallery ids at ``indices``.
    """

    values: Tensor
    indices: Tensor
    candidate_ids: Tensor
    summary: ProbeSummary


def _check(probes: Tensor, templates: Tensor, metric: str) -> None:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if probes.ndim != 2 or templates.ndim != 2 or probes.shape[1] != templates.shape[1]:
        raise ValueError(
            f"probes [P, D] and templates [G, D] must share D, got {tuple(probes.shape)} and "
            f"{tuple(templates.shape)}"
        )
    if not probes.is_floating_point():
        raise ValueError(f"probes must be floating point, got {probes.dtype}")


def _prepare(probes: Tensor, metric: str) -> Tensor:
    return F.normalize(probes, dim=1) if metric == "cosine" else probes


def _scores(p: Tensor, templates: Tensor, metric: str, p_sq: Tensor | None) -> Tensor:
    """Scores of prepared probes ``p`` against raw ``templates``: one matmul."""
    t = templates.to(device=p.device, dtype=p.dtype)
    if metric == "cosine":
        return p @ F.normalize(t, dim=1).T
    # -||p - t|| = -sqrt(|p|^2 + |t|^2 - 2 p.t), the matmul form cdist uses for large inputs
    assert p_sq is not None
    d2 = torch.addmm(p_sq[:, None] + t.pow(2).sum(1)[None, :], p, t.T, alpha=-2.0)
    return -d2.clamp_(min=0).sqrt_()


def similarity(probes: Tensor, templates: Tensor, *, metric: SimilarityName = "cosine") -> Tensor:
    """[P, G] similarity, higher = more alike: cosine (default) or negative Euclidean."""
    _check(probes, templates, metric)
    p = _prepare(probes, metric)
    p_sq = p.pow(2).sum(1) if metric == "neg_euclidean" else None
    return _scores(p, templates, metric, p_sq)


def _chunks(n: int, chunk_size: int) -> range:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return range(0, n, chunk_size)


def _merge(values: Tensor, indices: Tensor, v: Tensor, i: Tensor, k: int) -> tuple[Tensor, Tensor]:
    v = torch.cat([values, v], 1)
    i = torch.cat([indices, i], 1)
    best, pos = v.topk(min(k, v.shape[1]), dim=1)
    return best, i.gather(1, pos)


def topk_similarity(
    probes: Tensor,
    templates: Tensor,
    k: int,
    *,
    metric: SimilarityName = "cosine",
    chunk_size: int = 8192,
) -> TopK:
    """The ``k`` best gallery rows of each probe, walking the gallery ``chunk_size`` rows at
    a time (memory O(P * (chunk_size + k)), not O(P * G))."""
    _check(probes, templates, metric)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    p = _prepare(probes, metric)
    p_sq = p.pow(2).sum(1) if metric == "neg_euclidean" else None
    values = p.new_empty(p.shape[0], 0)
    indices = torch.empty(p.shape[0], 0, dtype=torch.long, device=p.device)
    for start in _chunks(templates.shape[0], chunk_size):
        s = _scores(p, templates[start : start + chunk_size], metric, p_sq)
        v, i = s.topk(min(k, s.shape[1]), dim=1)
        values, indices = _merge(values, indices, v, i + start, k)
    return TopK(values, indices)


def search(
    probes: Tensor,
    templates: Tensor,
    gallery_ids: Tensor,
    probe_ids: Tensor,
    *,
    k: int = 1,
    metric: SimilarityName = "cosine",
    chunk_size: int = 8192,
) -> SearchResult:
    """Chunked identification search: top-k candidates and the exact ``ProbeSummary``.

    A probe whose id is not in ``gallery_ids`` is a non-mated search (rank 0); more than one
    mate per probe is an error, as in ``functional.summarize_probes``.
    """
    _check(probes, templates, metric)
    n_probe, n_gallery = probes.shape[0], templates.shape[0]
    if n_gallery == 0:
        raise ValueError("templates is empty (0 gallery rows)")
    if gallery_ids.ndim != 1 or gallery_ids.shape[0] != n_gallery:
        raise ValueError(
            f"gallery_ids must be [{n_gallery}] (one per template), got {tuple(gallery_ids.shape)}"
        )
    if probe_ids.ndim != 1 or probe_ids.shape[0] != n_probe:
        raise ValueError(
            f"probe_ids must be [{n_probe}] (one per probe), got {tuple(probe_ids.shape)}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    device = probes.device
    p = _prepare(probes, metric)
    p_sq = p.pow(2).sum(1) if metric == "neg_euclidean" else None
    gid = gallery_ids.to(device)
    mated, mate_row = locate_mates(probe_ids.to(device), gid)
    mate_row = torch.where(mated, mate_row, torch.full_like(mate_row, -1))
    # one extra candidate so that a mate ranked k is known exactly without a second pass
    keep = k + 1
    values = p.new_empty(n_probe, 0)
    indices = torch.empty(n_probe, 0, dtype=torch.long, device=device)
    mate_score = p.new_full((n_probe,), -math.inf)
    starts = _chunks(n_gallery, chunk_size)
    # NaN found per chunk, checked once after the walk (no host synchronisation per chunk)
    nan_in_chunk = torch.zeros(len(starts), dtype=torch.bool, device=device)
    for c, start in enumerate(starts):
        s = _scores(p, templates[start : start + chunk_size], metric, p_sq)
        # the mate's column where it falls in this chunk, else anything (masked below)
        col = (mate_row - start).clamp(0, s.shape[1] - 1)
        here = (mate_row >= start) & (mate_row < start + s.shape[1])
        mate_score = torch.where(here, s.gather(1, col[:, None]).squeeze(1), mate_score)
        v, i = s.topk(min(keep, s.shape[1]), dim=1)
        nan_in_chunk[c] = torch.isnan(v[:, 0]).any()  # topk ranks NaN above everything
        values, indices = _merge(values, indices, v, i + start, keep)
    if nan_in_chunk.any():
        start = starts[int(torch.nonzero(nan_in_chunk)[0, 0])]
        end = min(start + chunk_size, n_gallery) - 1
        raise ValueError(
            f"NaN scores against gallery rows {start}..{end}; check the features for NaN or inf"
        )
    # rank is certain when every gallery score >= the mate is in the running list: the mate
    # scores above the list's last value, or the list holds the whole gallery
    complete = values.shape[1] == n_gallery
    resolved = mated & ((mate_score > values[:, -1]) | complete)
    ahead = (values >= mate_score[:, None]).sum(1) - 1  # minus the mate itself
    todo = torch.nonzero(mated & ~resolved).flatten()
    if todo.numel():
        ahead[todo] = -1  # the count below includes the mate itself
        for start in starts:
            # the same matmul on the same shapes as above, so the same bits: ties agree
            s = _scores(p, templates[start : start + chunk_size], metric, p_sq)
            ahead[todo] += (s[todo] >= mate_score[todo, None]).sum(1)
    mate_rank = torch.where(mated, 1 + ahead, torch.zeros_like(ahead))
    summary = ProbeSummary(
        mate_rank=mate_rank,
        mate_score=torch.where(mated, mate_score, torch.full_like(mate_score, math.nan)),
        top_score=values[:, 0],
    )
    top_v, top_i = values[:, :k], indices[:, :k]
    return SearchResult(top_v, top_i, gid[top_i], summary)
