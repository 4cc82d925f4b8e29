"""Registry of named face models, as in timm: ``build_model(name, weights=None, **options)``."""

from __future__ import annotations

from collections.abc import Callable

from crossres.errors import ConfigValueError
from crossres.models.base import FaceModel

_REGISTRY: dict[str, Callable[..., FaceModel]] = {}


def register_model(name: str) -> Callable[[Callable[..., FaceModel]], Callable[..., FaceModel]]:
    def decorator(factory: Callable[..., FaceModel]) -> Callable[..., FaceModel]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, weights: str | None = None, **options) -> FaceModel:
    """Build a registered model (``list_models()``) or any timm model as ``timm/<name>``.

    weights: path to a weight file in any format ``load_weights`` recognises; None keeps the
        model's default (its packaged weights where it has some, else random initialisation).
    """
    if name.startswith("timm/"):
        from crossres.models.timm_models import build_timm_model

        return build_timm_model(name.removeprefix("timm/"), weights=weights, **options)
    if name not in _REGISTRY:
        raise ConfigValueError(
            f"unknown model {name!r}; registered: {', '.join(list_models())}, "
            "or 'timm/<any timm model name>'"
        )
    return _REGISTRY[name](weights=weights, **options)
