"""report/threats.py from hand-made rows: verification rates against a brute force over every
threshold, the pairs it uses, the transfer matrix's counts and Wilson intervals (closed form),
and the side-by-side space table."""

from __future__ import annotations

import json
import math

import pytest

from crossres.report.threats import (
    space_section,
    transfer_section,
    verification_pairs,
    verification_rates,
    verification_section,
)
from crossres.store import ResultRow

DR = json.dumps({"class": "DeepRepresentation", "objective": "impersonation"})


def brute_tar(genuine: list[float], impostor: list[float], far: float) -> float:
    """Largest TAR over every real threshold whose FAR <= far (scores >= t accepted)."""
    best = 0.0
    for t in sorted(set(genuine) | set(impostor)) + [math.inf]:
        if sum(s >= t for s in impostor) / len(impostor) <= far:
            best = max(best, sum(s >= t for s in genuine) / len(genuine))
    return best


def rows(gen_clean, gen_adv, imp_clean, imp_adv, *, space="model_input", attack="DR"):
    out = []
    for i, (gc, ga, ic, ia) in enumerate(zip(gen_clean, gen_adv, imp_clean, imp_adv, strict=True)):
        out.append(ResultRow("M", "clean", i, 16, i % 3, mate_rank=1, mate_score=gc))
        out.append(
            ResultRow(
                "M",
                attack,
                i,
                16,
                i % 3,
                params=DR,
                success=ia > 0.5,
                target=(i + 1) % 3,
                mate_rank=2,
                mate_score=ga,
                target_score=ia,
                clean_target_score=ic,
                space=space,
            )
        )
    return out


# tie-heavy scores on a coarse grid
GC = [0.9, 0.8, 0.8, 0.7, 0.5, 0.5, 0.9, 0.6]
GA = [0.4, 0.8, 0.3, 0.5, 0.5, 0.2, 0.9, 0.6]
IC = [0.3, 0.5, 0.5, 0.2, 0.6, 0.3, 0.1, 0.5]
IA = [0.8, 0.5, 0.9, 0.7, 0.6, 0.9, 0.1, 0.5]


@pytest.mark.parametrize("far", [1e-3, 1e-2, 0.125, 0.25, 0.5])
def test_verification_rates_match_a_brute_force(far, monkeypatch):
    data = rows(GC, GA, IC, IA)
    clean = {(r.model, r.sample_id, r.resolution): r for r in data if r.attack == "clean"}
    pairs = verification_pairs([r for r in data if r.attack == "DR"], clean)
    assert pairs["impostor"] == "impersonation target"
    monkeypatch.setattr("crossres.report.threats.FARS", (far,))
    rates = verification_rates(pairs)
    assert rates[f"clean@{far:g}"] == pytest.approx(brute_tar(GC, IC, far))
    assert rates[f"dodging@{far:g}"] == pytest.approx(brute_tar(GA, IC, far))
    assert rates[f"impersonation@{far:g}"] == pytest.approx(brute_tar(GC, IA, far))
    # FAR under attack at the clean operating threshold, by hand
    thresholds = [t for t in sorted(set(GC) | set(IC)) + [math.inf]]
    t = next(t for t in thresholds if sum(s >= t for s in IC) / len(IC) <= far)
    assert rates[f"attacked_far@{far:g}"] == pytest.approx(sum(s >= t for s in IA) / len(IA))


def test_verification_section_writes_the_table_and_roc(tmp_path):
    lines = verification_section(rows(GC, GA, IC, IA), tmp_path / "figures")
    text = "\n".join(lines)
    assert "| M | 16 | DR | impersonation target | 8 / 8 |" in text
    assert (tmp_path / "figures" / "roc_m_r16.png").is_file()


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_transfer_matrix_counts_and_intervals():
    data = rows(GC, GA, IC, IA)
    info = {"source_model": "M", "source_attack": "DR", "source_resolution": 16}
    params = json.dumps({**json.loads(DR), "transfer": info})
    for i in range(8):
        hit = 1 if i < 5 else 3
        data.append(
            ResultRow("N", "DR @M->N", i, 16, 0, params=params, success=i < 3, mate_rank=hit)
        )
    text = "\n".join(transfer_section(data))
    lo, hi = wilson(3, 8)
    hlo, hhi = wilson(5, 8)
    cell = f"37.5 [{100 * lo:.1f}, {100 * hi:.1f}] / 62.5 [{100 * hlo:.1f}, {100 * hhi:.1f}]"
    assert "| source \\ evaluated | M | N |" in text
    assert "| M | " in text and cell in text


def test_both_spaces_side_by_side():
    data = rows(GC, GA, IC, IA) + [
        r
        for r in rows(GC, GA, IC, IA, space="low_resolution", attack="DR lr")
        if r.attack != "clean"
    ]
    text = "\n".join(space_section(data))
    assert "- DR lr: low_resolution" in text and "- DR: model_input" in text
    assert "| M | 16 | DR lr | low_resolution | 8 |" in text and "| M | 16 | clean |" in text
    assert space_section([r for r in data if r.attack != "DR lr"])[-1] == ""
    one_space = "\n".join(space_section([r for r in data if r.attack != "DR lr"]))
    assert "- DR: model_input" in one_space
    assert "Model-input vs low-resolution space" not in one_space
