"""SEResNet50 against the VGGFace2 ``senet50_ft`` layout as DATA_SOURCES.md describes it.

The expected names and shapes are generated here from the layout's rules (stem, 3-4-6-3
bottlenecks of widths 64-128-256-512 x4, SE /16 with biased convs, 1x1 projection on the
first block, 2048 -> 8631 fc), not read back from the module.
"""

from __future__ import annotations

import pytest
import torch

from crossres.models.senet import VGGFACE2_MEAN_BGR, SEResNet50


def _bn(name: str, c: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{name}.weight": (c,),
        f"{name}.bias": (c,),
        f"{name}.running_mean": (c,),
        f"{name}.running_var": (c,),
        f"{name}.num_batches_tracked": (),
    }


def senet50_ft_layout(num_classes: int = 8631) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry of VGGFace2's senet50_ft (PyTorch port) with its shape."""
    exp: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    inplanes = 64
    for stage, (blocks, width) in enumerate(
        zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True), start=1
    ):
        out, squeeze = 4 * width, 4 * width // 16
        for b in range(blocks):
            p = f"layer{stage}.{b}."
            cin = inplanes if b == 0 else out
            exp[p + "conv1.weight"] = (width, cin, 1, 1)
            exp.update(_bn(p + "bn1", width))
            exp[p + "conv2.weight"] = (width, width, 3, 3)
            exp.update(_bn(p + "bn2", width))
            exp[p + "conv3.weight"] = (out, width, 1, 1)
            exp.update(_bn(p + "bn3", out))
            exp[p + "conv4.weight"] = (squeeze, out, 1, 1)
            exp[p + "conv4.bias"] = (squeeze,)
            exp[p + "conv5.weight"] = (out, squeeze, 1, 1)
            exp[p + "conv5.bias"] = (out,)
            if b == 0:
                exp[p + "downsample.0.weight"] = (out, cin, 1, 1)
                exp.update(_bn(p + "downsample.1", out))
        inplanes = out
    exp["fc.weight"] = (num_classes, 2048)
    exp["fc.bias"] = (num_classes,)
    return exp


