"""The result store: the source of truth of a run.

One row per (model, attack configuration, sample, resolution), written as soon as a batch is
done. Each process writes its own SQLite file (WAL mode, one transaction per batch, so a
SIGKILL loses at most the batch in flight); readers merge every file of the run, dropping
duplicate keys (DistributedSampler padding, or a batch redone after a crash). Reports, tables,
plots and W&B logging are views of it; a rerun skips the keys it already holds.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from crossres.errors import CrossresError
from crossres.phases import mark

CLEAN = "clean"  # the attack name of the rows that score the unattacked queries


class CorruptStoreError(CrossresError):
    """A result file of the run cannot be read."""


class StoreWriteError(CrossresError):
    """A batch of rows could not be written (disk full, file-size limit, I/O error)."""


@dataclass
class ResultRow:
    """One sample at one resolution, scored on one model, clean or after one attack.

    Closed-set columns: ``mate_rank`` (1 = the mate template scores highest; ties count
    against the probe), ``mate_score`` and ``best_nonmate_score`` against the full gallery.
    Open-set columns, against the gallery without the non-mated identities: ``open_mated``
    (the identity is enrolled there), ``open_mate_rank``/``open_mate_score`` (mated only) and
    ``open_top_score`` (highest score of any template).
    ``space``: where the attack worked, "model_input" (the paper's) or "low_resolution" (the
    capture before upsampling); its norms are measured there. ``target_score`` /
    ``clean_target_score``: score of the attacked / clean probe against the closed-set template
    of ``target`` (the impersonation target), NaN without a target: the impostor pairs of the
    verification (1:1) tables. ``feature_drift`` (clean rows, when the frozen target measures
    it): L2 distance between the probe's features at this resolution and the same face's at the
    original resolution, how far resolution alone moves a face in the model's space. Files
    written before these columns existed read as "model_input" and NaN.
    """

    model: str
    attack: str
    sample_id: int
    resolution: int
    identity: int
    params: str = "{}"  # the attack configuration, JSON
    success: bool | None = None  # None for clean rows
    target: int | None = None  # target identity of a targeted / impersonation attack
    l0: float = 0.0
    l2: float = 0.0
    linf: float = 0.0
    iterations: int = 0
    clean_top1: int = -1
    adv_top1: int = -1
    mate_rank: int = 0
    mate_score: float = float("nan")
    best_nonmate_score: float = float("nan")
    open_mated: bool = True
    open_mate_rank: int = 0
    open_mate_score: float = float("nan")
    open_top_score: float = float("nan")
    seconds: float = 0.0
    path: str = ""
    space: str = "model_input"
    target_score: float = float("nan")
    clean_target_score: float = float("nan")
    feature_drift: float = float("nan")

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.model, self.attack, self.sample_id, self.resolution)


_COLUMNS = [f.name for f in fields(ResultRow)]
_KEY = ("model", "attack", "sample_id", "resolution")
_SCORES = (
    "mate_score",
    "best_nonmate_score",
    "open_mate_score",
    "open_top_score",
    "target_score",
    "clean_target_score",
    "feature_drift",
)
_DEFAULTS = {f.name: f.default for f in fields(ResultRow)}


def _sql_type(f) -> str:
    base = f.type.split("|")[0].strip() if isinstance(f.type, str) else f.type
    return {"str": "TEXT", "int": "INTEGER", "float": "REAL", "bool": "INTEGER"}.get(base, "TEXT")


def _schema() -> str:
    cols = [f"{f.name} {_sql_type(f)}" for f in fields(ResultRow)]
    return (
        f"CREATE TABLE IF NOT EXISTS results ({', '.join(cols)}, PRIMARY KEY ({', '.join(_KEY)}))"
    )


def _file_columns(con: sqlite3.Connection) -> set[str]:
    return {r[1] for r in con.execute("PRAGMA table_info(results)")}


class ResultStore:
    """All result files of one run directory (``<run_dir>/results/rank-*.sqlite``)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir) / "results"

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("rank-*.sqlite")) if self.dir.is_dir() else []

    def writer(self, rank: int = 0) -> StoreWriter:
        self.dir.mkdir(parents=True, exist_ok=True)
        return StoreWriter(self.dir / f"rank-{rank}.sqlite")

    def _select(self, columns: Sequence[str]) -> Iterator[tuple]:
        """Values of ``columns`` from every file; a file still being created is empty."""
        for path in self.files():
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
            try:
                if not con.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='results'"
                ).fetchone():
                    continue
                have = _file_columns(con)
                # a file from before a column existed: NULL there (the row's default on read)
                wanted = [c if c in have else f"NULL AS {c}" for c in columns]
                yield from con.execute(f"SELECT {', '.join(wanted)} FROM results")
            except sqlite3.DatabaseError as err:
                others = [f for f in self.files() if f != path]
                raise CorruptStoreError(
                    f"result file {path} is unreadable ({err}); the run's other "
                    f"{len(others)} result file(s) are intact. Move it aside (e.g. to "
                    f"{path.name}.corrupt) and rerun the same command: the rows it held are "
                    "crafted again, every other stored row is kept."
                ) from err
            finally:
                con.close()

    def rows(self) -> list[ResultRow]:
        """Every row of the run, one per key (first file wins), in key order."""
        merged: dict[tuple, ResultRow] = {}
        for values in self._select(_COLUMNS):
            row = _row_from_sql(values)
            merged.setdefault(row.key, row)
        return [merged[k] for k in sorted(merged)]

    def done_keys(self) -> set[tuple[str, str, int, int]]:
        """Keys already stored by any process (what a resumed run skips)."""
        return set(self._select(_KEY))


