"""Lightning callbacks of the test loop: attack crafting, the result writer, live metrics, the
report and its W&B views. They read the frozen target's typed outputs (``TargetOutput``) and
write through the run's ``ResultStoreCallback``; none reads a private member of the module."""

from crossres.callbacks.attack import AttackCallback
from crossres.callbacks.metrics import MetricCallback
from crossres.callbacks.report import ReportCallback
from crossres.callbacks.store import ResultStoreCallback

__all__ = ["AttackCallback", "MetricCallback", "ReportCallback", "ResultStoreCallback"]
