"""load_weights: every format the paper's models come in, and every way a file can be bad.

Each format is written here the way its producer writes it (the VGGFace2 port's Python-2
pickle, DataParallel, Lightning, the CR paper's code with MMdnn names, its whole pickled
KitModel) from one seeded network; loading must give back that exact network.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shlex
import struct
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crossres.models.registry import build_model
from crossres.models.senet import SEResNet50, senet50_vggface2_config
from crossres.models.weights import LoadReport, WeightFileError, load_weights

NUM_CLASSES = 10  # a small fc keeps the files ~100 MB; the layout is otherwise the real one


def condition(model: SEResNet50) -> SEResNet50:
    """Random but trained-looking: BN statistics away from identity, small residual gains
    (a chaotic random net would turn float rounding into visible differences)."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                lo, hi = (0.05, 0.2) if name.endswith("bn3") else (0.5, 1.0)
                mod.weight.uniform_(lo, hi)
                mod.bias.normal_(0, 0.05)
                mod.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.fixture(scope="module")
def reference() -> SEResNet50:
    torch.manual_seed(0)
    return condition(SEResNet50(NUM_CLASSES))


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def expected(reference, x) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return reference.features_and_logits(x)


@pytest.fixture(scope="module")
def shared_model() -> SEResNet50:
    return SEResNet50(NUM_CLASSES).eval()


@pytest.fixture
def target(shared_model) -> SEResNet50:
    """One model reused across tests (building one takes a while), zeroed before each load."""
    with torch.no_grad():
        for t in shared_model.state_dict().values():
            t.zero_()
    shared_model.pretrained_cfg = senet50_vggface2_config(num_classes=NUM_CLASSES)
    return shared_model


def assert_same_network(model, reference, x, expected) -> None:
    ref = reference.state_dict()
    for k, v in model.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, ref[k]), k
    with torch.no_grad():
        feats, logits = model.features_and_logits(x)
    assert torch.equal(feats, expected[0])
    assert torch.equal(logits, expected[1])


