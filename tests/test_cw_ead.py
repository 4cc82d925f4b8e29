"""CW-L2 and EAD against independent answers: the analytic minimal L2 of a linear classifier,
scipy's constrained optimum, a brute-force margin, torchattacks' CW where it is correct, and
the attack contract (range, success, iterations, modes, batch independence)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchattacks
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize
from torch import nn

from crossres.attacks._margin import ConstSearch, margin_loss, search_success
from crossres.attacks.cw import CarliniWagnerL2
from crossres.attacks.ead import ElasticNet, shrink

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


class Linear(nn.Module):
    """logits = W x + b over the flattened image."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.dtype)
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class Shifted(nn.Module):
    """The same classifier with a constant added to every logit (same decisions)."""

    def __init__(self, inner: nn.Module, shift: float) -> None:
        super().__init__()
        self.inner, self.shift = inner, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.shift


def mlp(seed: int, *, classes: int = 5, dtype: torch.dtype = torch.float32) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 24), nn.Tanh(), nn.Linear(24, classes))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.to(dtype).eval()


def images(seed: int, n: int, *, lo: float = 0.05, hi: float = 0.95, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(n, 3, 4, 4, generator=g)).to(dtype)


def linear_case(seed: int, n: int, classes: int):
    """A linear classifier on [n, 3, 4, 4] images near 0.5 whose nearest decision boundary
    is reached inside the box [0, 1] (checked), with its analytic minimal L2."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, 48, generator=g, dtype=F64)
    bias = torch.randn(classes, generator=g, dtype=F64) * 0.1
    model = Linear(weight, bias).eval()
    x = 0.45 + 0.1 * torch.rand(n, 3, 4, 4, generator=g, dtype=F64)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    best = torch.full((n,), float("inf"), dtype=F64)
    for i in range(n):
        for j in range(classes):
            if j == y[i]:
                continue
            w = weight[y[i]] - weight[j]
            dist = (z[i, y[i]] - z[i, j]) / w.norm()
            point = x[i].flatten() - dist * w / w.norm()
            if dist < best[i]:
                assert point.min() >= 0 and point.max() <= 1, "test case leaves the box"
                best[i] = dist
    return model, x, y, best, weight, bias


def l2(result, x):
    return result.norms(x)["l2"]


# --- the margin --------------------------------------------------------------------------


def brute_margin(logits, classes, targeted, kappa):
    out = []
    for row, c in zip(logits.tolist(), classes.tolist(), strict=True):
        other = max(v for i, v in enumerate(row) if i != c)
        diff = other - row[c] if targeted else row[c] - other
        out.append(max(diff + kappa, 0.0))
    return torch.tensor(out, dtype=logits.dtype)


@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("kappa", [0.0, 0.7])
@pytest.mark.parametrize("offset", [0.0, -50.0, 50.0])
def test_margin_matches_definition_for_any_sign(targeted, kappa, offset):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(20, 7, generator=g, dtype=F64) * 3 + offset
    classes = torch.randint(0, 7, (20,), generator=g)
    got = margin_loss(logits, classes, targeted=targeted, confidence=kappa)
    torch.testing.assert_close(got, brute_margin(logits, classes, targeted, kappa))
    success = search_success(logits, classes, targeted=targeted, confidence=0.0)
    pred = logits.argmax(1)
    assert torch.equal(success, pred == classes if targeted else pred != classes)


def test_margin_gradient_reaches_the_true_and_best_other_logit_only():
    logits = torch.tensor([[-9.0, -3.0, -7.0, -5.0]], dtype=F64, requires_grad=True)
    loss = margin_loss(logits, torch.tensor([1]), targeted=False, confidence=0.0)
    assert loss.item() == 2.0  # -3 - max(-9, -7, -5); one-hot x logits would give 0
    loss.sum().backward()
    assert logits.grad.tolist() == [[0.0, 1.0, 0.0, -1.0]]


def test_const_search_follows_carlini_rules():
    search = ConstSearch.start(3, 1e-3, torch.device("cpu"))
    search.update(torch.tensor([True, False, False]))
    # success: upper = c, c = (0 + c) / 2; failure without an upper bound: c * 10
    torch.testing.assert_close(search.const, torch.tensor([5e-4, 1e-2, 1e-2], dtype=F64))
    search.update(torch.tensor([False, True, False]))
    torch.testing.assert_close(search.lower, torch.tensor([5e-4, 1e-3, 1e-2], dtype=F64))
    torch.testing.assert_close(search.const, torch.tensor([7.5e-4, 5.5e-3, 1e-1], dtype=F64))


@pytest.mark.parametrize("make", [CarliniWagnerL2, ElasticNet])
def test_last_step_at_upper_bound_with_ten_binary_steps(make):
    """Carlini's rule: with >= 10 binary-search steps the last runs at c = upper bound, i.e.
    1e10 for a sample that never succeeded (a last try), and for the others a rerun of a
    constant already run (same result), which is skipped."""
    model, x, y, *_ = linear_case(0, 4, 2)
    hopeless = {"steps": 20, "learning_rate": 0.05, "initial_const": 1e-12}
    assert not make(binary_search_steps=9, **hopeless)(model, x, y).success.any()
    last_try = make(binary_search_steps=10, **hopeless)(model, x, y)
    assert last_try.success.all()
    easy = make(
        binary_search_steps=10, steps=20, learning_rate=0.05, initial_const=10.0, abort_early=False
    )
    result = easy(model, x, y)
    assert result.success.all()
    assert (result.iterations == 9 * 20).all()  # the tenth step was not rerun


def test_shrinkage_operator():
    x0 = torch.tensor([0.5, 0.5, 0.5, 0.95, 0.02])
    u = torch.tensor([0.7, 0.45, 0.2, 1.4, -0.5])
    # beyond beta: moved by beta towards x0 and clipped to [0, 1]; within beta: x0
    torch.testing.assert_close(shrink(u, x0, 0.1), torch.tensor([0.6, 0.5, 0.3, 1.0, 0.0]))


# --- minimal perturbations on a linear classifier ----------------------------------------


@pytest.mark.parametrize("classes", [2, 4])
def test_cw_reaches_minimal_l2_of_linear_classifier(classes):
    model, x, y, minimal, *_ = linear_case(0, 6, classes)
    result = CarliniWagnerL2(binary_search_steps=10, steps=100)(model, x, y)
    assert result.success.all()
    ratio = l2(result, x) / minimal
    assert (ratio > 1 - 1e-4).all() and (ratio < 1.03).all(), ratio


def scipy_min(x0, constraints, *, beta=0.0):
    """min beta * |d|_1 + |d|^2 s.t. A d >= m and 0 <= x0 + d <= 1 (d = p - q, p, q >= 0)."""
    a, m = constraints
    n = x0.size
    v0 = np.zeros(2 * n)

    def fun(v):
        d = v[:n] - v[n:]
        return beta * v.sum() + d @ d, np.concatenate([beta + 2 * d, beta - 2 * d])

    cons = [
        {
            "type": "ineq",
            "fun": lambda v: a @ (v[:n] - v[n:]) - m,
            "jac": lambda v: np.hstack([a, -a]),
        }
    ]
    bounds = [(0, 1 - t) for t in x0] + [(0, t) for t in x0]
    res = minimize(
        fun,
        v0,
        jac=True,
        bounds=bounds,
        constraints=cons,
        method="SLSQP",
        options={"maxiter": 1000, "ftol": 1e-14},
    )
    assert res.success, res.message
    return res.fun


def test_cw_targeted_matches_constrained_optimum():
    model, x, _, _, weight, bias = linear_case(1, 4, 4)
    with torch.no_grad():
        z = model(x)
    targets = z.argmin(1)  # the hardest target: it must beat every other class
    result = CarliniWagnerL2(binary_search_steps=10, steps=200)(model, x, None, targets=targets)
    assert result.success.all()
    for i in range(4):
        t = targets[i].item()
        others = [j for j in range(4) if j != t]
        a = np.stack([(weight[t] - weight[j]).numpy() for j in others])
        m = np.array([(z[i, j] - z[i, t]).item() for j in others])
        reference = scipy_min(x[i].flatten().numpy(), (a, m)) ** 0.5
        assert reference <= l2(result, x)[i].item() * (1 + 1e-4) <= reference * 1.03 * (1 + 1e-4)


def test_ead_small_beta_reaches_minimal_l2():
    model, x, y, minimal, *_ = linear_case(2, 6, 3)
    result = ElasticNet(binary_search_steps=10, steps=100, beta=1e-3)(model, x, y)
    assert result.success.all()
    ratio = l2(result, x) / minimal
    assert (ratio > 1 - 1e-4).all() and (ratio < 1.05).all(), ratio


def elastic_net_min(x0, a, m, beta):
    """Exact min of beta * |d|_1 + |d|^2 s.t. a.d >= m, 0 <= x0 + d <= 1 (m > 0).

    KKT: each d_i minimises d_i^2 + beta |d_i| - lam a_i d_i on its interval, i.e. the
    soft-threshold sign(a_i) max(lam |a_i| - beta, 0) / 2 clipped to [-x0_i, 1 - x0_i];
    a.d(lam) grows with lam, so lam is found by bisection."""

    def d_of(lam):
        d = np.sign(a) * np.maximum(lam * np.abs(a) - beta, 0) / 2
        return np.clip(d, -x0, 1 - x0)

    lo, hi = 0.0, 1.0
    while a @ d_of(hi) < m:
        hi *= 2
        assert hi < 1e12, "boundary not reachable in the box"
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if a @ d_of(mid) < m else (lo, mid)
    d = d_of(hi)
    return beta * np.abs(d).sum() + d @ d


def test_elastic_net_reference_agrees_with_scipy_at_beta_zero():
    model, x, y, minimal, weight, _ = linear_case(3, 2, 2)
    with torch.no_grad():
        z = model(x)
    for i in range(2):
        other = 1 - y[i].item()
        a = (weight[other] - weight[y[i]]).numpy()
        m = (z[i, y[i]] - z[i, other]).item()
        exact = elastic_net_min(x[i].flatten().numpy(), a, m, 0.0)
        assert exact == pytest.approx(minimal[i].item() ** 2, rel=1e-9)
        assert exact == pytest.approx(
            scipy_min(x[i].flatten().numpy(), (a[None], np.array([m]))), rel=1e-5
        )


def test_ead_high_beta_near_elastic_net_optimum_and_sparser_than_cw():
    model, x, y, _, weight, _ = linear_case(3, 6, 2)
    beta = 1.0
    ead = ElasticNet(binary_search_steps=10, steps=100, beta=beta)(model, x, y)
    cw = CarliniWagnerL2(binary_search_steps=10, steps=100)(model, x, y)
    assert ead.success.all() and cw.success.all()
    with torch.no_grad():
        z = model(x)
    d = (ead.adversarial - x).flatten(1)
    en = beta * d.abs().sum(1) + d.pow(2).sum(1)
    for i in range(6):
        other = 1 - y[i].item()
        a = (weight[other] - weight[y[i]]).numpy()
        m = (z[i, y[i]] - z[i, other]).item()
        reference = elastic_net_min(x[i].flatten().numpy(), a, m, beta)
        assert reference * (1 - 1e-6) <= en[i].item() <= reference * 1.12
    ead_norms, cw_norms = ead.norms(x), cw.norms(x)
    d_cw = (cw.adversarial - x).flatten(1)
    assert (d.abs().sum(1) < d_cw.abs().sum(1)).all()
    assert (ead_norms["l0"] < cw_norms["l0"]).all()
    assert ((d != 0).sum(1) < (d_cw != 0).sum(1)).all()


# --- negative logits ---------------------------------------------------------------------


def test_negative_logits_same_result_as_shifted_and_torchattacks_cw_stalls():
    model = mlp(4, dtype=F64)
    x = images(4, 8, dtype=F64)
    with torch.no_grad():
        y = model(x).argmax(1)
    negative = Shifted(model, -60.0).eval()
    with torch.no_grad():
        assert (negative(x) < 0).all()
    attack = CarliniWagnerL2(binary_search_steps=4, steps=40)
    ours_neg = attack(negative, x, y)
    ours = attack(model, x, y)
    # the margin is invariant to a constant shift of the logits: same attack, same result
    assert ours_neg.success.all()
    torch.testing.assert_close(ours_neg.adversarial, ours.adversarial, atol=1e-6, rtol=0)
    assert torch.equal(ours_neg.iterations, ours.iterations)
    ead_neg = ElasticNet(binary_search_steps=4, steps=40, beta=0.01, initial_const=1.0)(
        negative, x, y
    )
    ead = ElasticNet(binary_search_steps=4, steps=40, beta=0.01, initial_const=1.0)(model, x, y)
    assert ead_neg.success.all()
    torch.testing.assert_close(ead_neg.adversarial, ead.adversarial, atol=1e-6, rtol=0)
    # torchattacks' max(one_hot * logits) is 0 for every class here: no gradient, no move
    stalled = torchattacks.CW(negative, c=10.0, kappa=0, steps=40, lr=0.01)(x, y)
    with torch.no_grad():
        assert (negative(stalled).argmax(1) == y).all()
    assert torch.equal(stalled, x)


# --- the contract ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: CarliniWagnerL2(binary_search_steps=4, steps=30),
        lambda: ElasticNet(binary_search_steps=4, steps=30, beta=0.05),
        lambda: CarliniWagnerL2(binary_search_steps=3, steps=20, confidence=0.5),
    ],
)
@pytest.mark.parametrize("targeted", [False, True])
def test_batch_equals_each_sample_alone(make, targeted):
    model = mlp(5, dtype=F64)
    x = images(5, 6, dtype=F64)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 5  # already misclassified at the start: finished at once
    kwargs = {"targets": (y + 2) % 5} if targeted else {}
    labels = None if targeted else y
    attack = make()
    batch = attack(model, x, labels, **kwargs)
    for i in range(6):
        one = attack(
            model,
            x[i : i + 1],
            None if targeted else y[i : i + 1],
            **({"targets": kwargs["targets"][i : i + 1]} if targeted else {}),
        )
        torch.testing.assert_close(one.adversarial[0], batch.adversarial[i], atol=1e-9, rtol=0)
        assert one.iterations.item() == batch.iterations[i].item()
        assert one.success.item() == batch.success[i].item()
    if not targeted:
        assert batch.iterations[0] == 1 and batch.success[0]
        assert (batch.adversarial[0] - x[0]).abs().max() < 1e-6


class RowCounter(nn.Module):
    """Counts the rows (samples) the model is run on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.inner(x)


