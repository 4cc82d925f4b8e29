"""The result writer: every row of a benchmark run goes through this one callback.

In the style of Lightning's ``BasePredictionWriter``: the callback owns one writer per process
under ``<run_dir>/results``; at the end of every test batch it writes the clean rows of the
frozen target's output (``write_on_batch_end``), and the attack callbacks hand it their rows
through ``write``. Keys already stored (by any process of an earlier, interrupted run) are
skipped (``pending``), so a rerun resumes. Other callbacks find it with ``find_writer`` and
may ``subscribe`` to the rows as they are written (the metric callback does).

It is also the one source of truth for the run directory (``run_dir``, else the trainer's
``default_root_dir``), and records the targets' weight hashes and the data manifest hash in
``run.json``, refusing a rerun whose weights or data differ from the stored rows'.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch

from crossres.errors import CrossresError
from crossres.lightning_modules.frozen_target import FrozenTarget, TargetOutput
from crossres.run_dir import check_run_facts, update_run_record
from crossres.store import CLEAN, ResultRow, ResultStore, StoreWriter
from crossres.types import FaceBatch

RowListener = Callable[[list[ResultRow]], None]


def run_directory(run_dir: str | os.PathLike | None, default_root_dir: str | None) -> Path:
    """The run directory: ``run_dir`` when set, else the trainer's ``default_root_dir``, else
    the working directory (the CLI and the callbacks resolve it with this one rule)."""
    return Path(run_dir or default_root_dir or os.getcwd())


class ResultStoreCallback(pl.Callback):
    """run_dir: the run directory (None: the trainer's ``default_root_dir``)."""

    def __init__(self, run_dir: str | None = None) -> None:
        self.run_dir = run_dir
        self.dir: Path | None = None  # resolved in setup
        self._store: ResultStore | None = None
        self._writer: StoreWriter | None = None
        self._rank = 0
        self._done: set[tuple] = set()
        self._listeners: list[RowListener] = []

    def resolve_dir(self, trainer: pl.Trainer) -> Path:
        return run_directory(self.run_dir, trainer.default_root_dir)

    # ---------------------------------------------------------------- lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "test":  # the store holds benchmark results, not training runs
            return
        self.dir = self.resolve_dir(trainer)
        if isinstance(pl_module, FrozenTarget):
            # every process checks (all refuse alike, no one waits at a barrier); one records
            check_run_facts(
                self.dir,
                weights=pl_module.weight_record(),
                # the datamodule's public manifest hash (set by its setup, which ran before)
                manifest_hash=str(getattr(trainer.datamodule, "manifest_hash", "") or ""),
                record=trainer.global_rank == 0,
            )
        self._store = ResultStore(self.dir)
        self._done = self._store.done_keys()
        self._rank = trainer.global_rank
        trainer.strategy.barrier("crossres-store")  # every process has read before any writes

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the targets exist now (built in the module's setup): say which classifier each
        # target's classification attacks attack (the report's classifier section reads it)
        kinds = pl_module.classifier_kinds if isinstance(pl_module, FrozenTarget) else None
        if kinds and trainer.global_rank == 0 and self.dir is not None:
            update_run_record(self.dir, classifiers=kinds)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._listeners.clear()

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch: FaceBatch, batch_idx: int, dataloader_idx=0
    ) -> None:
        self.write_on_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def write_on_batch_end(
        self, trainer, pl_module, outputs, batch: FaceBatch, batch_idx: int
    ) -> None:
        """Write the clean rows of the target outputs of ``batch`` not stored yet."""
        for label, out in target_outputs(outputs, "ResultStoreCallback").items():
            todo = self.pending(label, CLEAN, batch)
            if todo.all():
                self.write(out.clean_rows(batch))
            elif todo.any():
                index = todo.nonzero().squeeze(1)
                self.write(out.select(index).clean_rows(subset(batch, index)))

    # ---------------------------------------------------------------- the writer
    def pending(self, model: str, attack: str, batch: FaceBatch) -> torch.Tensor:
        """Bool [B] (on the CPU): the samples of ``batch`` with no stored row yet."""
        return torch.tensor(
            [
                (model, attack, int(s), int(r)) not in self._done
                for s, r in zip(batch.sample_id.tolist(), batch.resolution.tolist(), strict=True)
            ],
            dtype=torch.bool,
        )

    def write(self, rows: Sequence[ResultRow]) -> None:
        """Write ``rows`` in one transaction, then pass them to every subscriber."""
        rows = list(rows)
        if not rows:
            return
        if self._store is None:
            raise RuntimeError("ResultStoreCallback.write called outside a test run (no setup)")
        if self._writer is None:  # opened on the first row: a run refused early leaves no file
            self._writer = self._store.writer(self._rank)
        self._writer.write(rows)
        for listener in self._listeners:
            listener(rows)

    def subscribe(self, listener: RowListener) -> None:
        """Call ``listener(rows)`` with every batch of rows this process writes."""
        self._listeners.append(listener)

    def stored_rows(self) -> list[ResultRow]:
        """The rows stored before this run started (what a resumed run skips)."""
        if self._store is None:
            raise RuntimeError("ResultStoreCallback.stored_rows called before setup")
        return [r for r in self._store.rows() if r.key in self._done]


def find_writer(trainer: pl.Trainer, who: str) -> ResultStoreCallback:
    """The trainer's ``ResultStoreCallback``; a clear error naming ``who`` needs it if none."""
    found = [c for c in trainer.callbacks if isinstance(c, ResultStoreCallback)]
    if not found:
        raise CrossresError(
            f"{who} needs a ResultStoreCallback in the trainer's callbacks (its rows go to the "
            "result store); `crossres test` adds one, with pl.Trainer add "
            "crossres.callbacks.ResultStoreCallback() to callbacks"
        )
    if len(found) > 1:
        raise CrossresError(
            f"{len(found)} ResultStoreCallbacks in the trainer's callbacks: a run has one result "
            "store (remove the extra one from trainer.callbacks)"
        )
    return found[0]


def target_outputs(outputs, who: str) -> dict[str, TargetOutput]:
    """``outputs`` of a test step, checked to be the frozen target's ``TestStepOutput``."""
    if not isinstance(outputs, dict) or not all(
        isinstance(v, TargetOutput) for v in outputs.values()
    ):
        raise TypeError(
            f"{who} needs the test step to return label -> TargetOutput (as FrozenTarget "
            f"does), got {type(outputs).__name__}"
        )
    return outputs


def subset(batch: FaceBatch, index: torch.Tensor) -> FaceBatch:
    """The samples of ``batch`` at ``index`` (a long tensor of positions)."""
    idx = index.to(batch.images.device)
    return FaceBatch(
        images=batch.images[idx],
        identity=batch.identity[idx],
        sample_id=batch.sample_id[idx],
        resolution=batch.resolution[idx],
        paths=[batch.paths[i] for i in index.tolist()] if batch.paths else [],
    )
