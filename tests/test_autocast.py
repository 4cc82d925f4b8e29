"""Mixed precision as an option: ``autocast="bfloat16"`` runs the model calls under CPU
bf16 autocast, and the attacks reach the same verdicts as in fp32.

CW and EAD keep their best bf16-successful iterate, which at kappa = 0 sits on the decision
boundary, where a bf16 logit error (measured below: ~0.02 on logits of ~5 for the linear
models) can flip the full-precision verdict (the base class recomputes success in full
precision, so such a sample honestly fails; measured at kappa = 0: 1-5 of 6 samples). With
a confidence kappa of 10x the measured bf16 logit error they agree with fp32 on every
sample. JSMA and DR stop at their first success, which they confirm at full precision, so
they agree as they are (without the confirmation, JSMA on the tiny model below lost 10 of
16 successes).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crossres.attacks import JSMA, CarliniWagnerL2, DeepRepresentation, ElasticNet
from crossres.callbacks.attack import attack_params
from crossres.models.tiny import TinyFaceNet
from crossres.types import Gallery
from test_cw_ead import linear_case
from test_dr import LinearFeatures, orthogonal, source_images

pytestmark = pytest.mark.usefixtures("one_thread")
BF16 = "bfloat16"


def bf16_logit_error(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x).float()
    return float((full - half).abs().max())


@pytest.mark.parametrize("kind", [CarliniWagnerL2, ElasticNet])
@pytest.mark.parametrize("classes", [2, 4])
def test_cw_ead_agree_with_fp32_on_linear_models(kind, classes):
    model, x, y, minimal, *_ = linear_case(0, 6, classes)
    model, x = model.float(), x.float()
    kappa = 10 * bf16_logit_error(model, x)  # measured 0.015-0.02
    assert 0 < kappa < 1
    knobs = {"binary_search_steps": 10, "steps": 100, "confidence": kappa}
    if kind is ElasticNet:
        knobs["beta"] = 1e-3
    full = kind(**knobs)(model, x, y)
    half = kind(**knobs, autocast=BF16)(model, x, y)
    assert full.success.all() and torch.equal(half.success, full.success)
    # L2 ratio bf16/fp32 measured within 0.5% of 1
    ratio = half.norms(x)["l2"] / full.norms(x)["l2"]
    assert ((ratio - 1).abs() < 0.05).all(), ratio
    assert (half.norms(x)["l2"] >= minimal.float() * (1 - 1e-3)).all()  # never below the optimum


class Linear(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T


def test_jsma_agrees_with_fp32_on_a_linear_model():
    gen = torch.Generator().manual_seed(1)
    model = Linear(torch.randn(10, 48, generator=gen))
    x = 0.25 + 0.5 * torch.rand(8, 3, 4, 4, generator=gen)
    with torch.no_grad():
        labels = model(x).argmax(1)
    attack = {"max_iter": 300, "theta": 0.1, "max_perturbations_per_pixel": 10}
    full = JSMA(**attack)(model, x, labels)
    half = JSMA(**attack, autocast=BF16)(model, x, labels)
    assert full.success.all() and torch.equal(half.success, full.success)
    # the same components, or one more/fewer where bf16 reorders near-equal gradients
    l0_full, l0_half = full.norms(x)["l0"], half.norms(x)["l0"]
    assert ((l0_full - l0_half).abs() <= 1).all(), (l0_full, l0_half)


@pytest.mark.parametrize("factor", [0.95, 1.05])
def test_dr_agrees_with_fp32_on_the_analytic_bound(factor):
    """Orthogonal linear features: success iff epsilon exceeds |delta|^2 / (2 |delta|_1)
    (see test_dr); 5% either side of it, bf16 and fp32 both follow the bound."""
    model = LinearFeatures(orthogonal(3).float())
    x = source_images(4, 4).float()
    gen = torch.Generator().manual_seed(5)
    delta = (0.2 + 0.1 * torch.rand(x.shape, generator=gen)) * torch.sign(
        torch.randn(x.shape, generator=gen)
    )
    bound = (delta.flatten(1) ** 2).sum(1) / (2 * delta.flatten(1).abs().sum(1))
    with torch.no_grad():
        own, goal = model.features(x), model.features(x + delta)
    for i in range(4):
        gallery = Gallery(torch.stack([own[i], goal[i]]), torch.tensor([0, 1]))
        for autocast in (None, BF16):
            attack = DeepRepresentation(
                epsilon=float(bound[i]) * factor, steps=200, autocast=autocast
            )
            result = attack(model, x[i : i + 1], torch.tensor([1]), gallery=gallery)
            assert result.success.item() == (factor > 1), (i, autocast)


def test_tiny_face_model_within_the_measured_tolerance():
    """A small conv face model (conv, batch norm, pooling under bf16), 16 samples. Measured
    (fp32 successes, bf16 successes, verdicts that differ, median L2 ratio bf16/fp32 over
    the samples both won): CW 16, 14, 2, 1.004; EAD 16, 15, 1, 0.987; JSMA 16, 16, 0, 0.984;
    DR 16, 16, 0, 0.827 (L-BFGS-B takes another path to another accepted point). Stated
    tolerance: at most 4 of 16 verdicts differ, bf16 keeps >= 3/4 of the successes, median
    L2 ratio within 40% of 1."""
    g = torch.Generator().manual_seed(0)
    model = TinyFaceNet(input_size=32, num_classes=10, seed=0).eval()
    x = torch.rand(16, 3, 32, 32, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
        gallery = Gallery(model.features(torch.rand(10, 3, 32, 32, generator=g)), torch.arange(10))
    attacks = {
        "cw": lambda a: CarliniWagnerL2(
            binary_search_steps=3, steps=20, learning_rate=0.05, initial_const=1.0, autocast=a
        )(model, x, y),
        "ead": lambda a: ElasticNet(
            binary_search_steps=3,
            steps=20,
            beta=0.001,
            learning_rate=0.1,
            initial_const=10.0,
            autocast=a,
        )(model, x, y),
        "jsma": lambda a: JSMA(max_iter=300, theta=0.5, untargeted_target="runner_up", autocast=a)(
            model, x, y
        ),
        "dr": lambda a: DeepRepresentation(epsilon=8 / 255, steps=20, autocast=a)(
            model, x, (y + 1) % 10, gallery=gallery
        ),
    }
    for name, run in attacks.items():
        full, half = run(None), run(BF16)
        assert full.success.sum() >= 4, name  # the comparison means something
        differ = int((full.success != half.success).sum())
        assert differ <= 4, (name, differ)
        assert half.success.sum() >= 0.75 * full.success.sum(), name
        both = full.success & half.success
        l2_full = full.norms(x)["l2"][both].median()
        l2_half = half.norms(x)["l2"][both].median()
        assert abs(float(l2_half / l2_full) - 1) < 0.4, (name, float(l2_half / l2_full))


class Recorder(nn.Module):
    """A linear classifier that records whether autocast was on at each call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(48, 3)
        self.seen: list[bool] = []

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.is_autocast_enabled("cpu"))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize(
    "make",
    [
        lambda a: CarliniWagnerL2(binary_search_steps=1, steps=3, autocast=a),
        lambda a: ElasticNet(binary_search_steps=1, steps=3, autocast=a),
        lambda a: JSMA(max_iter=3, autocast=a),
        lambda a: DeepRepresentation(epsilon=0.01, steps=2, autocast=a),
    ],
    ids=["cw", "ead", "jsma", "dr"],
)
def test_model_calls_under_autocast_final_check_not_and_params_record_it(make):
    model = Recorder().eval()
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1])
    gallery = Gallery(
        torch.randn(3, 3, generator=torch.Generator().manual_seed(1)), torch.arange(3)
    )
    for autocast in (None, BF16):
        attack = make(autocast)
        model.seen.clear()
        if isinstance(attack, DeepRepresentation):
            result = attack(model, x, (labels + 1) % 3, gallery=gallery)
        else:
            result = attack(model, x, labels)
        assert model.seen[-1] is False  # the final verdict in full precision
        if autocast is None:
            assert not any(model.seen)
        else:  # the attack's calls under autocast; full precision only for the final check
            # and the confirmations of a first success (JSMA, DR: at most one per sample)
            assert model.seen[0] and model.seen.count(False) <= 1 + x.shape[0], model.seen
        assert result.adversarial.dtype == torch.float32
        assert attack_params(attack)["autocast"] == autocast


@pytest.mark.parametrize("kind", [CarliniWagnerL2, ElasticNet, JSMA])
def test_bad_autocast_is_named(kind):
    with pytest.raises(ValueError, match="autocast"):
        kind(autocast="float8")
    with pytest.raises(ValueError, match="autocast"):
        DeepRepresentation(epsilon=0.1, autocast="fp16")
