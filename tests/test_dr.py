"""DR (Sabour et al.) with the gallery k-NN stop: on linear feature maps where the reachable
set and the k-NN cells are known in closed form, plus bounds as hypothesis properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import Bounds, minimize
from torch import nn

from crossres.attacks.dr import DeepRepresentation
from crossres.types import Gallery

F64 = torch.float64
SHAPE = (3, 4, 4)
P = 48


pytestmark = pytest.mark.usefixtures("one_thread")


class LinearFeatures(nn.Module):
    """features(x) = A x (flattened); forward gives the same (no classifier needed)."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a)
        self.calls = 0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.flatten(1) @ self.a.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def orthogonal(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(P, P, generator=gen, dtype=F64))
    return q


def nearest(features: torch.Tensor, gallery: Gallery) -> torch.Tensor:
    """1-NN by brute force (independent of crossres' knn_predict)."""
    out = []
    for f in features:
        d = [float(((f - t) ** 2).sum()) for t in gallery.features]
        out.append(int(gallery.ids[min(range(len(d)), key=d.__getitem__)]))
    return torch.tensor(out)


def source_images(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.35 + 0.3 * torch.rand(n, *SHAPE, generator=gen, dtype=F64)


def test_reaches_a_target_that_is_reachable_within_epsilon():
    model = LinearFeatures(
        torch.randn(16, P, generator=torch.Generator().manual_seed(0), dtype=F64)
    )
    x = source_images(5, 1)
    gen = torch.Generator().manual_seed(2)
    shift = 0.05 * torch.sign(torch.randn(x.shape, generator=gen, dtype=F64))
    with torch.no_grad():
        own = model.features(x)
        goal = model.features(x + shift)  # a template exactly reachable at L-inf 0.05
        others = model.features(torch.rand(20, *SHAPE, generator=gen, dtype=F64))
    gallery = Gallery(torch.cat([own, goal, others]), torch.arange(30))
    targets = torch.arange(5, 10)
    result = DeepRepresentation(epsilon=0.1, steps=100)(model, x, targets, gallery=gallery)
    assert result.success.all()
    assert torch.equal(nearest(model.features(result.adversarial).detach(), gallery), targets)
    assert (result.adversarial - x).abs().max() <= 0.1 + 1e-12


@pytest.mark.parametrize("factor", [0.98, 1.02])
def test_success_exactly_when_the_analytic_bound_allows_it(factor):
    # orthogonal A keeps distances: the target's 1-NN cell against the own template is the
    # half-space delta . (x - x_s) > |delta|^2 / 2; over the box the most it reaches is
    # eps |delta|_1, so the smallest epsilon that works is |delta|^2 / (2 |delta|_1)
    model = LinearFeatures(orthogonal(3))
    x = source_images(4, 4)
    gen = torch.Generator().manual_seed(5)
    delta = (0.2 + 0.1 * torch.rand(x.shape, generator=gen, dtype=F64)) * torch.sign(
        torch.randn(x.shape, generator=gen, dtype=F64)
    )
    bound = (delta.flatten(1) ** 2).sum(1) / (2 * delta.flatten(1).abs().sum(1))
    assert (bound < 0.2).all()  # below every |delta_i|, and the box stays inside [0, 1]
    with torch.no_grad():
        own, goal = model.features(x), model.features(x + delta)
    for i in range(4):  # each with its own two-template gallery, as in the analysis
        gallery = Gallery(torch.stack([own[i], goal[i]]), torch.tensor([0, 1]))
        eps = float(bound[i]) * factor
        result = DeepRepresentation(epsilon=eps, steps=200)(
            model, x[i : i + 1], torch.tensor([1]), gallery=gallery
        )
        assert result.success.item() == (factor > 1)
        assert (result.adversarial - x[i]).abs().max() <= eps + 1e-12


def test_stops_as_soon_as_the_knn_assigns_the_target():
    # the own template mirrors the target through a boundary just beside the source's
    # feature: the first steps cross it, long before L-BFGS-B would converge
    gen = torch.Generator().manual_seed(6)
    u_, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=F64))
    v_, _ = torch.linalg.qr(torch.randn(P, 16, generator=gen, dtype=F64))
    scales = torch.logspace(0, 2, 16, dtype=F64)  # ill-conditioned: L-BFGS-B needs many steps
    model = LinearFeatures(u_ @ torch.diag(scales) @ v_.T)
    x = source_images(3, 7)
    shift = 0.1 * torch.sign(torch.randn(x.shape, generator=gen, dtype=F64))
    with torch.no_grad():
        f = model.features(x)
        target = model.features(x + shift)  # reachable: converging would reach it exactly
        own = f - 0.9 * (target - f)  # boundary 5% of the way from f to the target
    eps = 0.3
    attack = DeepRepresentation(epsilon=eps, steps=100)
    for i in range(3):  # each with its own two-template gallery
        gallery = Gallery(torch.stack([own[i], target[i]]), torch.tensor([0, 1]))
        result = attack(model, x[i : i + 1], torch.tensor([1]), gallery=gallery)
        assert result.success.item()
        assert result.iterations.item() <= 2
        left = (model.features(result.adversarial) - target[i]).pow(2).sum().detach()
        # the same problem run to convergence by scipy, without the k-NN stop
        a = model.a.detach().numpy()
        t = target[i].numpy()
        x0 = x[i].flatten().numpy()
        full = minimize(
            lambda z, a=a, t=t: (((a @ z - t) ** 2).sum(), 2 * a.T @ (a @ z - t)),
            x0,
            jac=True,
            method="L-BFGS-B",
            bounds=Bounds(x0 - eps, x0 + eps),
            options={"maxiter": 20},
        )
        assert full.nit == 20 and full.fun < 1e-2 * left  # still going after 20 iterations
        assert left > 0.1 * (f[i] - target[i]).pow(2).sum()  # stopped far from the optimum
    # an already satisfied source is returned untouched after one evaluation
    gallery0 = Gallery(torch.cat([model.features(x).detach(), target]), torch.arange(6))
    done = DeepRepresentation(epsilon=0.2)(model, x, torch.arange(3), gallery=gallery0)
    assert done.success.all() and (done.iterations == 0).all()
    assert torch.equal(done.adversarial, x)
    assert (done.extra["evaluations"] == 1).all()


