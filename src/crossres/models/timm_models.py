"""Any timm model as a crossres ``FaceModel`` (``build_model("timm/<name>")``), for users who
bring their own face-recognition weights in a timm architecture.

Features are timm's pooled pre-logits features (``forward_head(..., pre_logits=True)``), logits
its classifier; with ``num_classes=0`` the model is a pure embedder (wrap it in
``GalleryClassifier`` for logits). Nothing is downloaded: weights come from a local file.
"""

from __future__ import annotations

import math

import torch

from crossres.models.base import FaceModel, PretrainedConfig

__all__ = ["TimmFaceModel", "build_timm_model", "timm_pretrained_config"]


def timm_pretrained_config(net: torch.nn.Module) -> PretrainedConfig:
    """PretrainedConfig from timm's data config (mean/std, input size, centre-crop fraction)."""
    from timm.data import resolve_data_config

    data = resolve_data_config({}, model=net)
    c, h, w = data["input_size"]
    crop_pct = float(data.get("crop_pct") or 1.0)
    # timm's eval transform: resize the shortest side to floor(size / crop_pct), centre crop.
    resize = (
        math.floor(min(h, w) / crop_pct) if data.get("crop_mode", "center") == "center" else None
    )
    feature_dim = int(getattr(net, "head_hidden_size", None) or net.num_features)
    return PretrainedConfig(
        input_size=(int(c), int(h), int(w)),
        resize_shortest=resize,
        channel_order="RGB",
        scale=1.0,
        mean=tuple(float(m) for m in data["mean"]),
        std=tuple(float(s) for s in data["std"]),
        feature_dim=feature_dim,
        num_classes=int(getattr(net, "num_classes", 0) or 0),
        feature_layer="pre_logits",
        extra={
            "timm_architecture": (getattr(net, "pretrained_cfg", None) or {}).get(
                "architecture", ""
            ),
            "interpolation": data.get("interpolation", ""),
            "crop_pct": crop_pct,
        },
    )


class TimmFaceModel(FaceModel):
    """A timm network behind the FaceModel contract; the network itself is ``self.net``."""

    def __init__(self, net: torch.nn.Module, cfg: PretrainedConfig | None = None) -> None:
        super().__init__(cfg or timm_pretrained_config(net))
        self.net = net

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        if self.num_classes == 0:
            return super().classify(features)  # raises: no classifier
        return self.net.get_classifier()(features)


def build_timm_model(
    name: str, weights: str | None = None, *, num_classes: int = 0, strict: bool = True, **options
) -> TimmFaceModel:
    """``timm.create_model(name, pretrained=False, num_classes=num_classes, **options)`` as a
    FaceModel; ``weights`` (any format ``load_weights`` reads) are loaded into it."""
    import timm

    if options.pop("pretrained", False):
        raise ValueError(
            "crossres never downloads weights (pretrained=True): pass weights=<local file> "
            "(e.g. a timm checkpoint or safetensors file you downloaded yourself)"
        )
    if name.startswith(("hf-hub:", "hf_hub:")):
        raise ValueError(f"{name!r} names a Hugging Face Hub model; crossres never downloads")
    if not timm.is_model(name.split(".", 1)[0]):
        raise ValueError(f"timm has no model {name!r} (see timm.list_models())")
    net = timm.create_model(name, pretrained=False, num_classes=num_classes, **options)
    model = TimmFaceModel(net)
    if weights is not None:
        from crossres.models.weights import load_weights

        load_weights(model, weights, strict=strict)
    return model
