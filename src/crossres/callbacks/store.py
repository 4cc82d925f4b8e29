"""Connects the frozen target to the result store: every finished batch is written at once."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

from crossres.store import ResultStore


class ResultStoreCallback(pl.Callback):
    """One writer per process under ``<run_dir>/results``; keys already stored (by any process
    of an earlier, interrupted run) are skipped, so a rerun resumes."""

    def __init__(self, run_dir: str | None = None) -> None:
        self.run_dir = run_dir
        self.writer = None

    def resolve_dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.run_dir or trainer.default_root_dir)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "test":  # the store holds benchmark results, not training runs
            return
        store = ResultStore(self.resolve_dir(trainer))
        pl_module.done_keys = store.done_keys()
        trainer.strategy.barrier("crossres-store")  # every process has read before any writes
        self.writer = store.writer(trainer.global_rank)
        pl_module.sink = self.writer.write

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        pl_module.sink = None
