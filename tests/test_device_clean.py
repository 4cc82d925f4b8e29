"""Device-clean code, proved on the CPU: every attack, the search and the metrics run with
inputs on the CPU while (a) ``DeviceGuard`` records any factory call from crossres' source
made without ``device=`` and (b) the default device is ``meta``, so a tensor made anywhere
on the default device (ours or a library's, on the path we drive) cannot meet the CPU
inputs without an error. Also: the host synchronisations an attack iteration adds (CW and
EAD none; JSMA one compaction; DR one device-to-host copy of the round's answers)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from crossres.attacks import (
    JSMA,
    CarliniWagnerL2,
    DeepRepresentation,
    ElasticNet,
    TorchattacksAttack,
)
from crossres.metrics import CMC, AttackSuccessRate, DETCurve, FPIRAtFNIR, HitRate
from crossres.metrics import functional as MF
from crossres.metrics.scoring import search, similarity, topk_similarity
from crossres.types import Gallery
from device_guard import DeviceGuard

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 5


class Net(nn.Module):
    """features (8-d) and logits (5 classes) of a 3x4x4 image."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.Tanh())
        self.head = nn.Linear(8, CLASSES)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(1)
    model = Net().eval()
    x = torch.rand(4, 3, 4, 4, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    gallery = Gallery(features=torch.randn(CLASSES, 8, generator=g), ids=torch.arange(CLASSES))
    return model, x, y, gallery


@contextlib.contextmanager
def default_device(device: str | None):
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(None)


def guarded(fn, *, meta: bool) -> DeviceGuard:
    guard = DeviceGuard()
    with default_device("meta" if meta else None), guard:
        fn()
    return guard


ATTACKS = {
    "cw": lambda m, x, y, g: CarliniWagnerL2(binary_search_steps=2, steps=3)(m, x, y),
    "cw_targeted": lambda m, x, y, g: CarliniWagnerL2(binary_search_steps=10, steps=2)(
        m, x, targets=(y + 1) % CLASSES
    ),
    "ead": lambda m, x, y, g: ElasticNet(binary_search_steps=2, steps=3)(m, x, y),
    "jsma_foolbox_target": lambda m, x, y, g: JSMA(max_iter=5)(m, x, y),
    "jsma_runner_up": lambda m, x, y, g: JSMA(max_iter=5, untargeted_target="runner_up")(m, x, y),
    "jsma_targeted": lambda m, x, y, g: JSMA(max_iter=5)(m, x, targets=(y + 1) % CLASSES),
    "dr_impersonation": lambda m, x, y, g: DeepRepresentation(epsilon=0.05, steps=3)(
        m, x, (y + 1) % CLASSES, gallery=g
    ),
    "dr_dodging_cosine": lambda m, x, y, g: DeepRepresentation(
        epsilon=0.05, steps=3, metric="cosine", k=2
    )(m, x, labels=y, gallery=g),
    "torchattacks_pgd": lambda m, x, y, g: TorchattacksAttack("PGD", eps=0.03, alpha=0.01, steps=3)(
        m, x, y
    ),
}


@pytest.mark.parametrize("meta", [False, True], ids=["guard", "meta-default"])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attacks_make_every_tensor_on_the_inputs_device(case, name, meta):
    model, x, y, gallery = case
    guard = guarded(lambda: ATTACKS[name](model, x, y, gallery), meta=meta)
    assert guard.violations == []


def test_the_guard_catches_a_default_device_tensor(monkeypatch):
    """The guard is not blind: a factory call without device= in crossres' source is caught
    (and under the meta default device the mixed-device arithmetic fails). The faulty
    objective is compiled as if it were a file of crossres."""
    import crossres.attacks.objectives as objectives
    from device_guard import SOURCE

    code = (
        "def achieved(self, logits):\n"
        "    ok = torch.ones(logits.shape[0], dtype=torch.bool)\n"
        "    return (logits.argmax(1) != self.labels) & ok\n"
    )
    scope = {"torch": torch}
    exec(compile(code, f"{SOURCE}/faulty.py", "exec"), scope)
    monkeypatch.setattr(objectives.Misclassification, "achieved", scope["achieved"])
    model = Net().eval()
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    y = torch.zeros(2, dtype=torch.long)
    attack = JSMA(max_iter=2, untargeted_target="runner_up")
    guard = guarded(lambda: attack(model, x, y), meta=False)
    assert guard.violations and all("faulty.py:2" in v for v in guard.violations)
    with pytest.raises((RuntimeError, NotImplementedError)):
        guarded(lambda: attack(model, x, y), meta=True)


def metric_calls() -> dict:
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(6, CLASSES, generator=g)
    pid = torch.tensor([0, 1, 2, 3, 4, 7])
    gid = torch.arange(CLASSES)
    sid = torch.arange(6)
    y = torch.tensor([0, 1, 2, 3])
    feats = torch.randn(6, 8, generator=g)
    templates = torch.randn(CLASSES, 8, generator=g)
    metrics = {
        "cmc": (CMC(max_rank=3), (scores[:5], pid[:5], gid, sid[:5])),
        "hit": (HitRate(), (scores[:5], pid[:5], gid, sid[:5])),
        "fpir": (FPIRAtFNIR(), (scores, pid, gid, sid)),
        "det": (DETCurve(), (scores, pid, gid, sid)),
        "asr": (AttackSuccessRate(), (y, (y + 1) % CLASSES, y, sid[:4])),
    }

    def run_metric(metric, args):
        return lambda: (metric.update(*args), metric.compute())

    def chunked_search():
        for metric in ("cosine", "neg_euclidean"):
            r = search(feats, templates, gid, pid, k=2, chunk_size=2, metric=metric)
            m = FPIRAtFNIR()
            m.update(r, sample_id=sid)
            m.compute()

    calls = {name: run_metric(m, a) for name, (m, a) in metrics.items()}
    calls.update(
        summarize=lambda: MF.summarize_probes(scores, pid, gid),
        cmc_functional=lambda: MF.cmc(scores[:5], pid[:5], gid, 3),
        fpir_functional=lambda: MF.fpir_at_fnir(scores[:5], pid[:5], scores[5:], gid),
        unreachable=lambda: MF.fpir_at_fnir(scores[:5], pid[:5], scores[5:], gid, 0.0, 1),
        det_functional=lambda: MF.det_curve(scores[:5], pid[:5], scores[5:], gid),
        threshold=lambda: MF.fnir_fpir_at_threshold(scores[:5], pid[:5], scores[5:], gid, 0.1),
        asr_nan=lambda: MF.attack_success_rate(y, y, (y + 1) % CLASSES),
        similarity=lambda: similarity(feats, templates),
        topk=lambda: topk_similarity(feats, templates, 2, chunk_size=2),
        search=chunked_search,
    )
    return calls


@pytest.mark.parametrize("meta", [False, True], ids=["guard", "meta-default"])
def test_metrics_and_search_make_every_tensor_on_the_inputs_device(meta):
    # the metric objects (their states) are built outside, as a LightningModule builds them
    for name, call in metric_calls().items():
        guard = guarded(call, meta=meta)
        assert guard.violations == [], name


def syncs(fn) -> int:
    guard = DeviceGuard()
    with guard:
        fn()
    return guard.sync_count


@pytest.mark.parametrize("kind", [CarliniWagnerL2, ElasticNet])
def test_cw_and_ead_iterations_add_no_host_synchronisation(case, kind):
    """Without early abort (checked once per period, by design), more iterations add no
    .item()/bool()/nonzero/mask indexing: the per-sample bookkeeping stays on the device."""
    model, x, y, _ = case
    few, many = (
        syncs(lambda s=s: kind(binary_search_steps=2, steps=s, abort_early=False)(model, x, y))
        for s in (2, 9)
    )
    assert few == many


def test_jsma_iteration_synchronises_once(case):
    """One compaction (nonzero) per iteration: the batch shrinks as samples finish."""
    model, x, _, _ = case
    targets = torch.full((x.shape[0],), 2)
    with torch.no_grad():
        targets = torch.where(model(x).argmax(1) == 2, 3, targets)

    def run(n):
        attack = JSMA(max_iter=n, theta=0.001, max_perturbations_per_pixel=1000)
        holder = {}
        count = syncs(lambda: holder.setdefault("r", attack(model, x, targets=targets)))
        return count, holder["r"]

    (few, r_few), (many, r_many) = run(3), run(11)
    # every sample ran every iteration (theta tiny: none reaches its target)
    assert r_few.iterations.tolist() == [2] * 4 and r_many.iterations.tolist() == [10] * 4
    assert (many - few) / 8 <= 1


def test_dr_round_makes_one_device_to_host_copy(case):
    """L-BFGS-B runs on the host (scipy): each round of evaluations copies the answers once."""
    model, x, y, gallery = case
    for steps in (2, 6):
        guard = DeviceGuard()
        with guard:
            result = DeepRepresentation(epsilon=0.01, steps=steps)(
                model, x, (y + 1) % CLASSES, gallery=gallery
            )
        rounds = int(result.extra["evaluations"].max())
        copies = sum(n for site, n in guard.syncs.items() if site.startswith("cpu at dr.py"))
        # one per round, plus three for the bounds and start before the loop
        assert copies == rounds + 3, dict(guard.syncs)
