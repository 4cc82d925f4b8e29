"""Adversarial attacks: the model is given at call time, images in [0, 1] in and out."""

from crossres.attacks.base import Attack, AttackResult, frozen_eval
from crossres.attacks.cw import CarliniWagnerL2
from crossres.attacks.dr import DeepRepresentation
from crossres.attacks.ead import ElasticNet
from crossres.attacks.jsma import JSMA
from crossres.attacks.objectives import (
    Dodging,
    Impersonation,
    Misclassification,
    TargetedMisclassification,
    knn_predict,
)
from crossres.attacks.torchattacks_adapter import TorchattacksAttack

__all__ = [
    "JSMA",
    "Attack",
    "AttackResult",
    "CarliniWagnerL2",
    "DeepRepresentation",
    "Dodging",
    "ElasticNet",
    "Impersonation",
    "Misclassification",
    "TargetedMisclassification",
    "TorchattacksAttack",
    "frozen_eval",
    "knn_predict",
]
