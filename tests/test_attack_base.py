"""The base class hands back the model's outputs on the returned images, so the benchmark
never runs the model on them again; they must be exactly what the model says."""

import torch

from crossres.attacks import CarliniWagnerL2, DeepRepresentation
from crossres.models.tiny import TinyFaceNet
from crossres.types import Gallery


def test_outputs_on_the_adversarial_images_come_back():
    model = TinyFaceNet(input_size=16, num_classes=5, seed=3).eval()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = CarliniWagnerL2(binary_search_steps=1, steps=3)(model, x, model(x).argmax(1))
    with torch.no_grad():
        features, logits = model.features_and_logits(result.adversarial)
    torch.testing.assert_close(result.extra["logits"], logits)
    torch.testing.assert_close(result.extra["features"], features)
    assert torch.equal(result.success, logits.argmax(1) != model(x).argmax(1))


def test_a_pure_embedder_gives_features_only():
    model = TinyFaceNet(input_size=16, seed=4).eval()  # no classifier
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    gallery = Gallery(
        torch.randn(4, 32, generator=torch.Generator().manual_seed(2)), torch.arange(4)
    )
    result = DeepRepresentation(epsilon=0.05, steps=3)(
        model, x, torch.tensor([0, 1, 2]), gallery=gallery
    )
    with torch.no_grad():
        torch.testing.assert_close(result.extra["features"], model.features(result.adversarial))
    assert "logits" not in result.extra
