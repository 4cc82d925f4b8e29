"""Attacks in the low-resolution space through ``LowResolutionInput``: the wrapper is the model
on the PIL pipeline's input, every attack runs through it unchanged with its budget held on the
low-resolution pixels, and it is the model-input attack when the capture is the model input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from crossres.attacks import (
    JSMA,
    CarliniWagnerL2,
    DeepRepresentation,
    ElasticNet,
    TorchattacksAttack,
)
from crossres.datamodules.resolution import ResolutionTransform
from crossres.models.base import GalleryClassifier
from crossres.models.low_resolution import LowResolutionInput
from crossres.models.resampling import upsample_to_model_input
from crossres.models.tiny import TinyFaceNet
from crossres.types import Gallery

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 6
#: the pipeline's uint8 rounding bound (see tests/test_resolution.py)
UINT8_ATOL = 2 / 255


def tiny(*, resize_shortest: int | None = None, seed: int = 0) -> TinyFaceNet:
    """A 32 px tiny model; with ``resize_shortest`` it asks for resize + centre crop, as the
    VGGFace2 models do (the network itself takes any size).

    Freshly seeded, its BatchNorm statistics are the defaults and its output hardly depends on
    the input (every attack fails): the statistics are calibrated on random images and the
    classifier made steeper, so that attacks succeed and the success checks mean something.
    """
    model = TinyFaceNet(input_size=32, feature_dim=16, num_classes=CLASSES, seed=seed)
    model.pretrained_cfg = dataclasses.replace(
        model.pretrained_cfg, resize_shortest=resize_shortest
    )
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batch
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(123)))
        model.fc.weight.mul_(10.0)
    return model.eval()


def captures(wrapper: LowResolutionInput, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, *wrapper.low_resolution_size, generator=gen)


def predictions(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def nearest_ids(features: torch.Tensor, gallery: Gallery) -> torch.Tensor:
    """1-NN by brute force (independent of crossres' knn_predict)."""
    d = torch.cdist(features.double(), gallery.features.double())
    return gallery.ids[d.argmin(1)]


def gallery_for(model, seed: int) -> Gallery:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        feats = model.features(torch.rand(8, 3, 32, 32, generator=gen))
    return Gallery(feats, torch.arange(8))


def pil_image(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


ATTACKS = {
    "jsma": lambda: JSMA(max_iter=20, theta=0.3, untargeted_target="runner_up"),
    "cw": lambda: CarliniWagnerL2(binary_search_steps=3, steps=15, initial_const=1.0),
    "ead": lambda: ElasticNet(binary_search_steps=3, steps=15, initial_const=1.0),
    "pgd": lambda: TorchattacksAttack(
        "PGD", eps=8 / 255, alpha=2 / 255, steps=5, random_start=False
    ),
    "dr": lambda: DeepRepresentation(epsilon=0.05, steps=10),
}


def run_attack(name: str, model, x: torch.Tensor, *, gallery: Gallery | None = None):
    attack = ATTACKS[name]()
    if name == "dr":
        with torch.no_grad():
            own = nearest_ids(model.features(x), gallery)
        targets = (own + 1) % len(gallery)
        return attack(model, x, targets, gallery=gallery), targets
    labels = predictions(model, x)
    return attack(model, x, labels), labels


@pytest.mark.parametrize("resize_shortest", [None, 36])
def test_the_wrapper_is_the_model_on_the_pipelines_input(resize_shortest):
    model = tiny(resize_shortest=resize_shortest)
    img = pil_image(0, 47, 61)
    for r in (0, 5, 12, 47, 80):
        wrapper = LowResolutionInput(model, (61, 47), resolution=r)
        tf = ResolutionTransform.from_config(model.pretrained_cfg, r)
        small = tf.low_resolution(img).unsqueeze(0)
        # its config reproduces its input from the original exactly (PIL's straight resize)
        same = ResolutionTransform.from_config(wrapper.pretrained_cfg, 0)(img).unsqueeze(0)
        torch.testing.assert_close(same, small, rtol=0, atol=0)
        assert wrapper.pretrained_cfg.input_size == (3, *small.shape[-2:])
        # upsampled, it is the PIL pipeline's model input (within PIL's uint8 rounding)
        up = wrapper.to_model_input(small)
        assert float((up - tf(img).unsqueeze(0)).abs().max()) < UINT8_ATOL
        with torch.no_grad():
            f, logits = wrapper.features_and_logits(small)
            torch.testing.assert_close(f, model.features(up), rtol=0, atol=0)
            torch.testing.assert_close(logits, model(up), rtol=0, atol=0)
            torch.testing.assert_close(wrapper(small), logits, rtol=0, atol=0)
            torch.testing.assert_close(wrapper.features(small), f, rtol=0, atol=0)
        assert wrapper.num_classes == CLASSES


def test_a_gallery_classifier_over_the_wrapper_reads_the_upsampled_features():
    model = tiny(resize_shortest=36)
    wrapper = LowResolutionInput(model, (50, 40), resolution=8)
    x = captures(wrapper, 3, 0)
    templates = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    clf = GalleryClassifier(wrapper, templates)
    with torch.no_grad():
        f = model.features(upsample_to_model_input(x, (50, 40), input_size=32, resize_shortest=36))
        torch.testing.assert_close(clf.features(x), f, rtol=0, atol=0)
        expected = (
            30.0
            * torch.nn.functional.normalize(f, dim=1)
            @ (torch.nn.functional.normalize(templates, dim=1).T)
        )
        torch.testing.assert_close(clf(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_attack_crafts_on_the_low_resolution_pixels(name):
    model = tiny(resize_shortest=36)
    wrapper = LowResolutionInput(model, (45, 38), resolution=10)
    x = captures(wrapper, 4, 1)
    gallery = gallery_for(model, 2)
    result, goal = run_attack(name, wrapper, x, gallery=gallery)
    adv = result.adversarial
    assert adv.shape == x.shape == (4, 3, 11, 10)
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    assert (adv != x).any()  # it moved the capture's own pixels
    # success, recomputed on the wrapped model's PIL-geometry input by an independent reading
    up = upsample_to_model_input(adv, (45, 38), input_size=32, resize_shortest=36)
    with torch.no_grad():
        if name == "dr":
            expected = nearest_ids(model.features(up), gallery) == goal
        else:
            expected = model(up).argmax(1) != goal
    assert torch.equal(result.success, expected)
    assert result.success.any(), f"{name} fooled nothing: too weak a test"
    # norms are measured in the space the attack worked in
    assert result.norms(x)["linf"].shape == (4,)


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 1000),
    h=st.integers(12, 60),
    w=st.integers(12, 60),
    r=st.integers(4, 70),
    epsilon=st.floats(1 / 255, 0.1),
    resize_shortest=st.sampled_from([None, 36]),
)
def test_dr_and_pgd_keep_their_linf_bound_in_the_low_resolution_space(
    seed, h, w, r, epsilon, resize_shortest
):
    model = tiny(resize_shortest=resize_shortest)
    wrapper = LowResolutionInput(model, (h, w), resolution=r)
    x = captures(wrapper, 3, seed)
    gallery = gallery_for(model, seed + 1)
    with torch.no_grad():
        targets = (nearest_ids(wrapper.features(x), gallery) + 1) % len(gallery)
    dr = DeepRepresentation(epsilon=epsilon, steps=5)(wrapper, x, targets, gallery=gallery)
    pgd = TorchattacksAttack("PGD", eps=epsilon, alpha=epsilon / 2, steps=3)(
        wrapper, x, predictions(wrapper, x)
    )
    for result in (dr, pgd):
        adv = result.adversarial
        assert adv.shape == x.shape
        assert float((adv - x).abs().max()) <= epsilon + 1e-6
        assert float(adv.min()) >= 0 and float(adv.max()) <= 1


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 1000),
    h=st.integers(12, 60),
    w=st.integers(12, 60),
    r=st.integers(4, 70),
    resize_shortest=st.sampled_from([None, 36]),
)
def test_cw_and_ead_stay_in_the_pixel_box_of_the_low_resolution_space(
    seed, h, w, r, resize_shortest
):
    model = tiny(resize_shortest=resize_shortest)
    wrapper = LowResolutionInput(model, (h, w), resolution=r)
    # captures near the box's faces, where an unconstrained step would leave it
    x = captures(wrapper, 3, seed).round().clamp(0.02, 0.98)
    labels = predictions(wrapper, x)
    for attack in (
        CarliniWagnerL2(binary_search_steps=2, steps=8, initial_const=10.0),
        ElasticNet(binary_search_steps=2, steps=8, initial_const=10.0),
    ):
        adv = attack(wrapper, x, labels).adversarial
        assert adv.shape == x.shape
        assert float(adv.min()) >= 0 and float(adv.max()) <= 1


