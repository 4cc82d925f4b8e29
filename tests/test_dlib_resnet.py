"""dlib's ResNet-29 face embedder converted to PyTorch, checked against dlib itself (dlib-bin)
on the embedded real photos (``make data`` / ``crossres fetch-faces`` fetches them)."""

from __future__ import annotations

import copy
import hashlib
import math
import shutil
import struct

import dlib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from crossres.datamodules.embedded_sources import (
    identities_with_at_least,
    load_chip,
    load_embedded_faces,
)
from crossres.io import sha256_file, verify_file
from crossres.models import dlib_cache
from crossres.models.dlib_resnet import (
    DLIB_MODEL_FILE,
    DlibFormatError,
    DlibReader,
    DlibResNet29,
    add_zero_padded,
    converted_dlib_weights,
    packaged_dlib_model_path,
    read_dlib_net,
)
from crossres.models.registry import build_model

PHOTOS_PER_IDENTITY = 3  # of each identity with several photos
SINGLE_IDENTITIES = 4  # people with one photo, as further different-person pairs
THRESHOLD = 0.6  # dlib's same-person distance
DRIFT_PHOTOS = 8  # photos (of different people) degraded in the resolution test


# ---------------------------------------------------------------------------------------------
# dlib's serialisation primitives, written here from dlib/serialize.h and float_details.h


def pack_int(value: int) -> bytes:
    """ser_helper::pack_int: control byte (0x80 = negative | byte count), magnitude LE."""
    magnitude, body = abs(value), []
    while True:
        body.append(magnitude & 0xFF)
        magnitude >>= 8
        if magnitude == 0:
            break
    return bytes([len(body) | (0x80 if value < 0 else 0), *body])


def pack_float(value: float, digits: int = 53) -> bytes:
    """float_details::convert_from_T, then mantissa and exponent as integers."""
    if math.isnan(value):
        mantissa, exponent = 0, 32002
    elif math.isinf(value):
        mantissa, exponent = 0, 32000 if value > 0 else 32001
    else:
        m, e = math.frexp(value)
        mantissa, exponent = int(m * (1 << digits)), e - digits
        for _ in range(8):
            if mantissa & 0xFF:
                break
            mantissa >>= 8
            exponent += 8
    return pack_int(mantissa) + pack_int(exponent)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1))
def test_reader_decodes_dlib_integers(value: int) -> None:
    reader = DlibReader(pack_int(value) + b"tail", "mem")
    assert reader.read_int() == value
    assert reader.pos == len(pack_int(value))


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=False), st.floats(width=32, allow_nan=False))
def test_reader_decodes_dlib_floats(double: float, single: float) -> None:
    reader = DlibReader(pack_float(double) + pack_float(single, digits=24), "mem")
    assert reader.read_float() == double
    assert reader.read_float() == single
    assert math.isnan(DlibReader(pack_float(math.nan), "mem").read_float())


def test_reader_decodes_dlib_tensors_and_strings() -> None:
    values = np.arange(6, dtype=np.float32) - 2.5
    raw = pack_int(2) + b"".join(pack_int(d) for d in (1, 2, 3, 1)) + values.tobytes()
    raw += pack_int(5) + b"con_4" + b"1"
    reader = DlibReader(raw, "mem")
    np.testing.assert_array_equal(reader.read_tensor(), values.reshape(1, 2, 3, 1))
    assert reader.read_str() == "con_4"
    assert reader.read_bool() is True
    with pytest.raises(DlibFormatError, match="file ends"):
        reader.read_int()


def test_file_constants_are_dlibs() -> None:
    """The input layer's means (dlib/dnn/input.h), size 150, and loss_metric's defaults
    (margin 0.04, distance threshold 0.6, dlib/dnn/loss.h) as stored in the file."""
    net = read_dlib_net(packaged_dlib_model_path())
    assert net.input_mean_rgb == tuple(float(np.float32(v)) for v in (122.782, 117.001, 104.298))
    assert net.input_size == (150, 150)
    assert (net.loss_margin, net.loss_dist_thresh) == (
        float(np.float32(0.04)),
        float(np.float32(0.6)),
    )
    kinds = [layer.kind for layer in net.layers]
    assert kinds.count("con") == 29 and kinds.count("affine") == 29 and kinds.count("fc") == 1
    assert kinds.count("add_prev") == 14 and kinds.count("avg_pool") == 5  # 4 ares_down + global


def test_parameter_count_follows_the_architecture() -> None:
    """Counted from dnn_face_recognition_ex.cpp's template: conv 7x7 32 + affine; 3 x ares<32>,
    ares_down<64> + 3 x ares<64>, ares_down<128> + 2 x ares<128>, ares_down<256> +
    2 x ares<256>, ares_down<256>; fc_no_bias 256 -> 128. Convs have biases."""
    widths = [32] * 3 + [64] * 4 + [128] * 3 + [256] * 3 + [256]
    expected, channels = 3 * 32 * 49 + 32 + 2 * 32, 32
    for width in widths:
        expected += channels * width * 9 + width + width * width * 9 + width + 4 * width
        channels = width
    expected += 256 * 128
    state, _ = converted_dlib_weights()
    assert sum(v.numel() for v in state.values()) == expected
    assert sum(p.numel() for p in DlibResNet29().parameters()) == expected


