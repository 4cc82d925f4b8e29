"""Result files written before the ``space``/``target_score``/``clean_target_score`` columns
existed stay readable (as "model_input" and NaN) and resumable (the writer adds them)."""

from __future__ import annotations

import math
import sqlite3

from crossres.store import ResultRow, ResultStore

OLD_COLUMNS = (
    "model TEXT, attack TEXT, sample_id INTEGER, resolution INTEGER, identity INTEGER, "
    "params TEXT, success INTEGER, target INTEGER, l0 REAL, l2 REAL, linf REAL, "
    "iterations INTEGER, clean_top1 INTEGER, adv_top1 INTEGER, mate_rank INTEGER, "
    "mate_score REAL, best_nonmate_score REAL, open_mated INTEGER, open_mate_rank INTEGER, "
    "open_mate_score REAL, open_top_score REAL, seconds REAL, path TEXT"
)


def test_an_old_result_file_reads_and_resumes(tmp_path):
    (tmp_path / "results").mkdir()
    con = sqlite3.connect(tmp_path / "results" / "rank-0.sqlite")
    con.execute(
        f"CREATE TABLE results ({OLD_COLUMNS}, PRIMARY KEY (model, attack, sample_id, resolution))"
    )
    con.execute(
        "INSERT INTO results (model, attack, sample_id, resolution, identity, l2, mate_score) "
        "VALUES ('Base', 'CW', 7, 16, 3, 0.5, 0.25)"
    )
    con.commit()
    con.close()
    store = ResultStore(tmp_path)
    (old,) = store.rows()
    assert (old.key, old.l2, old.mate_score) == (("Base", "CW", 7, 16), 0.5, 0.25)
    assert old.space == "model_input"
    assert math.isnan(old.target_score) and math.isnan(old.clean_target_score)
    writer = store.writer(0)
    new = ResultRow("Base", "CW lr", 7, 16, 3, space="low_resolution", target_score=0.75)
    assert writer.write([new]) == 1
    writer.close()
    rows = {r.key: r for r in store.rows()}
    assert rows[new.key].space == "low_resolution" and rows[new.key].target_score == 0.75
    assert rows[old.key].space == "model_input"
