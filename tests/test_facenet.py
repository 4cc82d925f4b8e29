"""FaceNet InceptionResnetV1 against facenet-pytorch's own module: same state-dict names and
shapes, and with the same random weights the same embedding and logits on the same input.

facenet-pytorch pins an old torch, so it is never a dependency: it is installed here with
``pip install --no-deps --target`` into the crossres cache (once; later runs reuse it) and
only its model file is used. Without PyPI the comparison is skipped, saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crossres.models import WeightFileError, build_model
from crossres.models.facenet import FaceNetInceptionResnetV1
from crossres.paths import cache_dir
from random_weights import randomise

FACENET_PYTORCH = "facenet-pytorch==2.6.0"


def install_facenet_pytorch() -> Path:
    """facenet-pytorch's files (no dependencies) under the crossres cache, installed once."""
    target = cache_dir("test-deps") / FACENET_PYTORCH.replace("==", "-")
    if (target / "facenet_pytorch" / "models" / "inception_resnet_v1.py").is_file():
        return target
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check"]
    try:
        proc = subprocess.run(
            [*cmd, "--target", str(partial), FACENET_PYTORCH],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        shutil.rmtree(partial, ignore_errors=True)
        pytest.skip(f"pip install {FACENET_PYTORCH} took over 300 s (PyPI unreachable?)")
    if proc.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        pytest.skip(f"could not install {FACENET_PYTORCH} from PyPI: {tail[0]}")
    shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(partial, target)  # a whole install appears at once, or not at all
    except OSError:  # another process installed it first
        shutil.rmtree(partial, ignore_errors=True)
    return target


@pytest.fixture(scope="module")
def facenet_pytorch():
    """facenet-pytorch's ``inception_resnet_v1`` module."""
    root = install_facenet_pytorch()
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        try:
            from facenet_pytorch.models import inception_resnet_v1
        except ImportError as err:  # its package __init__ imports torchvision, PIL, requests
            pytest.skip(f"facenet-pytorch installed but does not import here: {err}")
    return inception_resnet_v1


def shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("classes", [8631, 10575, 0])
def test_state_dict_names_and_shapes_are_facenet_pytorchs(facenet_pytorch, classes):
    theirs = facenet_pytorch.InceptionResnetV1(classify=classes > 0, num_classes=classes or None)
    assert shapes(FaceNetInceptionResnetV1(classes).net.state_dict()) == shapes(theirs.state_dict())


@pytest.fixture(scope="module")
def reference(facenet_pytorch):
    """facenet-pytorch's module with random weights and BN statistics, as VGGFace2's release."""
    torch.manual_seed(0)
    net = facenet_pytorch.InceptionResnetV1(classify=True, num_classes=8631).eval()
    randomise(net, seed=3)
    return net


@pytest.fixture(scope="module")
def weight_file(reference, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("facenet") / "20180402-114759-vggface2.pt"
    torch.save(reference.state_dict(), path)  # the released files are plain state dicts
    return path


def test_same_weights_same_outputs_as_facenet_pytorch(reference, weight_file, one_thread):
    model = build_model("facenet_vggface2", weights=str(weight_file))
    assert model.num_classes == 8631
    x = torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(4))
    prepared = (255.0 * x - 127.5) / 128.0  # facenet-pytorch's fixed_image_standardization
    with torch.no_grad():
        reference.classify = False
        embedding = reference(prepared)
        reference.classify = True
        logits = reference(prepared)
        features, our_logits = model.features_and_logits(x)
        alone = model.features(x), model(x)
    # measured: exactly 0 for both on three inputs (same operations, same order); the bounds leave
    # room for a kernel that reorders float32 sums
    assert (features - embedding).abs().max().item() < 1e-6
    assert (our_logits - logits).abs().max().item() < 1e-6 * logits.abs().max().item()
    assert torch.equal(alone[0], features) and torch.equal(alone[1], our_logits)
    assert torch.allclose(features.norm(dim=1), torch.ones(2))


@pytest.fixture(scope="module")
def release_state() -> dict:
    """A state dict shaped as the VGGFace2 release (our own module: no facenet-pytorch needed)."""
    net = FaceNetInceptionResnetV1(8631).net
    randomise(net, seed=5)
    return dict(net.state_dict())


def test_casia_takes_its_class_count_from_the_file(release_state, tmp_path):
    state = dict(release_state)
    state["logits.weight"] = torch.zeros(10575, 512)
    state["logits.bias"] = torch.zeros(10575)
    path = tmp_path / "20180408-102900-casia-webface.pt"
    torch.save(state, path)
    assert build_model("facenet_casia", weights=str(path)).num_classes == 10575
    assert build_model("facenet_casia").num_classes == 10575  # no file: the release's head


def test_file_without_logits_gives_a_pure_embedder(release_state, tmp_path, one_thread):
    state = {k: v for k, v in release_state.items() if not k.startswith("logits.")}
    path = tmp_path / "embedder.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    model = build_model("facenet_vggface2", weights=str(path))
    assert model.num_classes == 0 and model.net.logits is None
    x = torch.rand(1, 3, 160, 160)
    assert model.features(x).shape == (1, 512)
    with pytest.raises(TypeError, match="GalleryClassifier"):
        model(x)


def test_classify_refuses_normalised_features():
    model = build_model("facenet_vggface2")
    with pytest.raises(TypeError, match="before L2 normalisation"):
        model.classify(torch.zeros(1, 512))


def test_mismatched_weights_list_every_problem_in_one_error(release_state, tmp_path):
    state = dict(release_state)
    del state["repeat_2.3.branch1.1.conv.weight"]
    state["last_linear.weight"] = torch.zeros(512, 1024)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(WeightFileError) as info:
        build_model("facenet_vggface2", weights=str(path))
    text = str(info.value)
    assert len(info.value.problems) == 2, info.value.problems
    assert "net.repeat_2.3.branch1.1.conv.weight: missing from the file" in text
    assert "net.last_linear.weight: shape mismatch, model expects [512, 1792]" in text


def test_pretrained_config():
    cfg = build_model("facenet_vggface2").pretrained_cfg
    assert (cfg.input_size, cfg.resize_shortest, cfg.feature_dim) == ((3, 160, 160), None, 512)
    x = torch.rand(1, 3, 4, 4)
    model = build_model("facenet_vggface2")
    assert torch.allclose(model.normalize(x), (255 * x - 127.5) / 128, atol=1e-6)


def test_num_classes_0_checks_then_drops_the_files_head(release_state, tmp_path, one_thread):
    path = tmp_path / "20180402-114759-vggface2.pt"
    torch.save(release_state, path)
    with_head = build_model("facenet_vggface2", weights=str(path))
    embedder = build_model("facenet_vggface2", weights=str(path), num_classes=0)
    assert embedder.num_classes == 0 and "net.logits.weight" not in embedder.state_dict()
    assert embedder.pretrained_cfg.weights_hash == with_head.pretrained_cfg.weights_hash != ""
    x = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(embedder.features(x), with_head.features(x))
    with pytest.raises(WeightFileError, match="logits.weight: shape mismatch"):
        build_model("facenet_vggface2", weights=str(path), num_classes=100)
