"""The gallery/query and open-set split of data that come as faces grouped by identity (the
embedded faces, a folder per person), in one place so every such datamodule splits alike.

- identities with ``min_images``+ faces: each identity's faces in a seeded order that depends
  on each face's key alone; the first ``round(n * query_fraction)`` (clamped to [1, n - 1]) are
  query faces (at most ``max_queries_per_identity`` of them used: the rest join neither split,
  so the gallery stays that of the uncapped split), the others gallery faces. Half of these
  identities (seeded) are left out of the open-set gallery (non-mated), as the paper does.
- identities with fewer faces ("singles"): ``n_single_queries`` of them (seeded) are non-mated
  queries (no template at all), the others gallery-only distractor templates (at most
  ``max_distractors``; the rest are unused). All their faces are used.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from crossres.datamodules.base import seeded_order, split_count
from crossres.errors import CrossresError


class SplitError(CrossresError, ValueError):
    """Too few identities with enough faces for a gallery and a query split."""


@dataclass(frozen=True)
class IdentitySplit:
    """The outcome: (identity, face key) pairs in a stable order, and identity names."""

    query: list[tuple[str, str]]
    gallery: list[tuple[str, str]]
    mated: list[str]  # split identities that keep their open-set template
    non_mated: list[str]  # split identities left out of the open-set gallery + single queries
    single_queries: list[str]
    distractors: list[str]
    unused_singles: list[str]  # singles beyond ``max_distractors``
    record: list[dict[str, str]]  # {"face", "identity", "split"} of every face used, sorted


def check_split_arguments(
    *,
    query_fraction: float,
    n_single_queries: int,
    max_queries_per_identity: int | None,
    max_distractors: int | None,
    min_images: int = 2,
) -> None:
    """The knobs of ``split_identities`` as a datamodule receives them: ``ValueError`` naming
    the first one out of range, at construction (before any photo is read)."""
    if not 0.0 < query_fraction < 1.0:
        raise ValueError(f"query_fraction must be in (0, 1), got {query_fraction}")
    if n_single_queries < 0:
        raise ValueError(f"n_single_queries must be >= 0, got {n_single_queries}")
    if max_queries_per_identity is not None and max_queries_per_identity < 1:
        raise ValueError(
            f"max_queries_per_identity must be >= 1 or None, got {max_queries_per_identity}"
        )
    if max_distractors is not None and max_distractors < 0:
        raise ValueError(f"max_distractors must be >= 0 or None, got {max_distractors}")
    if min_images < 2:
        raise ValueError(f"min_images must be >= 2 (gallery and query photos), got {min_images}")


def split_identities(
    groups: Mapping[str, Sequence[str]],
    *,
    seed: int,
    query_fraction: float = 0.5,
    max_queries_per_identity: int | None = None,
    n_single_queries: int = 0,
    max_distractors: int | None = None,
    min_images: int = 2,
    source: str = "the data",
    hint: str = "",
) -> IdentitySplit:
    """Split ``groups`` ({identity: unique face keys}) as the module docstring says.

    ``SplitError`` (naming ``source``, then ``hint``) when fewer than 2 identities have
    ``min_images`` faces; a warning when fewer singles than ``n_single_queries`` exist.
    """
    if min_images < 2:
        raise ValueError(f"min_images must be >= 2 (a gallery and a query face), got {min_images}")
    names = sorted(groups)
    multi = [n for n in names if len(groups[n]) >= min_images]
    singles = [n for n in names if 0 < len(groups[n]) < min_images]
    if len(multi) < 2:
        raise SplitError(
            f"{source} hold {len(multi)} identities with {min_images}+ faces; at least 2 are "
            f"needed for gallery and query splits{hint}"
        )
    query: list[tuple[str, str]] = []
    gallery: list[tuple[str, str]] = []
    record: list[dict[str, str]] = []
    for name in multi:
        faces = list(groups[name])
        order = [faces[i] for i in seeded_order(faces, seed, "split")]
        k = split_count(len(faces), query_fraction)
        used = order[: min(k, max_queries_per_identity or k)]
        query += [(name, f) for f in used]
        gallery += [(name, f) for f in order[k:]]
        record += [{"face": f, "identity": name, "split": "query"} for f in used]
        record += [{"face": f, "identity": name, "split": "gallery"} for f in order[k:]]
    opened = [multi[i] for i in seeded_order(multi, seed, "open-set")]
    non_mated, mated = opened[: len(multi) // 2], opened[len(multi) // 2 :]
    single_order = [singles[i] for i in seeded_order(singles, seed, "singles")]
    n_sq = min(n_single_queries, len(single_order))
    if n_sq < n_single_queries:
        warnings.warn(
            f"only {len(single_order)} single-face people (fewer than {min_images} faces) are "
            f"available; using {n_sq} as non-mated queries (asked for {n_single_queries}) and "
            "none as distractors",
            stacklevel=3,
        )
    single_queries = single_order[:n_sq]
    distractors = single_order[n_sq:]
    if max_distractors is not None:
        distractors, unused = distractors[:max_distractors], distractors[max_distractors:]
    else:
        unused = []
    for names_, split, out in ((single_queries, "query", query), (distractors, "gallery", gallery)):
        for n in names_:
            out += [(n, f) for f in groups[n]]
            record += [{"face": f, "identity": n, "split": split} for f in groups[n]]
    return IdentitySplit(
        query=query,
        gallery=gallery,
        mated=mated,
        non_mated=non_mated + single_queries,
        single_queries=single_queries,
        distractors=distractors,
        unused_singles=unused,
        record=sorted(record, key=lambda r: (r["identity"], r["face"])),
    )
