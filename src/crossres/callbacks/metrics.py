"""The paper's metrics live in the test loop, on the ``crossres.metrics`` torchmetrics classes.

Per (model, attack configuration, resolution) the callback keeps an ``AttackSuccessRate``
(Table 1), a ``HitRate`` (CMC rank 1, Table 2) and an ``FPIRAtFNIR`` (open set, Table 3). It
updates them from the result rows as the store callback writes them (``subscribe``), so the
metrics see exactly what the report will read; a resumed run seeds them (on rank 0) with the
rows stored before it started. Every ``log_every_n_batches`` batches it logs the running
values of this process to the trainer's loggers; at the end of the test epoch the states are
gathered across processes the torchmetrics way (``dist_reduce_fx="cat"``, duplicates of
``DistributedSampler`` padding dropped by sample id), and the global values, equal to the
report's tables, are logged and kept in ``values``.

Names: ``<model>/<attack>/r<resolution>/<metric>`` with metric ``success_rate`` (attacks
only), ``hit_rate`` and ``fpir_at_fnir``. A value the report shows as "-" (no correctly
classified clean sample, no mated or no non-mated search) is NaN here and is not logged.

Success of a feature attack (DR) is the attack's own criterion, as in the report: every
sample counts, and its success flag is the outcome (``AttackSuccessRate`` with the label as
the clean prediction and the flag as a moved prediction).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from crossres.callbacks.store import find_writer
from crossres.metrics import AttackSuccessRate, FPIRAtFNIR, HitRate
from crossres.metrics.functional import ProbeSummary
from crossres.store import CLEAN, ResultRow

Key = tuple[str, str, int]  # (model, attack, resolution)
FEATURE_OBJECTIVES = ("impersonation", "dodging")
# what a cell needs globally before a value is defined (else NaN, as the report's "-")
CLOSED, OPEN_MATED, OPEN_NONMATED = "closed", "open_mated", "open_nonmated"


def objective_of(row: ResultRow) -> str:
    """ "clean", or the attack's objective as recorded in its parameters."""
    if row.attack == CLEAN:
        return CLEAN
    return str(json.loads(row.params).get("objective", "untargeted"))


@dataclass
class Cell:
    """The metrics of one (model, attack, resolution). States stay on ``device``; every update
    appends (possibly empty) tensors of fixed dtypes, so the states of every process can be
    gathered even where a process saw none of a kind."""

    objective: str
    device: torch.device
    target_fnir: float
    seen: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        # local compute for the live values; the final compute syncs explicitly
        kw = {"sync_on_compute": False, "compute_with_cache": False}
        self.success = (
            None
            if self.objective == CLEAN
            else AttackSuccessRate(targeted=self.objective == "targeted", **kw).to(self.device)
        )
        self.hit = HitRate(**kw).to(self.device)
        self.fpir = FPIRAtFNIR(target_fnir=self.target_fnir, **kw).to(self.device)

    def update(self, rows: Sequence[ResultRow]) -> None:
        def t(values, dtype=torch.long):
            return torch.tensor(list(values), dtype=dtype, device=self.device)

        sid = t(r.sample_id for r in rows)
        if self.success is not None:
            if self.objective in FEATURE_OBJECTIVES:
                zeros = torch.zeros_like(sid)
                self.success.update(zeros, t(bool(r.success) for r in rows), zeros, sid)
            else:
                args = (t(r.clean_top1 for r in rows), t(r.adv_top1 for r in rows))
                labels = t(r.identity for r in rows)
                if self.objective == "targeted":
                    self.success.update(*args, labels, sid, targets=t(r.target for r in rows))
                else:
                    self.success.update(*args, labels, sid)
        rank = t(r.mate_rank for r in rows)
        closed = rank > 0
        score = t((r.mate_score for r in rows), torch.float64)
        # the closed search's top score: the better of the mate and the best non-mate
        top = torch.maximum(score, t((r.best_nonmate_score for r in rows), torch.float64))
        self.hit.update(
            ProbeSummary(rank[closed], score[closed], top[closed]), sample_id=sid[closed]
        )
        open_rank = t(r.open_mate_rank for r in rows)
        self.fpir.update(
            ProbeSummary(
                open_rank,
                t((r.open_mate_score for r in rows), torch.float64),
                t((r.open_top_score for r in rows), torch.float64),
            ),
            sample_id=sid,
        )
        for kind, present in (
            (CLOSED, closed),
            (OPEN_MATED, open_rank > 0),
            (OPEN_NONMATED, open_rank == 0),
        ):
            if bool(present.any()):
                self.seen.add(kind)

    def values(self, seen: set[str], *, synced: bool) -> dict[str, float]:
        """Metric values given what was ``seen`` (by every process, when ``synced``)."""
        metrics = {} if self.success is None else {"success_rate": (self.success, set())}
        metrics["hit_rate"] = (self.hit, {CLOSED})
        metrics["fpir_at_fnir"] = (self.fpir, {OPEN_MATED, OPEN_NONMATED})
        out = {}
        for name, (metric, needs) in metrics.items():
            if not needs <= seen or not metric.update_called:
                out[name] = math.nan
                continue
            if synced:
                with metric.sync_context():
                    out[name] = float(metric.compute())
            else:
                out[name] = float(metric.compute())
        return out


