"""At the end of the test loop: the report, and its W&B views, from the result store.

Runs on rank 0 after every process has written its rows (a barrier first), so the numbers
include every sample exactly once, also on a resumed run whose earlier rows were skipped.
The run directory is the result store callback's (one source of truth); the example pairs
logged to W&B are the ones the attack callbacks kept. The identification metrics are logged
by ``MetricCallback``; this callback logs the mean perturbation size, a view of the store.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from crossres.callbacks.attack import AttackCallback
from crossres.callbacks.store import find_writer
from crossres.report.markdown import write_report
from crossres.report.tables import summarize
from crossres.report.wandb import run_payload
from crossres.store import ResultStore


class ReportCallback(pl.Callback):
    """write_report: write ``report.md`` and its figures into the run directory.
    log_images: how many clean/adversarial pairs per (model, attack) go to W&B."""

    def __init__(self, *, write_report: bool = True, log_images: int = 4) -> None:
        self.write = write_report
        self.log_images = log_images

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "test":
            find_writer(trainer, "ReportCallback")  # fail before the run, not after it

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.barrier("crossres-report")
        if trainer.global_rank != 0:
            return
        run_dir = find_writer(trainer, "ReportCallback").resolve_dir(trainer)
        rows = ResultStore(run_dir).rows()
        cells = summarize(rows)  # once: the metrics, the report and the W&B payload read them
        metrics = {
            f"{c.model}/{c.attack}/r{c.resolution}/mean_l2": c.mean_l2
            for c in cells
            if not math.isnan(c.mean_l2)
        }
        report = write_report(run_dir, rows=rows, cells=cells) if self.write else None
        examples = {
            (label, cb.name): (pair.clean, pair.adversarial)
            for cb in trainer.callbacks
            if isinstance(cb, AttackCallback)
            for label, pair in cb.examples.items()
        }
        for logger in trainer.loggers:
            if metrics:
                logger.log_metrics(metrics)
            if isinstance(logger, WandbLogger):
                figures = sorted((run_dir / "figures").glob("*.png")) if report else []
                payload = run_payload(
                    rows, figures=figures, examples=examples, n_images=self.log_images, cells=cells
                )
                if payload:
                    logger.experiment.log(payload)
        if report is not None:
            print(f"crossres: report written to {report}")