def test_dodging_leaves_the_own_identity():
    # own template a little off the sample; another identity lies beyond it: moving away from
    # the own template enters its cell once eps > 0.045 (see the distances below)
    model = LinearFeatures(orthogonal(9))
    x = source_images(3, 10)
    u = torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(11), dtype=F64))
    with torch.no_grad():
        gallery = Gallery(
            torch.cat([model.features(x - 0.01 * u), model.features(x + 0.1 * u)]),
            torch.tensor([0, 1, 2, 7, 8, 9]),
        )
    labels = torch.tensor([0, 1, 2])
    result = DeepRepresentation(epsilon=0.1)(model, x, labels=labels, gallery=gallery)
    assert result.success.all()
    assert (nearest(model.features(result.adversarial).detach(), gallery) != labels).all()
    small = DeepRepresentation(epsilon=0.04)(model, x, labels=labels, gallery=gallery)
    assert not small.success.any()


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    epsilon=st.floats(0.001, 0.3),
    steps=st.integers(1, 15),
    k=st.integers(1, 3),
)
def test_bound_and_range_properties(seed, epsilon, steps, k):
    gen = torch.Generator().manual_seed(seed)
    model = LinearFeatures(torch.randn(6, P, generator=gen, dtype=F64))
    x = torch.rand(3, *SHAPE, generator=gen, dtype=F64)
    x[0] = (x[0] > 0.5).to(F64)  # pixels at the bounds of [0, 1]
    gallery = Gallery(
        model.features(torch.rand(8, *SHAPE, generator=gen, dtype=F64)).detach(),
        torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
    )
    targets = torch.randint(0, 4, (3,), generator=gen)
    attack = DeepRepresentation(epsilon=epsilon, steps=steps, k=k)
    result = attack(model, x, targets, gallery=gallery)
    adv = result.adversarial
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= epsilon + 1e-12
    assert (result.iterations <= steps).all()
    # scipy checks maxfun when an iteration ends: a line search (<= 20) may run past it
    assert (result.extra["evaluations"] <= attack.max_evaluations + 20).all()
    if k == 1:
        assert torch.equal(
            result.success, nearest(model.features(adv).detach(), gallery) == targets
        )


