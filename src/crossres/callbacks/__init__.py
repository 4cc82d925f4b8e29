"""Lightning callbacks: attack crafting, result store, report and W&B logging."""

from crossres.callbacks.attack import AttackCallback
from crossres.callbacks.report import ReportCallback
from crossres.callbacks.store import ResultStoreCallback

__all__ = ["AttackCallback", "ReportCallback", "ResultStoreCallback"]
