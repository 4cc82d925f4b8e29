"""Face models: every one takes float RGB in [0, 1] and normalises inside (see ``base``)."""

from crossres.models import tiny  # noqa: F401  (registers tiny_facenet)
from crossres.models.base import FaceModel, GalleryClassifier, Normalize, PretrainedConfig
from crossres.models.registry import build_model, list_models, register_model

# INTEGRATION: senet, dlib_resnet, timm_models and weights are imported here (registering the
# models) once they exist; import them from their modules meanwhile.