@pytest.mark.parametrize(
    "attack",
    [
        CarliniWagnerL2(binary_search_steps=3, steps=50),
        ElasticNet(binary_search_steps=3, steps=50),
    ],
)
def test_finished_samples_cost_nothing(attack):
    model = RowCounter(mlp(6))
    x = images(6, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:2] = (y[:2] + 1) % 5  # two start adversarial
    model.rows = 0
    result = attack(model, x, y)
    # one row per sample and step actually run, plus the base class's final check
    assert model.rows == result.iterations.sum().item() + 8
    assert (result.iterations[:2] == 1).all()
    assert (result.iterations <= 150).all() and result.iterations[2:].min() < 150  # early abort


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 1000),
    steps=st.integers(1, 12),
    binary=st.integers(1, 3),
    kappa=st.sampled_from([0.0, 0.3]),
    targeted=st.booleans(),
    ead=st.booleans(),
)
def test_properties(seed, steps, binary, kappa, targeted, ead):
    model = mlp(seed % 7)
    x = images(seed, 4, lo=0.0, hi=1.0)
    x[0, :, 0, 0] = 0.0  # pixels exactly at the box's faces
    x[1, :, 1, 1] = 1.0
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (4,), generator=g)
    if ead:
        attack = ElasticNet(
            binary_search_steps=binary, steps=steps, confidence=kappa, initial_const=1.0
        )
    else:
        attack = CarliniWagnerL2(
            binary_search_steps=binary, steps=steps, confidence=kappa, initial_const=1.0
        )
    result = attack(model, x, None, targets=y) if targeted else attack(model, x, y)
    adv = result.adversarial
    assert adv.shape == x.shape and adv.dtype == x.dtype and torch.isfinite(adv).all()
    assert adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        pred = model(adv).argmax(1)
    assert torch.equal(result.success, pred == y if targeted else pred != y)
    assert (result.iterations >= 1).all() and (result.iterations <= binary * steps).all()


