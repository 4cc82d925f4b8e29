"""ArcFace IResNet: layout against the published architecture (parameter counts derived by
hand) and against insightface's own ``iresnet.py`` (tests/fixtures/insightface_iresnet.py,
verbatim): same weights, same outputs; its ``backbone.pth`` state dicts load as they are."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from crossres.models import WeightFileError, build_model
from crossres.models.arcface import ARCFACE_LAYERS, ArcFaceIResNet
from random_weights import randomise

FIXTURE = Path(__file__).parent / "fixtures" / "insightface_iresnet.py"
# arcface_torch's iresnet.py runs its forward under torch.cuda.amp.autocast (deprecated alias)
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.cuda.amp.autocast:FutureWarning")


def insightface():
    spec = importlib.util.spec_from_file_location("insightface_iresnet", FIXTURE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expected_parameters(layers: tuple[int, int, int, int]) -> int:
    """Parameters of the arcface_torch IResNet, from its description:

    stem: conv3x3 3->64 (no bias) + BN(64) (weight, bias) + PReLU(64) (one slope per channel)
    each IBasicBlock(i -> p): BN(i) + conv3x3 i->p + BN(p) + PReLU(p) + conv3x3 p->p + BN(p);
        the first block of every stage (stride 2) adds the shortcut conv1x1 i->p + BN(p)
    stages: widths 64, 128, 256, 512, inputs 64, 64, 128, 256
    head: BN2d(512) + Linear(512*7*7 -> 512, with bias) + BatchNorm1d(512)
    """
    stem = 3 * 64 * 9 + 2 * 64 + 64
    total = stem
    inplanes = 64
    for blocks, p in zip(layers, (64, 128, 256, 512), strict=True):
        for b in range(blocks):
            i = inplanes if b == 0 else p
            total += 2 * i + 9 * i * p + 2 * p + p + 9 * p * p + 2 * p
            if b == 0:
                total += i * p + 2 * p
        inplanes = p
    head = 2 * 512 + (512 * 7 * 7 * 512 + 512) + 2 * 512
    return total + head


@pytest.mark.parametrize("depth", [18, 34, 50, 100])
def test_parameter_count_is_the_architectures(depth):
    model = build_model(f"arcface_iresnet{depth}")
    count = sum(p.numel() for p in model.parameters())
    assert count == expected_parameters(ARCFACE_LAYERS[depth])


@pytest.mark.parametrize("depth", [18, 100])
def test_state_dict_names_and_shapes_are_insightfaces(depth):
    ours = ArcFaceIResNet(depth).net.state_dict()
    theirs = getattr(insightface(), f"iresnet{depth}")().state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in theirs.items()
    }


@pytest.fixture(scope="module")
def reference_r18():
    torch.manual_seed(0)
    net = insightface().iresnet18().eval()
    randomise(net, seed=1)
    return net


def test_same_weights_same_output_as_insightface(reference_r18, tmp_path, one_thread):
    path = tmp_path / "backbone.pth"
    torch.save(reference_r18.state_dict(), path)  # what arcface_torch's training writes
    model = build_model("arcface_iresnet18", weights=str(path))
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference_r18((x - 0.5) / 0.5)  # arcface_torch's inference.py preprocessing
        got = model.features(x)
    assert got.shape == (2, 512)
    # measured: exactly 0 on three inputs (the same operations in the same order); the bound
    # leaves room for a kernel that reorders float32 sums (~1e-7 relative)
    assert (got - expected).abs().max().item() <= 1e-6 * expected.abs().max().item()
    assert model.pretrained_cfg.weights_hash != ""


def test_loads_module_prefix_and_fp16_tensors(reference_r18, tmp_path, one_thread):
    half = {
        f"module.{k}": v.half() if v.is_floating_point() else v
        for k, v in reference_r18.state_dict().items()
    }
    path = tmp_path / "backbone.pth"
    torch.save(half, path)
    model = build_model("arcface_iresnet18", weights=str(path))
    ours = model.net.state_dict()
    for name, value in half.items():
        mine = ours[name.removeprefix("module.")]
        assert mine.dtype == (torch.float32 if value.is_floating_point() else value.dtype)
        assert torch.equal(mine, value.to(mine.dtype)), name


def test_mismatched_weights_list_every_problem_in_one_error(reference_r18, tmp_path):
    state = dict(reference_r18.state_dict())
    del state["layer2.1.conv1.weight"]  # truncated
    del state["features.running_var"]
    state["fc.weight"] = torch.zeros(512, 512)  # as if the head were for another input size
    state["head.kernel"] = torch.zeros(512, 10)  # a margin-loss head saved with the backbone
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    with pytest.raises(WeightFileError) as info:
        build_model("arcface_iresnet18", weights=str(path))
    problems = info.value.problems
    assert len(problems) == 4, problems
    text = str(info.value)
    for key in ("net.layer2.1.conv1.weight", "net.features.running_var", "head.kernel"):
        assert key in text
    assert "net.fc.weight: shape mismatch, model expects [512, 25088], file has [512, 512]" in text


def test_wrong_input_size_names_the_size(one_thread):
    model = build_model("arcface_iresnet18")
    with pytest.raises(ValueError, match="112x112"):
        model.features(torch.rand(1, 3, 96, 96))


def test_pretrained_config_and_unknown_depth():
    cfg = build_model("arcface_iresnet18").pretrained_cfg
    assert (cfg.input_size, cfg.resize_shortest, cfg.feature_dim, cfg.num_classes) == (
        (3, 112, 112),
        None,
        512,
        0,
    )
    with pytest.raises(ValueError, match="depth"):
        ArcFaceIResNet(depth=152)
