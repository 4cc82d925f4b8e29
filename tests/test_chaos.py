"""Chaos: the default pipeline, SIGKILLed at seeded random moments in every phase and resumed
with the same command each time, stores exactly the rows of an uninterrupted run.

A reduced default run (the embedded real faces from a local mirror of their archives,
dlib_resnet29, 2 resolutions, 14 queries, a short CW and a short DR) is run three times, each
as subprocesses of ``python -m crossres.cli test``:

1. uninterrupted: the reference rows, and the typical duration of every phase;
2. one process, killed at least 5 times: in the dlib weight conversion, the face fetch (the
   faces cache is emptied first), the template computation, crafting, a store write and the
   report, then resumed to its end;
3. two gloo DDP processes, the whole process group killed at least 5 times, then resumed.

Both stores must equal the reference row by row, every column but the timings, with no key
stored twice in the raw ``rank-*.sqlite`` files. A fourth test kills ``crossres prepare`` (a
reduced CR recipe) in the face fetch, the dlib conversion, the training and the save, and
requires the weights it finally records to be the uninterrupted run's, byte for byte; a fifth
kills a writer of large batches inside its SQLite transactions. The harness (``tests/chaos_harness.py``) sees only the command
line, the phase markers of ``crossres.phases`` and the store. Run alone:
``PYTHONPATH=src python -m pytest -m chaos -s tests/test_chaos.py`` (``-s`` prints the kills).
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from chaos_harness import (
    Aim,
    Kill,
    differences,
    raw_keys,
    read_markers,
    run_to_end,
    run_with_kills,
    typical_durations,
)
from cli_configs import crossres_config, cw, datamodule, dr, frozen_target
from crossres.io import sha256_file, verify_file
from crossres.lightning_modules.cr_recipe import CR_DLIB_RECIPE
from crossres.paths import cache_dir
from crossres.store import ResultStore

pytestmark = pytest.mark.chaos

SEED = 16
N_ROWS = 14 * 2 * 3  # queries x resolutions x (clean + 2 attacks)
MIN_KILLS = 5
# one kill per entry, in pipeline order (the DDP run reuses the fetched faces)
SINGLE_PHASES = ("convert", "fetch", "templates", "craft", "store", "report")
DDP_PHASES = ("templates", "craft", "store", "craft", "report")

CONFIG = crossres_config(
    frozen_target("dlib_resnet29", "Base"),
    datamodule(
        "EmbeddedFacesDataModule",
        resolutions=[16, 0],
        n_single_queries=2,
        max_queries_per_identity=1,
        max_distractors=40,  # a gallery of ~80 faces: templates take a few seconds
        batch_size=4,
    ),
    [cw("CW-L2 (1-4)", binary_search_steps=1, steps=4), dr("DR (4-4)", epsilon=4 / 255, steps=4)],
)


class Bench:
    """The three runs' shared set-up: config, faces folder, mirror, environment."""

    def __init__(self, tmp: Path, mirror: Path) -> None:
        self.tmp = tmp
        self.faces = tmp / "faces"  # one faces folder: rows name the photo paths in it
        cfg = yaml.safe_load(yaml.safe_dump(CONFIG))
        cfg["data"]["init_args"]["faces_cache"] = str(self.faces)
        self.config = tmp / "config.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.base_env = {
            **os.environ,
            "CROSSRES_FACES_MIRROR": str(mirror),
            "OMP_NUM_THREADS": "1",  # the same thread count in every run and rank
            "PYTHONUNBUFFERED": "1",
        }
        self.base_env.pop("CROSSRES_PHASE_LOG", None)

    def env(self, name: str) -> dict:
        """A cache of its own per run, so weights are converted and templates computed."""
        return {**self.base_env, "CROSSRES_CACHE": str(self.tmp / f"cache-{name}")}

    def command(self, name: str, *extra: str) -> list[str]:
        run_dir = self.tmp / f"run-{name}"
        return [sys.executable, "-m", "crossres.cli", "test", "--config", str(self.config),
                "--trainer.default_root_dir", str(run_dir), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Bench:
    archives = cache_dir("faces") / "archives"
    found = sorted(archives.glob("*.tar*")) if archives.is_dir() else []
    if not found:
        pytest.skip(f"no face archives cached in {archives}: run `crossres fetch-faces` first")
    tmp = tmp_path_factory.mktemp("chaos")
    mirror = tmp / "mirror"
    mirror.mkdir()
    for a in found:  # a local mirror of the registries: links to the verified archives
        (mirror / a.name).symlink_to(a)
    return Bench(tmp, mirror)


@pytest.fixture(scope="module")
def reference(bench: Bench) -> tuple[Path, dict[str, float]]:
    """The uninterrupted run, its phase durations; then the faces folder is emptied so that
    the chaos run fetches the faces again (from the mirror) under kills."""
    log = bench.tmp / "phases-reference.log"
    env = {**bench.env("reference"), "CROSSRES_PHASE_LOG": str(log)}
    wall = run_to_end(bench.command("reference"), env, bench.tmp / "reference.err", timeout=300)
    markers, _ = read_markers(log)
    durations = typical_durations(markers, end=time.time())
    print(f"\nreference: {wall:.1f} s; typical phase durations (s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in sorted(durations.items())))  # fmt: skip
    rows = ResultStore(bench.tmp / "run-reference").rows()
    assert len(rows) == N_ROWS, f"the reference run stored {len(rows)} rows, not {N_ROWS}"
    shutil.rmtree(bench.faces)
    return bench.tmp / "run-reference", durations


# How far into its phase a kill may land, as a fraction of the phase's median duration in the
# reference run: half, so that it lands in a shorter-than-typical instance too; a tenth for the
# dlib conversion, whose reference instance reads dlib's file cold and takes ~0.3 s, while a
# later instance reads it from the page cache in under half that (CI hit the next phase once).
MAX_FRACTION = {"convert": 0.1}


def fraction(phase: str, rng: random.Random) -> float:
    return rng.uniform(0.0, MAX_FRACTION.get(phase, 0.5))


def aims(phases: Sequence[str], rng: random.Random) -> list[Aim]:
    """One kill per phase, in pipeline order; crafting and store writes at a random batch,
    the fetch at a random archive, every kill a random fraction into its phase
    (``MAX_FRACTION``)."""
    nth = {"fetch": rng.randint(1, 2), "craft": rng.randint(1, 4), "store": rng.randint(1, 6)}
    return [Aim(p, nth.get(p, 1), fraction(p, rng)) for p in phases]


def check_kills(name: str, kills: Sequence[Kill], wall: float, phases: Sequence[str]) -> None:
    """Print where the kills landed (``-s`` shows it); at least ``MIN_KILLS``, every phase hit."""
    hits = [k.hit for k in kills]
    print(f"\n{name}: {len(kills)} kills survived, {wall:.1f} s in all; phases hit: {hits}")
    for k in kills:
        print(f"  aimed {k.aim.phase} #{k.aim.nth} +{k.aim.fraction:.2f}: hit {k.hit} "
              f"(other ranks: {k.others or '-'}) {k.after_s:.1f} s into the attempt")  # fmt: skip
    assert len(kills) >= MIN_KILLS, f"only {len(kills)} kills landed: {hits}"
    missed = set(phases) - set(hits)
    assert not missed, f"no kill landed in {sorted(missed)}: {hits}"


def check_chaos(
    bench: Bench, reference, name: str, phases: Sequence[str], *extra: str, rel_tol: float = 0.0
) -> None:
    ref_dir, durations = reference
    kills, wall = run_with_kills(
        bench.command(name, *extra),
        bench.env(name),
        log=bench.tmp / f"phases-{name}.log",
        aims=aims(phases, random.Random(f"{SEED}-{name}")),
        durations=durations,
        stderr=bench.tmp / f"{name}.err",
        timeout=300,
    )
    check_kills(name, kills, wall, phases)
    problems = differences(bench.tmp / f"run-{name}", ref_dir, rel_tol=rel_tol, abs_tol=1e-7)
    assert not problems, f"{len(problems)} problems, e.g. " + "\n".join(problems[:10])
    assert (bench.tmp / f"run-{name}" / "report.md").is_file()


def test_killed_in_every_phase_then_resumed_stores_the_same_rows(bench, reference):
    check_chaos(bench, reference, "single", SINGLE_PHASES)


def test_ddp_killed_in_every_phase_then_resumed_stores_the_same_rows(bench, reference):
    ddp = ("--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu")
    # Two ranks batch the queries differently, and dlib_resnet29's features move by float32
    # rounding with the batch size (~2e-7 measured): the DDP rows differ from the
    # single-process ones by up to 4.4e-7 relative in the float scores and norms (measured),
    # so those get 10x that; every other column, and every key, must match exactly.
    check_chaos(bench, reference, "ddp", DDP_PHASES, *ddp, rel_tol=5e-6)
    assert len(ResultStore(bench.tmp / "run-ddp").files()) == 2


# `crossres prepare` on a reduced CR recipe (2 epochs of 2 batches): killed while it fetches
# the faces, converts dlib's weights, starts the training, trains an epoch and saves the
# weights, then resumed; the weights it records must be the uninterrupted run's, byte for byte.
PREPARE_PHASES = ("fetch", "convert", "cr-train", "cr-epoch", "cr-save")


def small_recipe() -> dict:
    recipe = copy.deepcopy(CR_DLIB_RECIPE)
    recipe["trainer"].update(max_epochs=2, limit_train_batches=2)
    recipe["data"]["init_args"]["source"]["init_args"]["batch_size"] = 8
    return recipe


def prepared_record(cache: Path) -> dict:
    record = json.loads((cache / "models" / "dlib_resnet29_cr.prepared.json").read_text())
    weights = cache / "models" / record["weights"]
    assert sha256_file(weights) == record["sha256"] == verify_file(weights)
    return record


def test_prepare_killed_in_every_phase_then_resumed_records_the_same_weights(bench):
    recipe = bench.tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(small_recipe()))
    faces = bench.tmp / "prepare-faces"

    def command() -> list[str]:
        return [sys.executable, "-m", "crossres.cli", "prepare", "--recipe", str(recipe),
                "--faces-cache", str(faces)]  # fmt: skip

    log = bench.tmp / "phases-prepare-reference.log"
    env = {**bench.env("prepare-reference"), "CROSSRES_PHASE_LOG": str(log)}
    wall = run_to_end(command(), env, bench.tmp / "prepare-reference.err", timeout=300)
    markers, _ = read_markers(log)
    durations = typical_durations(markers, end=time.time())
    print(f"\nprepare reference: {wall:.1f} s; phases (s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in sorted(durations.items())))  # fmt: skip
    want = prepared_record(bench.tmp / "cache-prepare-reference")
    shutil.rmtree(faces)  # fetched again, under kills

    rng = random.Random(f"{SEED}-prepare")
    nth = {"fetch": rng.randint(1, 2), "cr-epoch": rng.randint(1, 2)}
    kills, wall = run_with_kills(
        command(),
        bench.env("prepare"),
        log=bench.tmp / "phases-prepare.log",
        aims=[Aim(p, nth.get(p, 1), fraction(p, rng)) for p in PREPARE_PHASES],
        durations=durations,
        stderr=bench.tmp / "prepare.err",
        timeout=300,
    )
    check_kills("prepare", kills, wall, PREPARE_PHASES)
    got = prepared_record(bench.tmp / "cache-prepare")
    assert got == want, "the resumed preparation recorded other weights"
    models = bench.tmp / "cache-prepare" / "models"
    assert not [p.name for p in models.iterdir() if p.is_dir()], "a work folder was left"


# A store write lasts about a millisecond in the pipeline, so a kill aimed at it lands there
# only by chance (the marker comes first). Here large batches make each write long enough
# to be killed mid-transaction for sure: every batch must be all or nothing.
WRITER = """
import sys
from crossres.store import ResultRow, ResultStore

store = ResultStore(sys.argv[1])
done = store.done_keys()  # what a resumed run skips
writer = store.writer(0)
for b in range({batches}):
    rows = [
        ResultRow(model="m", attack="a", sample_id=i, resolution=16, identity=i % 7,
                  l2=i / 7, success=i % 3 == 0, path=f"face-{{i}}.jpg")
        for i in range(b * {size}, (b + 1) * {size})
    ]
    writer.write([r for r in rows if r.key not in done])
writer.close()
"""
BATCHES, BATCH = 8, 5000


def test_store_killed_mid_transaction_keeps_whole_batches(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(batches=BATCHES, size=BATCH))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("CROSSRES_PHASE_LOG", None)
    ref_log = tmp_path / "phases-reference.log"
    run_to_end([sys.executable, str(script), str(tmp_path / "reference")],
               {**env, "CROSSRES_PHASE_LOG": str(ref_log)}, tmp_path / "ref.err", timeout=120)  # fmt: skip
    markers, _ = read_markers(ref_log)
    durations = typical_durations(markers, end=time.time())
    run_dir = tmp_path / "killed"
    interrupted = []

    def check(kill) -> None:
        n = sum(raw_keys(run_dir).values())
        assert n % BATCH == 0, f"a kill left {n} rows: part of a batch"
        markers, _ = read_markers(tmp_path / "phases.log")
        # a write whose marker is there but whose rows are not was cut mid-transaction
        interrupted.append(n // BATCH < sum(m.phase == "store" for m in markers))

    rng = random.Random(f"{SEED}-store")
    kills, wall = run_with_kills(
        [sys.executable, str(script), str(run_dir)],
        env,
        log=tmp_path / "phases.log",
        aims=[Aim("store", rng.randint(1, 2), rng.uniform(0.0, 0.9)) for _ in range(MIN_KILLS)],
        durations=durations,
        stderr=tmp_path / "killed.err",
        timeout=120,
        on_kill=check,
    )
    print(f"\nstore: {len(kills)} kills survived, {sum(interrupted)} mid-transaction, {wall:.1f} s")
    assert len(kills) == MIN_KILLS and sum(interrupted) >= MIN_KILLS - 1, interrupted
    assert not differences(run_dir, tmp_path / "reference")
    assert sum(raw_keys(run_dir).values()) == BATCHES * BATCH