def test_mode_restored_no_parameter_grads_and_input_untouched():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(64, 5),
    )
    model.train()
    model[1].eval()  # a submodule in its own mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images(7, 4)
    x_copy = x.clone()
    y = torch.tensor([0, 1, 2, 3])
    for attack in (
        CarliniWagnerL2(binary_search_steps=2, steps=5),
        ElasticNet(binary_search_steps=2, steps=5),
    ):
        result = attack(model, x, y)
        assert result.adversarial.data_ptr() != x.data_ptr()
        assert model.training and not model[1].training and model[3].training
        assert all(p.grad is None and p.requires_grad for p in model.parameters())
        assert torch.equal(x, x_copy)
        for k, v in model.state_dict().items():  # BN running stats untouched (eval inside)
            assert torch.equal(v, before[k]), k


def test_works_under_inference_mode_and_no_grad():
    model = mlp(8)
    with torch.inference_mode():
        x = images(8, 3)
        y = model(x).argmax(1)
        r_cw = CarliniWagnerL2(
            binary_search_steps=2, steps=10, learning_rate=0.1, initial_const=10.0
        )(model, x, y)
        r_ead = ElasticNet(binary_search_steps=2, steps=10, beta=0.01, initial_const=10.0)(
            model, x, y
        )
    with torch.no_grad():
        r_cw2 = CarliniWagnerL2(
            binary_search_steps=2, steps=10, learning_rate=0.1, initial_const=10.0
        )(model, x.clone(), y.clone())
    assert r_cw.success.all() and r_ead.success.all()
    torch.testing.assert_close(r_cw.adversarial, r_cw2.adversarial)


