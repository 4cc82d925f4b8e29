"""The open-set gallery: the closed-set templates without the non-mated identities'.

Templates themselves are feature extraction and live with the models
(``crossres.models.templates.compute_templates``).
"""

from __future__ import annotations

from crossres.datamodules.base import OpenSetSplit
from crossres.types import Gallery


def open_set_gallery(gallery: Gallery, open_set: OpenSetSplit) -> Gallery:
    """The open-set gallery: ``gallery`` without the non-mated identities' templates."""
    keep = open_set.open_gallery_mask(gallery.ids)
    return Gallery(
        features=gallery.features[keep],
        ids=gallery.ids[keep],
        model_hash=gallery.model_hash,
        manifest_hash=gallery.manifest_hash,
        normalized=gallery.normalized,
    )