class MetricCallback(pl.Callback):
    """target_fnir: the FNIR of the open-set operating point (Table 3: 1e-2).
    log_every_n_batches: how often the running values are logged (0: only the final ones)."""

    def __init__(self, *, target_fnir: float = 1e-2, log_every_n_batches: int = 1) -> None:
        if not 0.0 < target_fnir < 1.0:
            raise ValueError(f"target_fnir must be in (0, 1), got {target_fnir}")
        if log_every_n_batches < 0:
            raise ValueError(f"log_every_n_batches must be >= 0, got {log_every_n_batches}")
        self.target_fnir = float(target_fnir)
        self.log_every_n_batches = int(log_every_n_batches)
        self.cells: dict[Key, Cell] = {}
        self.values: dict[str, float] = {}  # the final, global values (every process)
        self._device = torch.device("cpu")
        self._touched: set[Key] = set()
        self._batches = 0

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.cells, self.values, self._touched, self._batches = {}, {}, set(), 0
        self._device = pl_module.device
        writer = find_writer(trainer, "MetricCallback")
        if trainer.global_rank == 0:  # one process seeds: the rows of an interrupted run
            self.update(writer.stored_rows())
        self._touched.clear()
        writer.subscribe(self.update)

    def update(self, rows: Sequence[ResultRow]) -> None:
        """Add ``rows`` to the metrics of their (model, attack, resolution)."""
        groups: dict[Key, list[ResultRow]] = defaultdict(list)
        for r in rows:
            groups[(r.model, r.attack, r.resolution)].append(r)
        for key, members in groups.items():
            self._cell(key, objective_of(members[0])).update(members)
            self._touched.add(key)

    def _cell(self, key: Key, objective: str) -> Cell:
        cell = self.cells.get(key)
        if cell is None:
            cell = self.cells[key] = Cell(objective, self._device, self.target_fnir)
        elif cell.objective != objective:
            raise ValueError(f"{key}: rows of objectives {cell.objective} and {objective}")
        return cell

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batches += 1
        n = self.log_every_n_batches
        if n and self._batches % n == 0 and self._touched:
            live = {}
            for key in sorted(self._touched):
                cell = self.cells[key]
                live.update(named(key, cell.values(cell.seen, synced=False)))
            self._touched.clear()
            log(trainer, live, step=self._batches)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every process must sync the same cells in the same order: agree on them first
        local = {key: (cell.objective, sorted(cell.seen)) for key, cell in self.cells.items()}
        everyone = [local]
        if dist.is_available() and dist.is_initialized():
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, local)
        merged: dict[Key, tuple[str, set[str]]] = {}
        for part in everyone:
            for key, (objective, seen) in part.items():
                _, before = merged.setdefault(key, (objective, set()))
                before.update(seen)
        values = {}
        for key in sorted(merged):
            objective, seen = merged[key]
            cell = self.cells.get(key)
            if cell is None:  # this process saw none of it: empty, typed states to gather
                cell = self._cell(key, objective)
                cell.update([])
            values.update(named(key, cell.values(seen, synced=True)))
        self.values = values
        log(trainer, values, step=self._batches + 1)


def named(key: Key, values: dict[str, float]) -> dict[str, float]:
    model, attack, res = key
    return {f"{model}/{attack}/r{res}/{k}": v for k, v in values.items() if not math.isnan(v)}


def log(trainer: pl.Trainer, metrics: dict[str, float], *, step: int) -> None:
    if metrics:
        for logger in trainer.loggers:  # loggers write on global rank 0 only
            logger.log_metrics(metrics, step=step)