# ----------------------------------------------------------------------------- writers


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (BINSTRING), as python2's pickle.dump did for the raw
    array data of senet50_ft_weight.pkl."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def write_public_pkl(path, state: dict[str, torch.Tensor]) -> None:
    """The VGGFace2-pytorch file: protocol 2, {name: float32 array}, no num_batches_tracked,
    numpy.core.multiarray globals."""
    arrays = {
        k: v.numpy().astype(np.float32)
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(arrays)
    path.write_bytes(buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


_CAFFE_PARTS = {
    "conv1": "1x1_reduce",
    "bn1": "1x1_reduce_bn",
    "conv2": "3x3",
    "bn2": "3x3_bn",
    "conv3": "1x1_increase",
    "bn3": "1x1_increase_bn",
    "conv4": "1x1_down",
    "conv5": "1x1_up",
    "downsample.0": "1x1_proj",
    "downsample.1": "1x1_proj_bn",
}


def caffe_name(ours: str) -> str:
    """Our name -> the CR code's (MainModel.py): Caffe layer names with '/' -> '_'."""
    module, _, param = ours.rpartition(".")
    top = {"conv1": "conv1_7x7_s2", "bn1": "conv1_7x7_s2_bn", "fc": "classifier_1"}
    if module in top:
        return f"{top[module]}.{param}"
    layer, block, part = module.split(".", 2)
    return f"conv{int(layer[5:]) + 1}_{int(block) + 1}_{_CAFFE_PARTS[part]}.{param}"


class KitModel(nn.Module):
    """The CR paper's MMdnn network written as MainModel.py writes it: Caffe names, explicit
    F.pad, a -inf padded max-pool without ceil_mode, SE through avg_pool2d over the map."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1_7x7_s2 = nn.Conv2d(3, 64, 7, stride=2, bias=False)
        self.conv1_7x7_s2_bn = nn.BatchNorm2d(64, eps=9.99999974738e-06, momentum=0.0)
        self.blocks: list[tuple[str, bool]] = []
        cin = 64
        for s, (n, w) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True), start=2):
            for b in range(1, n + 1):
                p, stride = f"conv{s}_{b}_", 2 if (b == 1 and s > 2) else 1

                def bn(c: int) -> nn.BatchNorm2d:
                    return nn.BatchNorm2d(c, eps=9.99999974738e-06, momentum=0.0)

                setattr(self, p + "1x1_reduce", nn.Conv2d(cin, w, 1, stride=stride, bias=False))
                setattr(self, p + "1x1_reduce_bn", bn(w))
                setattr(self, p + "3x3", nn.Conv2d(w, w, 3, bias=False))
                setattr(self, p + "3x3_bn", bn(w))
                setattr(self, p + "1x1_increase", nn.Conv2d(w, 4 * w, 1, bias=False))
                setattr(self, p + "1x1_increase_bn", bn(4 * w))
                setattr(self, p + "1x1_down", nn.Conv2d(4 * w, 4 * w // 16, 1, bias=True))
                setattr(self, p + "1x1_up", nn.Conv2d(4 * w // 16, 4 * w, 1, bias=True))
                if b == 1:
                    setattr(self, p + "1x1_proj", nn.Conv2d(cin, 4 * w, 1, stride, bias=False))
                    setattr(self, p + "1x1_proj_bn", bn(4 * w))
                self.blocks.append((p, b == 1))
                cin = 4 * w
        self.classifier_1 = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.conv1_7x7_s2_bn(self.conv1_7x7_s2(F.pad(x, (3, 3, 3, 3)))))
        x = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 3, 2)
        for p, proj in self.blocks:
            g = lambda n, p=p: getattr(self, p + n)  # noqa: E731
            y = F.relu(g("1x1_reduce_bn")(g("1x1_reduce")(x)))
            y = F.relu(g("3x3_bn")(g("3x3")(F.pad(y, (1, 1, 1, 1)))))
            y = g("1x1_increase_bn")(g("1x1_increase")(y))
            s = F.avg_pool2d(y, kernel_size=tuple(y.shape[-2:]), stride=1)
            s = torch.sigmoid(g("1x1_up")(F.relu(g("1x1_down")(s))))
            shortcut = g("1x1_proj_bn")(g("1x1_proj")(x)) if proj else x
            x = F.relu(s * y + shortcut)
        feature = F.avg_pool2d(x, 7, 1).flatten(1)
        return feature, self.classifier_1(feature)


def save_as_main_model_kitmodel(kit: KitModel, path) -> None:
    """torch.save of the whole module, its class living in a module named MainModel (which
    does not exist when the file is read back)."""
    fake = types.ModuleType("MainModel")
    fake.KitModel = KitModel
    old = KitModel.__module__, KitModel.__qualname__
    KitModel.__module__, KitModel.__qualname__ = "MainModel", "KitModel"
    sys.modules["MainModel"] = fake
    try:
        torch.save(kit, path)
    finally:
        del sys.modules["MainModel"]
        KitModel.__module__, KitModel.__qualname__ = old


# ----------------------------------------------------------------------------- formats


@pytest.fixture(scope="module")
def public_pkl(tmp_path_factory, reference):
    path = tmp_path_factory.mktemp("pkl") / "senet50_ft_weight.pkl"
    write_public_pkl(path, reference.state_dict())
    return path


def test_public_pkl_needs_latin1(public_pkl):
    # The file is a Python-2 pickle: read as Python 3 defaults (ASCII) it fails, which is the
    # "corrupted file" people report. The head is the protocol-2 marker.
    data = public_pkl.read_bytes()
    assert data[:2] == b"\x80\x02" and b"numpy.core.multiarray\n_reconstruct" in data
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)


def test_public_pkl_loads_to_the_same_network(target, public_pkl, reference, x, expected):
    report = load_weights(target, public_pkl)
    assert isinstance(report, LoadReport)
    assert report.format == "numpy-pickle/state-dict" and report.naming == "crossres"
    assert report.num_tensors == report.num_file_tensors == 331
    assert report.sha256 == hashlib.sha256(public_pkl.read_bytes()).hexdigest()
    assert target.pretrained_cfg.weights_hash == report.sha256
    assert_same_network(target, reference, x, expected)


def test_registry_builds_senet50_vggface2_with_weights(public_pkl, reference):
    model = build_model("senet50_vggface2", weights=str(public_pkl), num_classes=NUM_CLASSES)
    assert isinstance(model, SEResNet50) and model.num_classes == NUM_CLASSES
    assert model.pretrained_cfg.weights_hash == hashlib.sha256(public_pkl.read_bytes()).hexdigest()
    ref = reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items() if "num_b" not in k)
    with pytest.raises(WeightFileError, match="fc.weight"):  # 10 classes into the 8631 default
        build_model("senet50_vggface2", weights=str(public_pkl))


def test_dataparallel_module_prefix(target, tmp_path, reference, x, expected):
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, path)
    report = load_weights(target, path)
    assert report.format == "torch-zip/state-dict" and report.num_tensors == 384
    assert report.prefix == "module." or report.dropped_module
    assert_same_network(target, reference, x, expected)
    path.unlink()


def test_lightning_checkpoint(target, tmp_path, reference, x, expected):
    # The keys Trainer.save_checkpoint writes; the LightningModule holds the net as `model`.
    state = {f"model.{k}": v for k, v in reference.state_dict().items()}
    state["criterion.weight"] = torch.ones(3)  # another attribute of the LightningModule
    ckpt = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": state,
        "loops": {},
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 1e-3},
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    report = load_weights(target, path)
    assert report.format == "torch-zip/lightning-checkpoint" and report.prefix == "model."
    assert report.num_tensors == 384 and report.ignored == ("criterion.weight",)
    assert_same_network(target, reference, x, expected)
    path.unlink()


def test_two_networks_in_one_checkpoint_need_a_prefix(target, tmp_path, reference):
    ref = reference.state_dict()
    state = {f"student.{k}": v for k, v in ref.items()}
    state.update({f"teacher.{k}": torch.zeros_like(v) for k, v in ref.items()})
    path = tmp_path / "distill.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(WeightFileError, match="prefix") as err:
        load_weights(target, path)
    assert "'student.'" in str(err.value) and "'teacher.'" in str(err.value)
    report = load_weights(target, path, prefix="student.")
    assert report.prefix == "student." and report.num_tensors == 384
    assert all(torch.equal(v, ref[k]) for k, v in target.state_dict().items())
    path.unlink()


def test_cr_paper_checkpoint_with_mmdnn_names(target, tmp_path, reference, x, expected):
    """torch.save({"best_acc", "epoch", "model_state_dict"}) of the CR code's KitModel."""
    caffe = {caffe_name(k): v for k, v in reference.state_dict().items()}
    assert len(caffe) == 384 and "conv3_1_1x1_proj_bn.running_var" in caffe
    path = tmp_path / "cr_best.pth"
    torch.save({"best_acc": np.float64(97.25), "epoch": 12, "model_state_dict": caffe}, path)
    report = load_weights(target, path)
    assert report.format == "torch-zip/checkpoint[model_state_dict]"
    assert report.naming == "caffe-mmdnn" and report.num_tensors == 384
    assert_same_network(target, reference, x, expected)
    path.unlink()


def test_mmdnn_state_dict_in_legacy_torch_format(target, tmp_path, reference):
    caffe = {caffe_name(k): v for k, v in reference.state_dict().items()}
    path = tmp_path / "mmdnn_legacy.pth"
    torch.save(caffe, path, _use_new_zipfile_serialization=False)
    report = load_weights(target, path)
    assert report.format == "torch-legacy/state-dict" and report.naming == "caffe-mmdnn"
    ref = reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in target.state_dict().items())
    path.unlink()


def test_whole_pickled_kitmodel_is_read_without_running_it(
    target, tmp_path, reference, x, expected
):
    kit = KitModel(NUM_CLASSES).eval()
    kit.load_state_dict({caffe_name(k): v for k, v in reference.state_dict().items()})
    # Our module computes the CR code's function (independent padding/pooling formulation).
    with torch.no_grad():
        kit_feats, kit_logits = kit(reference.normalize(x))
    torch.testing.assert_close(kit_feats, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kit_logits, expected[1], rtol=1e-5, atol=1e-5)

    path = tmp_path / "base_model.pth"
    save_as_main_model_kitmodel(kit, path)
    report = load_weights(target, path)
    assert report.format == "torch-zip/pickled-module[MainModel.KitModel]"
    assert report.naming == "caffe-mmdnn" and report.num_tensors == 384
    assert "MainModel" not in sys.modules  # nothing was imported for it
    assert_same_network(target, reference, x, expected)
    path.unlink()


def test_safetensors(target, tmp_path, reference):
    from safetensors.torch import save_file

    path = tmp_path / "w.bin"  # the extension says nothing; the bytes do
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    assert load_weights(target, path).format == "safetensors"
    ref = reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in target.state_dict().items())
    path.unlink()