@pytest.mark.parametrize("name", ["jsma", "cw", "ead", "dr"])
@pytest.mark.parametrize("r", [0, 32, 50])
def test_at_full_resolution_the_low_resolution_attack_is_the_model_input_attack(name, r):
    """A 32x32 face for a 32 px model with a straight resize: when ``r`` leaves it alone the
    capture is the model input, and a deterministic attack must give the same images."""
    model = tiny()
    wrapper = LowResolutionInput(model, (32, 32), resolution=r)
    assert wrapper.low_resolution_size == (32, 32)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 32, 32, generator=gen)
    gallery = gallery_for(model, 4)
    ours, _ = run_attack(name, wrapper, x, gallery=gallery)
    theirs, _ = run_attack(name, model, x, gallery=gallery)
    assert (theirs.adversarial != x).any()  # the attack did something to compare
    torch.testing.assert_close(ours.adversarial, theirs.adversarial, rtol=0, atol=1e-6)
    assert torch.equal(ours.success, theirs.success)


def test_bad_inputs_are_refused():
    model = tiny()
    wrapper = LowResolutionInput(model, (40, 30), resolution=8)
    assert wrapper.low_resolution_size == (10, 8)
    with pytest.raises(ValueError, match=r"\[B, 3, 10, 8\].*original \(40, 30\) at resolution 8"):
        wrapper(torch.rand(2, 3, 8, 10))
    with pytest.raises(ValueError, match="resolution must be >= 0"):
        LowResolutionInput(model, (40, 30), resolution=-1)
    with pytest.raises(ValueError, match="original_size"):
        LowResolutionInput(model, (40,), resolution=8)
    with pytest.raises(TypeError, match="needs a FaceModel"):
        LowResolutionInput(torch.nn.Linear(3, 3), (40, 30), resolution=8)
