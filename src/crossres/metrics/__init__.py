"""Identification metrics (NIST IR 8271) as torchmetrics classes, with functional twins.

``crossres.metrics.functional`` holds the definitions; the classes here accumulate
per-sample records (exact under DDP) and call them. ``scoring`` scores probes against a
gallery (chunked for huge galleries); ``plots`` draws CMC and DET curves.
"""

from crossres.metrics import functional
from crossres.metrics.classes import CMC, AttackSuccessRate, DETCurve, FPIRAtFNIR, HitRate

__all__ = ["CMC", "AttackSuccessRate", "DETCurve", "FPIRAtFNIR", "HitRate", "functional"]
