"""JSMA: foolbox 2.x's SaliencyMapAttack batched. Checked against a line-by-line transcription
of foolbox 2.4's code (one sample at a time, numpy), analytic L0 on linear classifiers, bounds
as hypothesis properties, and pass counts that do not grow with the number of classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from crossres.attacks.jsma import JSMA
from crossres.attacks.objectives import Misclassification

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_convnet(classes: int, *, seed: int, size: int = 6, dtype=torch.float32) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * size * size, classes),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.to(dtype).eval()


class Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


# --------------------------------------------------------------- foolbox 2.4, transcribed
def foolbox2_reference(model, x, label, *, max_iter, theta, maxpp, target=None):
    """foolbox 2.4 SaliencyMapAttack(fast=True, num_random_targets=0) on one sample, as its
    source reads (GradientAttack for the target, then the saliency loop). Returns the
    adversarial (None on failure)."""

    def logits(z):
        with torch.no_grad():
            return model(torch.from_numpy(z[None]))[0].numpy()

    def grad_ce(z, cls):
        t = torch.from_numpy(z[None]).requires_grad_(True)
        loss = F.cross_entropy(model(t), torch.tensor([cls]), reduction="sum")
        (g,) = torch.autograd.grad(loss, t)
        return g[0].numpy()

    def adversarial(z):
        out = logits(z)
        return out.argmax() == target if targeted else out.argmax() != label

    targeted = target is not None
    if adversarial(x):
        return x
    if not targeted:  # GradientAttack(epsilons=1000, max_epsilon=1)
        g = grad_ce(x, label)
        g = g / (np.sqrt(np.mean(np.square(g))) + 1e-8)
        epsilons, best = np.linspace(0, 1, num=1001)[1:], None
        for _ in range(2):  # foolbox's SingleStepGradientBaseAttack._run
            hit = None
            for i, eps in enumerate(epsilons):
                z = np.clip(x + g * np.float32(eps), 0, 1)
                if logits(z).argmax() != label:
                    best, hit = z, i  # smaller eps than any earlier hit: smallest distance
                    break
            if hit is not None and hit >= 20:
                break  # foolbox returns; below 20 it refines once
            epsilons = np.linspace(0, epsilons[i], num=21)[1:]
        if best is None:
            raise AssertionError("reference needs GradientAttack to succeed")
        target = int(logits(best).argmax())
    mask = np.ones_like(x)
    counts = np.zeros_like(x)
    z = x.copy()
    for _ in range(max_iter):
        out = logits(z)
        if (out.argmax() == target) if targeted else (out.argmax() != label):
            return z
        alphas = grad_ce(z, target) * mask
        betas = -np.ones_like(alphas)
        salmap = np.abs(alphas) * np.abs(betas) * np.sign(alphas * betas)
        idx = np.unravel_index(np.argmin(salmap), mask.shape)
        z[idx] += -np.sign(alphas)[idx] * theta
        counts[idx] += 1
        if z[idx] <= 0 or z[idx] >= 1:
            mask[idx] = 0
        if counts[idx] >= maxpp:
            mask[idx] = 0
        z = np.clip(z, 0, 1)
    return None


@pytest.mark.parametrize(
    ("classes", "theta", "maxpp", "targeted"),
    [
        (2, 0.1, 10, False),
        (10, 0.3, 3, False),
        (200, 0.5, 10, False),
        (1000, 0.1, 10, False),
        (10, 0.1, 2, True),
        (50, 0.3, 10, True),
    ],
)
def test_matches_foolbox2_transcription(classes, theta, maxpp, targeted):
    model = tiny_convnet(classes, seed=classes)
    x = torch.rand(8, 3, 6, 6, generator=torch.Generator().manual_seed(classes))
    x[:2, :, 1:4] = 1.0  # saturated components: steps past a bound
    labels = model(x).argmax(1)
    targets = (labels + 1) % classes if targeted else None
    attack = JSMA(max_iter=60, theta=theta, max_perturbations_per_pixel=maxpp)
    result = attack(model, x, labels, targets=targets)
    assert result.success.any() and result.iterations.max() >= 2
    for i in range(8):
        ref = foolbox2_reference(
            model,
            x[i].numpy(),
            int(labels[i]),
            max_iter=60,
            theta=theta,
            maxpp=maxpp,
            target=None if targets is None else int(targets[i]),
        )
        assert bool(result.success[i]) == (ref is not None)
        if ref is not None:
            np.testing.assert_allclose(result.adversarial[i].numpy(), ref, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------- analytic L0
def test_binary_linear_classifier_uses_the_analytic_minimum_of_components():
    # class 1 - class 0 weight d: the ten largest |d| are negative, so decreasing components
    # (what foolbox's fast variant does) is optimal; from 0.5 a component can move by 0.5
    gen = torch.Generator().manual_seed(0)
    d = torch.rand(48, generator=gen, dtype=torch.float64) * 0.2
    d[:10] = -(1.0 + torch.rand(10, generator=gen, dtype=torch.float64))
    d = d[torch.randperm(48, generator=gen)]
    weight = torch.stack([torch.zeros(48, dtype=torch.float64), d])
    x = torch.full((1, 3, 4, 4), 0.5, dtype=torch.float64)
    for margin in (0.3, 1.2, 2.5):
        bias = torch.tensor([margin + float(d.sum()) * 0.5, 0.0], dtype=torch.float64)
        model = Linear(weight, bias)
        assert model(x).argmax(1).item() == 0
        gains = (0.5 * d.abs()).sort(descending=True).values
        minimum = int((gains.cumsum(0) > margin).nonzero()[0]) + 1  # fewest components
        result = JSMA(max_iter=200, theta=0.1, max_perturbations_per_pixel=10)(
            model, x, torch.tensor([0])
        )
        assert result.success.item()
        assert result.norms(x)["l0"].item() <= 3  # pixels (any channel)
        changed = int(((result.adversarial - x).abs() > 0).sum())
        assert changed == minimum
        assert result.iterations.item() <= 6 * minimum


def test_multiclass_linear_classifier_flips_with_few_components():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(10, 48, generator=gen, dtype=torch.float64)
    bias = torch.zeros(10, dtype=torch.float64)
    model = Linear(weight, bias)
    x = 0.25 + 0.5 * torch.rand(8, 3, 4, 4, generator=gen, dtype=torch.float64)
    labels = model(x).argmax(1)
    result = JSMA(max_iter=300, theta=0.1, max_perturbations_per_pixel=10)(model, x, labels)
    assert result.success.all()
    changed = ((result.adversarial - x).abs() > 0).flatten(1).sum(1)
    # fewest components any perturbation in [0, 1] needs: per rival j, sort the largest
    # achievable gains of the margin z_j - z_y
    z = model(x).detach()
    flat = x.flatten(1)
    minimum = []
    for i in range(8):
        y = int(labels[i])
        best = 48
        for j in range(10):
            if j == y:
                continue
            d = weight[j] - weight[y]
            room = torch.where(d > 0, 1 - flat[i], flat[i])
            gains = (d.abs() * room).sort(descending=True).values
            need = float(z[i, y] - z[i, j])
            reach = (gains.cumsum(0) > need).nonzero()
            if reach.numel():
                best = min(best, int(reach[0]) + 1)
        minimum.append(best)
    minimum = torch.tensor(minimum)
    # greedy, one component at a time: at most one component more than the optimum, and on
    # most samples exactly the optimum
    assert (changed <= minimum + 1).all(), (changed, minimum)
    assert (changed == minimum).sum() >= 6


# ---------------------------------------------------------------------- properties
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    theta=st.sampled_from([0.1, 0.3, 0.5]),
    maxpp=st.integers(1, 4),
    max_iter=st.integers(1, 30),
    targeted=st.booleans(),
)
def test_bounds_and_success_properties(seed, theta, maxpp, max_iter, targeted):
    model = tiny_convnet(7, seed=seed % 5)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 3, 6, 6, generator=gen)
    x[0, :, :2] = 0.0  # saturated pixels: steps past a bound are clipped and leave the domain
    x[1, :, :2] = 1.0
    labels = torch.randint(0, 7, (4,), generator=gen)
    targets = torch.randint(0, 7, (4,), generator=gen) if targeted else None
    attack = JSMA(max_iter=max_iter, theta=theta, max_perturbations_per_pixel=maxpp)
    result = attack(model, x, labels, targets=targets)
    adv = result.adversarial
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert adv.min() >= 0 and adv.max() <= 1
    delta = (adv - x).abs()
    assert delta.max() <= maxpp * theta + 1e-6
    changed = (delta > 0).flatten(1).sum(1)
    assert (changed <= result.iterations).all()
    assert (result.iterations <= max_iter - 1).all()
    with torch.no_grad():
        pred = model(adv).argmax(1)
    expected = pred == targets if targeted else pred != labels
    assert torch.equal(result.success, expected)
    clean = model(x).argmax(1)
    start = clean == targets if targeted else clean != labels
    assert (result.iterations[start] == 0).all()
    assert torch.equal(adv[start], x[start])


# ---------------------------------------------------------- cost vs number of classes
class PassCounter(TorchDispatchMode):
    """Largest tensor any op produces while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def count_passes(model: nn.Module) -> dict[str, int]:
    counts = {"forward": 0, "backward": 0}
    model.register_forward_hook(lambda *_: counts.__setitem__("forward", counts["forward"] + 1))
    model.register_full_backward_hook(
        lambda *_: counts.__setitem__("backward", counts["backward"] + 1)
    )
    return counts