# ----------------------------------------------------------------------------- bad files


def test_wrong_shape_missing_and_unexpected_in_one_error(target, tmp_path, reference):
    state = dict(reference.state_dict())
    state["fc.weight"] = torch.zeros(5, 2048)
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(WeightFileError) as err:
        load_weights(target, path)
    msg = str(err.value)
    assert len(err.value.problems) == 3 and str(path) in msg
    assert "fc.weight: shape mismatch, model expects [10, 2048], file has [5, 2048]" in msg
    assert "layer1.0.conv1.weight: missing" in msg and "[64, 64, 1, 1]" in msg
    assert "extra.weight: unexpected" in msg
    assert target.conv1.weight.abs().sum() == 0  # nothing was loaded
    path.unlink()


def test_not_strict_reports_missing_and_unexpected(target, tmp_path, reference):
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    report = load_weights(target, path, strict=False)
    assert report.missing == ("fc.bias", "fc.weight")
    assert report.unexpected == ("extra.weight",)
    assert torch.equal(target.layer4[2].conv5.bias, reference.layer4[2].conv5.bias)
    assert target.fc.weight.abs().sum() == 0
    path.unlink()


class _Payload:
    """A pickle that runs code when loaded: its __reduce__ names a callable and its args."""

    def __init__(self, func, arg) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def _payloads(marker) -> dict[str, _Payload]:
    return {
        "os.system": _Payload(os.system, f"touch {shlex.quote(str(marker))}"),
        "builtins.exec": _Payload(exec, f"open({str(marker)!r}, 'w').close()"),
    }


