"""dlib's ResNet-29 face embedder, read from dlib's own file into a differentiable PyTorch module.

The weights are ``dlib_face_recognition_resnet_model_v1.dat`` from the ``face-recognition-models``
package (CC0): dlib's metric-learning ResNet (``examples/dnn_face_recognition_ex.cpp``)::

    loss_metric<fc_no_bias<128, avg_pool_everything<alevel0<alevel1<alevel2<alevel3<alevel4<
        max_pool<3,3,2,2, relu<affine<con<32,7,7,2,2, input_rgb_image_sized<150>>>>>>>>>>>>>

150x150 RGB face chips (``dlib.get_face_chip``) in, a 128-d embedding out; two chips show the
same person when the Euclidean distance of their embeddings is below 0.6.

The network is ``dlib_net``, the reader of dlib's file ``dlib_format``, the cached conversion
``dlib_cache``; this module registers the factories and keeps the names importable from here.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from crossres.models.dlib_cache import converted_dlib_weights, packaged_dlib_model_path
from crossres.models.dlib_format import (
    DlibFormatError,
    DlibLayer,
    DlibNet,
    DlibReader,
    dlib_state_dict,
    read_dlib_net,
)
from crossres.models.dlib_net import (
    BLOCKS,
    DLIB_CHIP_SIZE,
    DLIB_INPUT_DIVISOR,
    DLIB_MEAN_RGB,
    DLIB_MODEL_FILE,
    EMBEDDING_DIM,
    SAME_PERSON_THRESHOLD,
    ChannelAffine,
    DlibResBlock,
    DlibResNet29,
    add_zero_padded,
    dlib_config,
)
from crossres.models.prepared import prepared_weights
from crossres.models.registry import register_model
from crossres.models.weights import load_weights
from crossres.paths import sha256_file

__all__ = [
    "BLOCKS",
    "DLIB_CHIP_SIZE",
    "DLIB_INPUT_DIVISOR",
    "DLIB_MEAN_RGB",
    "DLIB_MODEL_FILE",
    "EMBEDDING_DIM",
    "SAME_PERSON_THRESHOLD",
    "ChannelAffine",
    "DlibFormatError",
    "DlibLayer",
    "DlibNet",
    "DlibReader",
    "DlibResBlock",
    "DlibResNet29",
    "add_zero_padded",
    "converted_dlib_weights",
    "dlib_config",
    "dlib_resnet29",
    "dlib_resnet29_cr",
    "dlib_state_dict",
    "packaged_dlib_model_path",
    "read_dlib_net",
]


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
    with the Base model. ``weights`` None loads the copy that ``crossres prepare`` trained
    (``configs/cr_dlib.yaml``'s recipe) and cached, checked against its sha256 and against
    dlib's own weights it was fine-tuned from; ``NotPreparedError`` if there is none. A path
    loads that file instead."""
    if weights is None:
        teacher = sha256_file(packaged_dlib_model_path())
        weights = prepared_weights("dlib_resnet29_cr", expect={"teacher_sha256": teacher})
    return dlib_resnet29(weights, **options)