class TinyConvFeatures(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 6, 3, padding=1).to(F64)
        self.head = nn.Linear(6 * 16, 8).to(F64)
        self.drop = nn.Dropout(0.5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.3)
        self.calls = 0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(self.drop(torch.tanh(self.conv(x)).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def conv_case(n: int = 5):
    model = TinyConvFeatures(12)
    gen = torch.Generator().manual_seed(13)
    x = torch.rand(n, *SHAPE, generator=gen, dtype=F64)
    with torch.no_grad():
        templates = model.eval().features(torch.rand(10, *SHAPE, generator=gen, dtype=F64))
    model.calls = 0
    return model, x, Gallery(templates, torch.arange(10)), torch.arange(n) % 10


def test_batch_equals_each_sample_alone_and_costs_one_pass_per_round():
    model, x, gallery, targets = conv_case()
    attack = DeepRepresentation(epsilon=0.08, steps=20)
    together = attack(model, x, targets, gallery=gallery)
    rounds = model.calls - 1  # minus the base class's success check
    evaluations = together.extra["evaluations"]
    # every sample's evaluations share the batched passes: as many passes as the longest
    assert rounds == int(evaluations.max())
    assert int(evaluations.sum()) > rounds
    assert together.success.any() and not together.success.all()
    for i in range(len(x)):
        alone = attack(model, x[i : i + 1], targets[i : i + 1], gallery=gallery)
        assert alone.success[0] == together.success[i]
        assert alone.iterations[0] == together.iterations[i]
        assert alone.extra["evaluations"][0] == evaluations[i]
        torch.testing.assert_close(alone.adversarial[0], together.adversarial[i], atol=1e-9, rtol=0)


def test_each_sample_runs_scipys_lbfgsb_exactly():
    # a target out of reach (no early stop): every sample's result, iteration and
    # evaluation counts must be those of scipy.optimize.minimize on its own problem
    gen = torch.Generator().manual_seed(14)
    model = LinearFeatures(torch.randn(16, P, generator=gen, dtype=F64))
    x = source_images(4, 15)
    u = torch.sign(torch.randn(x.shape, generator=gen, dtype=F64))
    with torch.no_grad():
        gallery = Gallery(
            torch.cat([model.features(x), model.features(x + 0.6 * u)]), torch.arange(8)
        )
    targets = torch.arange(4, 8)
    eps, steps = 0.05, 25
    attack = DeepRepresentation(epsilon=eps, steps=steps, max_evaluations=40)
    result = attack(model, x, targets, gallery=gallery)
    assert not result.success.any()
    a = model.a.detach().numpy()
    for i in range(4):
        t = gallery.features[4 + i].numpy()
        x0 = x[i].flatten().numpy()
        ref = minimize(
            lambda z, t=t: (((a @ z - t) ** 2).sum(), 2 * a.T @ (a @ z - t)),
            x0,
            jac=True,
            method="L-BFGS-B",
            bounds=Bounds(np.maximum(x0 - eps, 0), np.minimum(x0 + eps, 1)),
            options={"maxiter": steps, "maxfun": 40},
        )
        assert result.iterations[i] == ref.nit
        assert result.extra["evaluations"][i] == ref.nfev
        np.testing.assert_allclose(result.adversarial[i].flatten().numpy(), ref.x, atol=1e-9)


def test_thread_driver_gives_the_same_results():
    model, x, gallery, targets = conv_case()
    auto = DeepRepresentation(epsilon=0.08, steps=20)
    threaded = DeepRepresentation(epsilon=0.08, steps=20)
    threaded._driver = "threads"
    a = auto(model, x, targets, gallery=gallery)
    model.calls = 0
    b = threaded(model, x, targets, gallery=gallery)
    assert model.calls - 1 == int(b.extra["evaluations"].max())  # one batched pass per round
    assert torch.equal(a.adversarial, b.adversarial)
    assert torch.equal(a.iterations, b.iterations)
    assert torch.equal(a.extra["evaluations"], b.extra["evaluations"])


def test_mode_and_grad_flags_restored_and_inference_mode_outside():
    model, x, gallery, targets = conv_case(3)
    model.train()
    model.head.bias.requires_grad_(False)
    with torch.inference_mode():
        result = DeepRepresentation(epsilon=0.3, steps=20)(model, x, targets, gallery=gallery)
    assert result.success.all()
    assert all(m.training for m in model.modules())
    assert not model.head.bias.requires_grad and model.head.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_cosine_metric_runs_and_is_checked_with_cosine_knn():
    model, x, gallery, targets = conv_case(3)
    result = DeepRepresentation(epsilon=0.3, steps=20, metric="cosine")(
        model, x, targets, gallery=gallery
    )
    f = nn.functional.normalize(model.eval().features(result.adversarial).detach(), dim=1)
    t = nn.functional.normalize(gallery.features, dim=1)
    assert torch.equal(result.success, gallery.ids[(f @ t.T).argmax(1)] == targets)
    assert result.success.any()


def test_call_errors_name_what_is_missing():
    model, x, gallery, targets = conv_case(2)
    attack = DeepRepresentation(epsilon=0.1)
    with pytest.raises(ValueError, match="not both"):
        attack(model, x, targets, labels=targets, gallery=gallery)
    with pytest.raises(ValueError, match="targets"):
        attack(model, x, gallery=gallery)
    with pytest.raises(ValueError, match="gallery"):
        attack(model, x, targets)
    with pytest.raises(ValueError, match="no template"):
        attack(model, x, torch.tensor([0, 99]), gallery=gallery)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("epsilon", {"epsilon": 0.0}),
        ("steps", {"epsilon": 0.1, "steps": 0}),
        ("metric", {"epsilon": 0.1, "metric": "l1"}),
        ("max_evaluations", {"epsilon": 0.1, "max_evaluations": 0}),
    ],
)
def test_bad_knobs_are_named(name, kwargs):
    with pytest.raises(ValueError, match=name):
        DeepRepresentation(**kwargs)


def test_model_errors_propagate_without_hanging():
    model, x, gallery, targets = conv_case(3)

    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def features(self, z: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls > 2:
                raise RuntimeError("boom")
            return model.features(z)

    with pytest.raises(RuntimeError, match="boom"):
        DeepRepresentation(epsilon=0.1)(Broken(), x, targets, gallery=gallery)