def condition(model: SEResNet50) -> SEResNet50:
    """Random but trained-looking state: BN statistics away from identity (so eval-mode BN
    matters) and small residual-branch gains, so the deep random net is not chaotic and float
    rounding differences stay at rounding level."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.05, 0.2) if name.endswith("bn3") else mod.weight.uniform_(
                    0.5, 1.0
                )
                mod.bias.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> SEResNet50:
    torch.manual_seed(0)
    return condition(SEResNet50())


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def outputs(model, x) -> dict:
    """One forward at 224 (slow on a shared CPU), with the stage output shapes recorded."""
    shapes = {}
    hooks = [
        getattr(model, n).register_forward_hook(
            lambda _m, _i, out, n=n: shapes.__setitem__(n, tuple(out.shape[1:]))
        )
        for n in ("maxpool", "layer1", "layer2", "layer3", "layer4")
    ]
    try:
        with torch.no_grad():
            feats, logits = model.features_and_logits(x)
    finally:
        for h in hooks:
            h.remove()
    return {"shapes": shapes, "features": feats, "logits": logits}


def test_state_dict_names_and_shapes_equal_the_senet50_ft_layout(model):
    expected = senet50_ft_layout()
    found = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(found) == sorted(expected)
    assert found == expected
    # The public pkl holds every entry except BatchNorm's counters: 331 of 384.
    assert len(expected) == 384
    assert len([k for k in expected if not k.endswith("num_batches_tracked")]) == 331


def test_parameter_counts(model):
    total = sum(p.numel() for p in model.parameters())
    no_fc = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("fc."))
    assert total == 43_723_943
    assert no_fc == 26_039_024


def test_caffe_details_stride_pooling_eps(model):
    for stage in (2, 3, 4):
        block = getattr(model, f"layer{stage}")[0]
        assert block.conv1.stride == (2, 2)  # the stride sits on the first 1x1 conv ...
        assert block.conv2.stride == (1, 1)  # ... not on the 3x3 (timm/torchvision)
        assert block.downsample[0].stride == (2, 2)
    assert model.layer1[0].conv1.stride == (1, 1)
    assert model.maxpool.ceil_mode and model.maxpool.padding == 0
    assert model.maxpool.kernel_size == 3 and model.maxpool.stride == 2
    assert model.avgpool.kernel_size == 7
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_stage_shapes_features_and_logits_at_224(model, outputs):
    assert outputs["shapes"] == {
        "maxpool": (64, 56, 56),
        "layer1": (256, 56, 56),
        "layer2": (512, 28, 28),
        "layer3": (1024, 14, 14),
        "layer4": (2048, 7, 7),
    }
    feats, logits = outputs["features"], outputs["logits"]
    assert feats.shape == (1, 2048) and logits.shape == (1, 8631)
    with torch.no_grad():
        assert torch.equal(model.classify(feats), logits)
    assert torch.isfinite(logits).all()


def test_normalisation_is_bgr_0_255_minus_vggface2_mean(model):
    x = torch.tensor([[[[0.0, 1.0]], [[0.5, 0.25]], [[1.0, 0.2]]]])  # [1, 3, 1, 2] RGB
    # By hand: channel 0 of the network input is B = 255 * x_blue - 91.4953, etc.
    expected = torch.tensor(
        [
            [
                [[255 * 1.0 - 91.4953, 255 * 0.2 - 91.4953]],
                [[255 * 0.5 - 103.8827, 255 * 0.25 - 103.8827]],
                [[255 * 0.0 - 131.0912, 255 * 1.0 - 131.0912]],
            ]
        ]
    )
    torch.testing.assert_close(model.normalize(x), expected, rtol=0, atol=1e-4)
    assert VGGFACE2_MEAN_BGR == (91.4953, 103.8827, 131.0912)


def test_pretrained_config(model):
    cfg = model.pretrained_cfg
    assert cfg.input_size == (3, 224, 224) and cfg.resize_shortest == 256
    assert cfg.channel_order == "BGR" and cfg.scale == 255.0
    assert cfg.mean == (91.4953, 103.8827, 131.0912) and cfg.std == (1.0, 1.0, 1.0)
    assert cfg.feature_dim == 2048 and cfg.num_classes == 8631
    assert cfg.feature_layer == "avgpool" and cfg.weights_hash == ""
    assert model.num_classes == 8631


def test_other_input_sizes_give_a_clear_error(model):
    with pytest.raises(ValueError, match="224x224"), torch.no_grad():
        model.features(torch.rand(1, 3, 64, 64))


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        SEResNet50(0)


def test_channels_last_computes_the_same_function(model, x, outputs):
    cl = SEResNet50(channels_last=True).eval()
    cl.load_state_dict(model.state_dict())
    assert cl.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = cl.features(x)
    torch.testing.assert_close(got, outputs["features"], rtol=1e-4, atol=1e-4)


def test_timm_seresnet50_is_a_different_network(model, x, outputs):
    """The same weights in timm's seresnet50 (names mapped, every shape fits, so it loads
    silently) compute something else: why crossres has its own module."""
    timm = pytest.importorskip("timm")
    net = timm.create_model("seresnet50", pretrained=False, num_classes=0).eval()
    mapped = {
        k.replace(".conv4.", ".se.fc1.").replace(".conv5.", ".se.fc2."): v
        for k, v in model.state_dict().items()
        if not k.startswith("fc.")
    }
    net.load_state_dict(mapped, strict=True)  # loads without complaint
    assert net.layer2[0].conv2.stride == (2, 2)  # timm strides on the 3x3
    with torch.no_grad():
        timm_f = net.forward_head(net.forward_features(model.normalize(x)), pre_logits=True)
    ours_f = outputs["features"]
    assert timm_f.shape == ours_f.shape == (1, 2048)
    # Rounding differences are ~1e-7 (see the channels_last test); this is a different function.
    assert (ours_f - timm_f).norm() / ours_f.norm() > 1e-2