def test_the_payload_does_run_when_unpickled_plainly(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_payloads(marker)["builtins.exec"]))  # control experiment
    assert marker.exists()


@pytest.mark.parametrize("writer", ["pickle", "torch-zip", "torch-legacy"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.exec"])
def test_pickle_carrying_code_is_refused_and_never_runs(shared_model, tmp_path, writer, payload):
    marker = tmp_path / "pwned"
    evil = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32), "x": _payloads(marker)[payload]}
    path = tmp_path / "evil.bin"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(evil, protocol=2))
    else:
        evil["conv1.weight"] = torch.zeros(64, 3, 7, 7)
        torch.save(evil, path, _use_new_zipfile_serialization=writer == "torch-zip")
    with pytest.raises(WeightFileError, match="refused") as err:
        load_weights(shared_model, path)
    assert payload.split(".")[1] in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()


def _small_state(reference) -> dict[str, torch.Tensor]:
    return {k: v for k, v in reference.state_dict().items() if k.startswith("layer1.0.")}


@pytest.mark.parametrize("kind", ["pickle", "torch-zip", "torch-legacy"])
def test_truncated_file_gives_a_clear_error(shared_model, tmp_path, reference, kind):
    path = tmp_path / "cut.bin"
    state = _small_state(reference)
    if kind == "pickle":
        path.write_bytes(pickle.dumps({k: v.numpy() for k, v in state.items()}, protocol=2))
    else:
        torch.save(state, path, _use_new_zipfile_serialization=kind == "torch-zip")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match="truncated or corrupt") as err:
        load_weights(shared_model, path)
    assert str(path) in str(err.value)


def test_random_bytes_empty_and_absent_files(shared_model, tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(b"\x00" + np.random.default_rng(0).bytes(4095))
    with pytest.raises(WeightFileError, match="unknown weight file format") as err:
        load_weights(shared_model, path)
    assert str(path) in str(err.value)
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(WeightFileError, match="empty"):
        load_weights(shared_model, empty)
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        load_weights(shared_model, tmp_path / "nope.pkl")


def test_file_without_matching_names_or_tensors(shared_model, tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.block.weight": torch.zeros(2)}, path)
    with pytest.raises(WeightFileError, match="none of the file's tensor names match"):
        load_weights(shared_model, path)
    torch.save({"epoch": 3, "note": "no tensors"}, path)
    with pytest.raises(WeightFileError, match="no tensors found"):
        load_weights(shared_model, path)
    path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(WeightFileError, match="holds a list"):
        load_weights(shared_model, path)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_archive_is_refused(shared_model, tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
    with pytest.raises(WeightFileError, match="TorchScript"):
        load_weights(shared_model, path)


# ----------------------------------------------------------------------------- timm


def test_timm_model_wrapper_and_loading(tmp_path):
    torch.manual_seed(0)
    a = build_model("timm/test_resnet", num_classes=5).eval()
    cfg = a.pretrained_cfg
    timm_cfg = a.net.pretrained_cfg  # timm's own data config for this architecture
    assert cfg.mean == pytest.approx(timm_cfg["mean"]) and cfg.std == pytest.approx(timm_cfg["std"])
    assert cfg.input_size == tuple(timm_cfg["input_size"])
    assert cfg.channel_order == "RGB" and cfg.feature_dim == a.net.num_features
    xs = torch.rand(2, *cfg.input_size)
    with torch.no_grad():
        feats, logits = a.features_and_logits(xs)
        # timm's own forward on the input normalised by hand with timm's mean/std
        mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std).view(1, 3, 1, 1)
        torch.testing.assert_close(logits, a.net((xs - mean) / std))
    assert feats.shape == (2, cfg.feature_dim) and logits.shape == (2, 5)

    path = tmp_path / "timm.pth"
    torch.save(a.net.state_dict(), path)  # timm's own names, without our "net." wrapper
    torch.manual_seed(1)
    b = build_model("timm/test_resnet", weights=str(path), num_classes=5).eval()
    assert b.pretrained_cfg.weights_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    with torch.no_grad():
        assert torch.equal(b(xs), logits)

    embedder = build_model("timm/test_resnet")  # num_classes=0: features only
    with pytest.raises(TypeError, match="GalleryClassifier"), torch.no_grad():
        embedder(xs)
    with pytest.raises(ValueError, match="never downloads"):
        build_model("timm/test_resnet", pretrained=True)