def dlib_add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """tt::add(dest, src1, src2) of dlib/cuda/cpu_dlib.cpp, loop for loop."""
    shape = [max(x, y) for x, y in zip(a.shape, b.shape, strict=True)]
    out = np.zeros(shape, np.float32)
    for idx in np.ndindex(*shape):
        v1 = a[idx] if all(i < d for i, d in zip(idx, a.shape, strict=True)) else 0.0
        v2 = b[idx] if all(i < d for i, d in zip(idx, b.shape, strict=True)) else 0.0
        out[idx] = v1 + v2
    return out


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=6, max_size=6), st.integers(0, 2**16))
def test_add_prev_of_different_shapes_is_dlibs(dims: list[int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(2, *dims[:3], generator=gen)
    b = torch.randn(2, *dims[3:], generator=gen)
    np.testing.assert_array_equal(add_zero_padded(a, b).numpy(), dlib_add(a.numpy(), b.numpy()))


# ---------------------------------------------------------------------------------------------
# Against dlib on real photos


@pytest.fixture(scope="module")
def model() -> DlibResNet29:
    return build_model("dlib_resnet29")


@pytest.fixture(scope="module")
def faces() -> tuple[list[str], np.ndarray]:
    """Identities and uint8 RGB 150x150 chips: a few photos of every person with several, and
    a few people with one photo."""
    photos = load_embedded_faces()
    groups = identities_with_at_least(photos, 2)
    assert len(groups) >= 2, f"need 2+ identities with 2+ photos, have {sorted(groups)}"
    chosen = [
        p
        for name in sorted(groups)
        for p in sorted(groups[name], key=lambda p: str(p.path))[:PHOTOS_PER_IDENTITY]
    ]
    singles = sorted({p.identity: p for p in photos if p.identity not in groups}.items())
    chosen += [p for _, p in singles[:SINGLE_IDENTITIES]]
    chips = np.stack([np.asarray(load_chip(p).convert("RGB")) for p in chosen])
    assert chips.shape[1:] == (150, 150, 3), chips.shape
    return [p.identity for p in chosen], chips


def to_tensor(chips: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(chips.copy()).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def embeddings(model: DlibResNet29, faces) -> torch.Tensor:
    with torch.no_grad():
        return model.features(to_tensor(faces[1]))


def test_matches_dlib_on_real_photos(embeddings: torch.Tensor, faces) -> None:
    reference = dlib.face_recognition_model_v1(str(packaged_dlib_model_path()))
    chips = faces[1][::2]  # every other chip: dlib takes ~0.1 s per chip
    expected = np.stack([np.array(reference.compute_face_descriptor(chip)) for chip in chips])
    assert embeddings.shape == (len(faces[0]), 128) and len(chips) >= 10
    error = np.abs(embeddings[::2].double().numpy() - expected).max()
    assert error < 1e-4, f"max abs difference from dlib {error:.2e}"


def test_same_person_closer_than_threshold_than_others(embeddings: torch.Tensor, faces) -> None:
    ids = np.array(faces[0])
    dist = torch.cdist(embeddings.double(), embeddings.double()).numpy()
    i, j = np.triu_indices(len(ids), 1)
    same = ids[i] == ids[j]
    assert same.sum() >= 2 and (~same).sum() >= 2
    worst_same, worst_diff = (
        np.argmax(np.where(same, dist[i, j], -1)),
        np.argmin(np.where(same, np.inf, dist[i, j])),
    )
    assert dist[i, j][same].max() < THRESHOLD, (
        f"same person {ids[i[worst_same]]} at {dist[i, j][worst_same]:.3f}"
    )
    assert dist[i, j][~same].min() > THRESHOLD, (
        f"{ids[i[worst_diff]]} vs {ids[j[worst_diff]]} at {dist[i, j][worst_diff]:.3f}"
    )


def degrade(chip: np.ndarray, resolution: int) -> np.ndarray:
    """Shortest side down to ``resolution`` (aspect kept, truncated) and back up, both with
    PIL's BILINEAR, as in Massoli et al. 2020's code."""
    img = Image.fromarray(chip)
    w, h = img.size
    if resolution >= min(w, h):
        return chip
    small = (int(w * resolution / min(w, h)), int(h * resolution / min(w, h)))
    return np.asarray(img.resize(small, Image.BILINEAR).resize((w, h), Image.BILINEAR))


def test_embedding_drifts_as_resolution_falls(model, embeddings, faces) -> None:
    """The paper's premise, measured on one photo of each person: the distance from the
    full-resolution embedding grows as the shortest side falls 64 -> 24 -> 16 px, and at
    16 px it rivals the same-person threshold."""
    ids = faces[0]
    first = [ids.index(name) for name in dict.fromkeys(ids)][:DRIFT_PHOTOS]
    assert len(first) >= 4, ids
    drift = {}
    for resolution in (64, 24, 16):
        low = np.stack([degrade(faces[1][i], resolution) for i in first])
        with torch.no_grad():
            drift[resolution] = (model.features(to_tensor(low)) - embeddings[first]).norm(dim=1)
    means = {r: round(d.mean().item(), 3) for r, d in drift.items()}
    assert 0 < means[64] < means[24] < means[16], means
    assert means[16] > 0.6 * THRESHOLD, means
    assert (drift[16] > drift[64]).all(), means


def test_features_are_differentiable(model, faces) -> None:
    """Finite, nonzero input gradients that agree with a central difference (float64)."""
    x = to_tensor(faces[1][:1]).requires_grad_(True)
    model.features(x).norm(dim=1).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    m64 = copy.deepcopy(model).double()
    gen = torch.Generator().manual_seed(0)
    x = x.detach().double()
    u, v = torch.randn(1, 128, generator=gen).double(), torch.randn(x.shape, generator=gen).double()
    x.requires_grad_(True)
    (m64.features(x) * u).sum().backward()
    h = 1e-7  # small enough that the path crosses no ReLU/max-pool kink
    with torch.no_grad():
        plus, minus = m64.features(torch.cat([x + h * v, x - h * v])) @ u.T
    numeric, analytic = (plus - minus).squeeze() / (2 * h), (x.grad * v).sum()
    assert torch.isclose(analytic, numeric, rtol=1e-3), (analytic.item(), numeric.item())


# ---------------------------------------------------------------------------------------------
# Registry, cache, weight files, errors


def test_registry_builds_dlibs_model_without_classifier(model) -> None:
    assert isinstance(model, DlibResNet29)
    cfg = model.pretrained_cfg
    expected_hash = hashlib.sha256(packaged_dlib_model_path().read_bytes()).hexdigest()
    assert cfg.weights_hash == expected_hash
    assert (cfg.input_size, cfg.feature_dim, cfg.num_classes) == ((3, 150, 150), 128, 0)
    x = torch.rand(1, 3, 150, 150)
    with pytest.raises(TypeError, match="GalleryClassifier"):
        model(x)
    with pytest.raises(ValueError, match="150x150"):
        model.features(torch.rand(1, 3, 112, 112))


def test_conversion_is_cached_and_a_corrupt_cache_rebuilt(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CROSSRES_CACHE", str(tmp_path))
    state, sha = converted_dlib_weights()
    entry = tmp_path / "models" / f"dlib_resnet29-{sha}.pt"
    assert entry.is_file()
    assert sha == hashlib.sha256(packaged_dlib_model_path().read_bytes()).hexdigest()

    def no_conversion(path):
        raise AssertionError(f"converted {path} again although it is cached")

    with monkeypatch.context() as m:
        m.setattr(dlib_cache, "read_dlib_net", no_conversion)
        cached, _ = converted_dlib_weights()
    assert all(torch.equal(cached[k], v) for k, v in state.items())

    assert verify_file(entry) == sha256_file(entry)  # written with its sidecar hash
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0x01  # a damaged byte that torch.load might not notice
    entry.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=f"rebuilding .*{entry.name}"):
        converted_dlib_weights()
    entry.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt, _ = converted_dlib_weights()
    assert all(torch.equal(rebuilt[k], v) for k, v in state.items())
    reloaded = torch.load(entry, weights_only=True)
    assert all(torch.equal(reloaded[k], v) for k, v in state.items())


def test_crossres_state_dict_as_weights(model, tmp_path) -> None:
    """A state dict saved by crossres (e.g. a fine-tuned copy) loads by path."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["fc.weight"] *= 2
    path = tmp_path / "finetuned.pt"
    torch.save(state, path)
    tuned = build_model("dlib_resnet29", weights=str(path))
    x = torch.rand(2, 3, 150, 150)
    with torch.no_grad():
        torch.testing.assert_close(tuned.features(x), 2 * model.features(x))
    assert tuned.pretrained_cfg.weights_hash == hashlib.sha256(path.read_bytes()).hexdigest()


def test_bad_files_give_errors_naming_them(tmp_path) -> None:
    source = packaged_dlib_model_path()
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(source.read_bytes()[: 1 << 20])
    with pytest.raises(DlibFormatError, match=r"truncated\.dat.*file ends"):
        build_model("dlib_resnet29", weights=str(truncated), cache=False)

    other = tmp_path / "shape_predictor_5_face_landmarks.dat"
    shutil.copy(source.with_name("shape_predictor_5_face_landmarks.dat"), other)
    with pytest.raises(DlibFormatError, match="shape_predictor_5_face_landmarks"):
        read_dlib_net(other)

    padded = tmp_path / DLIB_MODEL_FILE
    padded.write_bytes(source.read_bytes() + struct.pack("<f", 1.0))
    with pytest.raises(DlibFormatError, match="4 bytes left"):
        read_dlib_net(padded)