def test_works_under_autocast():
    model = mlp(12)
    x = images(12, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for attack in (
            CarliniWagnerL2(binary_search_steps=2, steps=10, learning_rate=0.1, initial_const=10.0),
            ElasticNet(binary_search_steps=2, steps=10, beta=0.01, initial_const=10.0),
        ):
            result = attack(model, x, y)
            assert result.adversarial.dtype == torch.float32
            assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
            assert result.success.any()
            with torch.no_grad():
                assert torch.equal(result.success, model(result.adversarial).argmax(1) != y)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_ead_with_few_steps_works_where_torchattacks_divides_by_zero(steps):
    model = mlp(9)
    x = images(9, 4)
    y = model(x).argmax(1).detach()
    result = ElasticNet(binary_search_steps=3, steps=steps, initial_const=10.0)(model, x, y)
    assert torch.isfinite(result.adversarial).all()
    assert (result.iterations <= 3 * steps).all()
    with pytest.raises(ZeroDivisionError):
        torchattacks.EADL1(model, max_iterations=steps)(x, y)


def test_side_by_side_with_torchattacks_cw_on_positive_logits():
    """At equal c, steps and learning rate, one binary-search step (torchattacks has no
    search) and no early abort on our side: success at least as high, perturbations of the
    samples both fool no larger. With the binary search, success is higher still."""
    inner = mlp(10, classes=10)
    model = Shifted(inner, 20.0).eval()
    x = images(10, 32)
    with torch.no_grad():
        assert (model(x) > 0).all()  # where torchattacks' one-hot margin is right
        y = model(x).argmax(1)
    theirs_successes = []
    for c in (0.1, 1.0):
        theirs = torchattacks.CW(model, c=c, kappa=0, steps=50, lr=0.01)(x, y)
        with torch.no_grad():
            theirs_success = model(theirs).argmax(1) != y
        theirs_successes.append(theirs_success.sum())
        ours = CarliniWagnerL2(binary_search_steps=1, steps=50, initial_const=c, abort_early=False)(
            model, x, y
        )
        assert ours.success.sum() >= theirs_success.sum() > 0
        both = ours.success & theirs_success
        ours_l2 = l2(ours, x)[both]
        theirs_l2 = (theirs - x).flatten(1).norm(dim=1)[both]
        assert ours_l2.median() <= theirs_l2.median() * 1.001
        assert (ours_l2 <= theirs_l2 * 1.001 + 1e-6).all()
    searched = CarliniWagnerL2(binary_search_steps=5, steps=50, initial_const=0.1)(model, x, y)
    assert searched.success.sum() > theirs_successes[0]  # torchattacks at the same c
    assert searched.success.sum() >= theirs_successes[1]  # and at 10x the c


@pytest.mark.parametrize(
    "attack",
    [
        CarliniWagnerL2(binary_search_steps=1, steps=1),
        ElasticNet(binary_search_steps=1, steps=1),
    ],
)
def test_sample_never_successful_is_returned_unchanged(attack):
    """With one step only the start is evaluated: correctly classified samples cannot
    succeed, and the source itself comes back."""
    model = mlp(11)
    x = images(11, 5)
    with torch.no_grad():
        y = model(x).argmax(1)
    result = attack(model, x, y)
    assert not result.success.any()
    assert torch.equal(result.adversarial, x)
    assert (result.iterations == 1).all()


def test_bad_knobs_are_named():
    with pytest.raises(ValueError, match="steps"):
        CarliniWagnerL2(steps=0)
    with pytest.raises(ValueError, match="binary_search_steps"):
        ElasticNet(binary_search_steps=1.5)
    with pytest.raises(ValueError, match="decision_rule"):
        ElasticNet(decision_rule="L2")
    with pytest.raises(ValueError, match="learning_rate"):
        CarliniWagnerL2(learning_rate=0)
    with pytest.raises(ValueError, match="labels"):
        CarliniWagnerL2()(mlp(0), images(0, 2), None)
