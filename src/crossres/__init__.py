"""crossres: cross-resolution adversarial attacks on face recognition, as a Lightning benchmark."""

__version__ = "0.1.0"
