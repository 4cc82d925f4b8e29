"""Face models: every one takes float RGB in [0, 1] and normalises inside (see ``base``)."""

from crossres.models import (  # noqa: F401  (registration)
    arcface,
    dlib_resnet,
    facenet,
    senet,
    timm_models,
    tiny,
)
from crossres.models.base import FaceModel, GalleryClassifier, Normalize, PretrainedConfig
from crossres.models.dlib_resnet import DlibResNet29
from crossres.models.low_resolution import LowResolutionInput
from crossres.models.registry import build_model, list_models, register_model
from crossres.models.senet import SEResNet50
from crossres.models.tiny import TinyFaceNet
from crossres.models.weights import WeightFileError, load_weights

__all__ = [
    "DlibResNet29",
    "FaceModel",
    "GalleryClassifier",
    "LowResolutionInput",
    "Normalize",
    "PretrainedConfig",
    "SEResNet50",
    "TinyFaceNet",
    "WeightFileError",
    "build_model",
    "list_models",
    "load_weights",
    "register_model",
]