@pytest.mark.parametrize("classes", [10, 2000])
def test_one_forward_and_one_backward_per_iteration_whatever_the_classes(classes):
    size = 8
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, classes),  # 16 features < pixels: classes x pixels would stand out
    ).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        model[-1].bias[-1] = -1e6  # the target can never win: every sample runs to the end
    counts = count_passes(model)
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    targets = torch.full((3,), classes - 1)
    watch = PassCounter()
    with watch:
        result = JSMA(max_iter=12, theta=0.1)(model, x, targets=targets)
    assert not result.success.any()
    assert (result.iterations == 11).all()
    assert counts == {"forward": 12 + 1, "backward": 11}  # + the base class's success check
    # nothing bigger than what one plain forward+backward of the batch makes, and nothing of
    # size classes x pixels
    plain = PassCounter()
    with plain:
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xg), targets), xg)
    assert watch.largest <= max(plain.largest, x.numel())
    if classes > 1000:
        assert watch.largest < classes * 3 * size * size // 8


def test_untargeted_target_choice_has_a_fixed_gradient_cost():
    model = tiny_convnet(2000, seed=4, size=6)
    counts = count_passes(model)
    x = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    labels = model(x).argmax(1)
    counts["forward"] = 0
    result = JSMA(max_iter=30, theta=0.3)(model, x, labels)
    # one backward for foolbox's GradientAttack gradient, then one per saliency iteration
    assert counts["backward"] == 1 + int(result.iterations.max())
    assert result.success.all()