class StoreWriter:
    """One process's writer: a batch of rows is one transaction (all or nothing). A key
    already in the file is kept (a batch redone after a crash); attack names are unique per
    run (``AttackCallback`` refuses duplicates at set-up), so no other row is ever dropped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.con = sqlite3.connect(path, timeout=60)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=NORMAL")
        self.con.execute(_schema())
        have = _file_columns(self.con)
        for f in fields(ResultRow):  # a resumed file from before a column existed
            if f.name not in have:
                self.con.execute(f"ALTER TABLE results ADD COLUMN {f.name} {_sql_type(f)}")
        self.con.commit()

    def write(self, rows: Iterable[ResultRow]) -> int:
        values = [_row_to_sql(r) for r in rows]
        if not values:
            return 0
        mark("store")
        marks = ", ".join("?" for _ in _COLUMNS)
        try:
            with self.con:  # one transaction: on failure it rolls back, earlier ones stay
                cur = self.con.executemany(
                    f"INSERT OR IGNORE INTO results ({', '.join(_COLUMNS)}) VALUES ({marks})",
                    values,
                )
        except (sqlite3.OperationalError, OSError) as err:
            # SQLite says "database or disk is full" for ENOSPC, "disk I/O error" for EFBIG
            raise StoreWriteError(
                f"cannot write to the result file {self.path} ({err}): disk full or file too "
                "large? The rows stored so far are kept; free space and rerun the same command "
                "to resume."
            ) from err
        return cur.rowcount

    def close(self) -> None:
        self.con.close()


def _row_to_sql(row: ResultRow) -> tuple:
    out = []
    for name in _COLUMNS:
        v = getattr(row, name)
        out.append(int(v) if isinstance(v, bool) else v)
    return tuple(out)


def _row_from_sql(values: Sequence) -> ResultRow:
    d = dict(zip(_COLUMNS, values, strict=True))
    for name in ("success", "open_mated"):
        if d[name] is not None:
            d[name] = bool(d[name])
    for name in _SCORES:
        if d[name] is None:  # SQLite stores NaN as NULL
            d[name] = float("nan")
    if d["space"] is None:
        d["space"] = _DEFAULTS["space"]
    return ResultRow(**d)


def rows_to_dicts(rows: Iterable[ResultRow]) -> list[dict]:
    return [dataclasses.asdict(r) for r in rows]


def params_json(params: dict) -> str:
    """Canonical JSON of an attack configuration (sorted keys), used in keys and tables."""
    return json.dumps(params, sort_keys=True, default=str)
