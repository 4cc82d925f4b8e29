"""LightningModules: the frozen target of a benchmark run (test) and CR fine-tuning (fit)."""

from crossres.lightning_modules.cr_export import StudentExport
from crossres.lightning_modules.cr_training import CrossResolutionDistillation
from crossres.lightning_modules.frozen_target import FrozenTarget, TargetSpec

__all__ = ["CrossResolutionDistillation", "FrozenTarget", "StudentExport", "TargetSpec"]
