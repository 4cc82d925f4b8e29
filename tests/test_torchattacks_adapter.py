"""The torchattacks adapter gives torchattacks' own answer through crossres' interface."""

from __future__ import annotations

import pytest
import torch
import torchattacks
from torch import nn

from crossres.attacks.base import AttackResult
from crossres.attacks.torchattacks_adapter import TorchattacksAttack

pytestmark = pytest.mark.usefixtures("one_thread")


def small_cnn(seed: int) -> nn.Module:
    with torch.random.fork_rng():  # seeded parameters, the global RNG left as it was
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Flatten(),
            nn.Linear(6 * 8 * 8, 10),
        )


def batch(seed: int, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def reference(model, name, images, labels, *, seed, targeted=False, **kwargs):
    """torchattacks called directly on the model in eval mode, from a given RNG state."""
    model.eval()
    attack = getattr(torchattacks, name)(model, **kwargs)
    if targeted:
        attack.set_mode_targeted_by_label(quiet=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return attack(images, labels)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("FGSM", {"eps": 8 / 255}),
        ("PGD", {"eps": 8 / 255, "alpha": 2 / 255, "steps": 10}),
        ("PGD", {"eps": 16 / 255, "alpha": 4 / 255, "steps": 5, "random_start": False}),
        ("PGDL2", {"eps": 0.5, "alpha": 0.1, "steps": 5}),
    ],
)
@pytest.mark.parametrize("targeted", [False, True])
def test_adapter_equals_torchattacks_own_call(name, kwargs, targeted):
    model = small_cnn(0)
    model.train()  # the adapter must run it in eval mode and give it back in train mode
    x, y = batch(1)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        adapter = TorchattacksAttack(name, **kwargs)
        result = adapter(model, x, None, targets=y) if targeted else adapter(model, x, y)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    expected = reference(model, name, x, y, seed=5, targeted=targeted, **kwargs)
    assert isinstance(result, AttackResult)
    torch.testing.assert_close(result.adversarial, expected, atol=0, rtol=0)
    assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
    with torch.no_grad():
        pred = model.eval()(result.adversarial).argmax(1)
    assert torch.equal(result.success, pred == y if targeted else pred != y)
    assert (result.iterations == kwargs.get("steps", 1)).all()
    if name == "PGD" and not targeted:  # the attack does something here
        assert result.success.any()


def test_seeded_attacks_leave_the_global_rng_alone():
    model = small_cnn(1).eval()
    x, y = batch(2, 4)
    state = torch.get_rng_state()
    result = TorchattacksAttack("APGD", eps=8 / 255, steps=5, seed=0)(model, x, y)
    assert torch.equal(torch.get_rng_state(), state)
    assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
    assert ((result.adversarial - x).abs().amax() <= 8 / 255 + 1e-6).all()


class NoParameters(nn.Module):
    """A fixed linear map: torchattacks cannot find a device from its parameters."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("weight", torch.randn(10, 3 * 8 * 8, generator=g))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T


def test_model_without_parameters_under_inference_mode(capsys):
    model = NoParameters()
    with torch.inference_mode():
        x, y = batch(3)
        result = TorchattacksAttack("FGSM", eps=0.05)(model, x, y)
    assert "Failed to set device" not in capsys.readouterr().out
    expected = torchattacks.FGSM(model, eps=0.05)
    expected.set_device(x.device)
    torch.testing.assert_close(result.adversarial, expected(x.clone(), y.clone()))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no attack named 'NoSuchAttack'"):
        TorchattacksAttack("NoSuchAttack")
    with pytest.raises(TypeError, match="torchattacks attack"):
        TorchattacksAttack(nn.Linear)
    x, y = batch(4, 2)
    with pytest.raises(ValueError, match="DeepFool has no targeted mode"):
        TorchattacksAttack("DeepFool", steps=2)(small_cnn(2), x, None, targets=y)
    assert "PGD" in repr(TorchattacksAttack(torchattacks.PGD, eps=0.1))
