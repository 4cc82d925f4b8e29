"""Adversarial attacks: the model is given at call time, images in [0, 1] in and out."""

from crossres.attacks.base import Attack, AttackResult, frozen_eval
from crossres.attacks.objectives import (
    Dodging,
    Impersonation,
    Misclassification,
    TargetedMisclassification,
    knn_predict,
)

# INTEGRATION: the algorithms (cw, ead, jsma, dr, torchattacks_adapter) are exported here
# once they exist; import them from their modules meanwhile.
