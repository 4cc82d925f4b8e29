"""At the end of the test loop: the report and the logged metrics, from the result store.

Runs on rank 0 after every process has written its rows (a barrier first), so the numbers
include every sample exactly once, also on a resumed run whose earlier rows were skipped.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from crossres.report.markdown import write_report
from crossres.report.tables import summarize
from crossres.store import ResultStore, rows_to_dicts


class ReportCallback(pl.Callback):
    """write_report: write ``report.md`` and its figures into the run directory.
    log_images: how many clean/adversarial pairs per (model, attack) go to W&B."""

    def __init__(self, *, write_report: bool = True, log_images: int = 4) -> None:
        self.write = write_report
        self.log_images = log_images

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.barrier("crossres-report")
        if trainer.global_rank != 0:
            return
        run_dir = Path(trainer.default_root_dir)
        rows = ResultStore(run_dir).rows()
        cells = summarize(rows)
        metrics = {}
        for c in cells:
            prefix = f"{c.model}/{c.attack}/r{c.resolution}"
            for name in ("success_rate", "hit_rate", "fpir_at_fnir", "mean_l2"):
                value = getattr(c, name)
                if not math.isnan(value):
                    metrics[f"{prefix}/{name}"] = value
        report = write_report(run_dir) if self.write else None
        for logger in trainer.loggers:
            logger.log_metrics(metrics)
            if isinstance(logger, WandbLogger):
                log_to_wandb(logger, rows, run_dir, report, pl_module, self.log_images)
        if report is not None:
            print(f"crossres: report written to {report}")


def log_to_wandb(logger: WandbLogger, rows, run_dir: Path, report, pl_module, n_images: int):
    import torch
    import wandb

    data = rows_to_dicts(rows)
    payload = {}
    if data:
        columns = list(data[0])
        payload["results"] = wandb.Table(
            columns=columns, data=[[d[c] for c in columns] for d in data]
        )
    for png in sorted((run_dir / "figures").glob("*.png")) if report else []:
        payload[f"figures/{png.stem}"] = wandb.Image(str(png))
    for (label, attack), (clean, adv) in getattr(pl_module, "examples", {}).items():
        clean, adv = clean[:n_images], adv[:n_images]
        diff = (adv - clean).abs()
        amplified = diff / diff.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        grid = torch.cat([clean, adv, amplified], dim=3)  # clean | adversarial | perturbation
        payload[f"examples/{label}/{attack}"] = [
            wandb.Image(
                g.permute(1, 2, 0).numpy(), caption="clean | adversarial | |delta| (scaled)"
            )
            for g in grid
        ]
    if payload:
        logger.experiment.log(payload)
