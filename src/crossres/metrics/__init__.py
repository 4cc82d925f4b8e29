"""Identification metrics (NIST IR 8271) as torchmetrics classes, with functional twins.

``crossres.metrics.functional`` holds the definitions; the classes here accumulate
per-sample records (exact under DDP) and call them. ``scoring`` scores probes against a
gallery (chunked for huge galleries); ``plots`` draws CMC and DET curves.
``verification`` defines the 1:1 ROC and TAR@FAR (classes ``VerificationROC``,
``TARAtFAR``); ``intervals`` gives Wilson and (cluster) bootstrap intervals and
``paired`` the exact McNemar test and Holm's adjustment, for the report.
"""

from crossres.metrics import functional, intervals, paired, verification
from crossres.metrics.classes import (
    CMC,
    AttackSuccessRate,
    DETCurve,
    FPIRAtFNIR,
    HitRate,
    TARAtFAR,
    VerificationROC,
)
from crossres.metrics.intervals import (
    bootstrap_fpir_at_fnir_interval,
    bootstrap_interval,
    bootstrap_mean_interval,
    bootstrap_replicates,
    wilson_interval,
)
from crossres.metrics.paired import McNemar, holm, mcnemar_exact, mcnemar_paired
from crossres.metrics.verification import (
    Roc,
    VerificationPoint,
    tar_at_far,
    verification_operating_point,
    verification_roc,
)

__all__ = [
    "CMC",
    "AttackSuccessRate",
    "DETCurve",
    "FPIRAtFNIR",
    "HitRate",
    "McNemar",
    "Roc",
    "TARAtFAR",
    "VerificationPoint",
    "VerificationROC",
    "bootstrap_fpir_at_fnir_interval",
    "bootstrap_interval",
    "bootstrap_mean_interval",
    "bootstrap_replicates",
    "functional",
    "holm",
    "intervals",
    "mcnemar_exact",
    "mcnemar_paired",
    "paired",
    "tar_at_far",
    "verification",
    "verification_operating_point",
    "verification_roc",
    "wilson_interval",
]