# ---------------------------------------------------------------- independence etc.
def test_batch_equals_each_sample_alone():
    model = tiny_convnet(10, seed=5, dtype=torch.float64)
    x = torch.rand(6, 3, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = model(x).argmax(1)
    labels[0] = (labels[0] + 1) % 10  # already misclassified: done at once
    attack = JSMA(max_iter=25, theta=0.1, max_perturbations_per_pixel=3)
    together = attack(model, x, labels)
    assert together.iterations[0] == 0
    assert len(set(together.iterations.tolist())) > 2  # samples stop at different steps
    for i in range(6):
        alone = attack(model, x[i : i + 1], labels[i : i + 1])
        assert torch.equal(alone.adversarial[0], together.adversarial[i])
        assert alone.success[0] == together.success[i]
        assert alone.iterations[0] == together.iterations[i]


def test_mode_and_grad_flags_restored_and_inference_mode_outside():
    model = nn.Sequential(tiny_convnet(5, seed=6), nn.Dropout(0.5))
    model.train()
    model[0][0].weight.requires_grad_(False)
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        labels = model.eval()(x).argmax(1)
        model.train()
        result = JSMA(max_iter=20, theta=0.5)(model, x, labels)
    assert result.success.any()
    assert all(m.training for m in model.modules())
    assert not model[0][0].weight.requires_grad
    assert model[0][-1].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_target_falls_back_to_the_seeded_draw_when_the_gradient_scan_fails():
    # a label that wins by 1e6 whatever the input: foolbox's GradientAttack finds nothing
    weight = torch.randn(10, 48, generator=torch.Generator().manual_seed(4))
    bias = torch.zeros(10)
    bias[3] = 1e6
    model = Linear(weight, bias)
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([3, 3])
    attack = JSMA(max_iter=3, seed=11)
    with torch.enable_grad():
        targets, todo = attack._untargeted_targets(model, x.clone(), Misclassification(labels))
    assert todo.tolist() == [0, 1]
    assert targets.tolist() == [attack._random_target(3, 10)] * 2
    assert not attack(model, x, labels).success.any()


def test_random_target_fallback_is_seeded_per_sample():
    attack = JSMA(seed=3)
    draws = {attack._random_target(4, 10) for _ in range(3)}
    assert len(draws) == 1 and 4 not in draws
    assert all(attack._random_target(label, 2) == 1 - label for label in (0, 1))


@pytest.mark.parametrize(
    "kwargs",
    [{"max_iter": 0}, {"theta": 0.0}, {"theta": 1.5}, {"max_perturbations_per_pixel": 0}],
)
def test_bad_knobs_are_named(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        JSMA(**kwargs)


def test_runner_up_target_follows_the_runner_up_class():
    """The cheap untargeted choice attacks towards the most likely other class: until the
    first misclassification, its changes are those of a targeted run at that class."""
    model = tiny_convnet(10, seed=7, dtype=torch.float64)
    x = torch.rand(5, 3, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    logits = model(x)
    labels = logits.argmax(1)
    runner_up = logits.scatter(1, labels.unsqueeze(1), -torch.inf).argmax(1)
    cheap = JSMA(max_iter=40, theta=0.2, untargeted_target="runner_up")(model, x, labels)
    assert cheap.success.any()
    for i in range(5):
        steps = int(cheap.iterations[i]) + 1  # the same number of checked images
        targeted = JSMA(max_iter=steps, theta=0.2)(
            model, x[i : i + 1], targets=runner_up[i : i + 1]
        )
        assert torch.equal(targeted.adversarial[0], cheap.adversarial[i])
    with pytest.raises(ValueError, match="untargeted_target"):
        JSMA(untargeted_target="second")
