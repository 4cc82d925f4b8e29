"""Overhead of the Lightning test loop over the attacks alone, and the default run's wall time.

Both measured in one run on the same batches: (a) the attack called directly on every batch
of the datamodule's test loader; (b) ``trainer.test`` with the same attack as a callback
(clean scoring, result rows, store writes included; gallery templates already cached, timed
from the first to the last batch). Prints (b) / (a): the issue's bar is at most 1.10.

    .venv/bin/python benchmarks/pipeline.py [--default-run]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from crossres.attacks import CarliniWagnerL2
from crossres.callbacks import AttackCallback, ResultStoreCallback
from crossres.datamodules import EmbeddedFacesDataModule
from crossres.lightning_modules import FrozenTarget, TargetSpec


class LoopTimer(pl.Callback):
    def on_test_batch_start(self, *args) -> None:
        if not hasattr(self, "start"):
            self.start = time.perf_counter()

    def on_test_end(self, *args) -> None:
        self.seconds = time.perf_counter() - self.start


def build(resolutions: list[int], batch_size: int):
    dm = EmbeddedFacesDataModule(resolutions=resolutions, n_single_queries=4, batch_size=batch_size)
    module = FrozenTarget([TargetSpec("dlib_resnet29", "Base")])
    dm.configure_for(module.input_config())
    return dm, module


def attacks_alone(dm, module, attack) -> float:
    module.build_targets(dm)
    target = module.targets["Base"]
    batches = list(dm.test_dataloader())
    total = 0.0
    for batch in batches:
        with torch.no_grad():
            clean_top1 = target.class_ids[target.model(batch.images).argmax(1)]
        labels = target.attack_labels(batch.identity, clean_top1)
        start = time.perf_counter()
        attack(target.model, batch.images, labels)
        total += time.perf_counter() - start
    return total


def test_loop(dm, module, attack) -> float:
    timer = LoopTimer()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            inference_mode=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=run_dir,
            callbacks=[ResultStoreCallback(), AttackCallback(attack, name="CW"), timer],
        )
        trainer.test(module, datamodule=dm)
    return timer.seconds


def default_run_seconds() -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "crossres.cli",
                "test",
                "--config",
                str(Path(__file__).parents[1] / "configs" / "default.yaml"),
                "--trainer.default_root_dir",
                run_dir,
                "--trainer.logger",
                "false",
            ],
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolutions", type=int, nargs="+", default=[16, 64])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--default-run", action="store_true", help="also time configs/default.yaml")
    args = p.parse_args()
    attack = CarliniWagnerL2(binary_search_steps=1, steps=args.steps, initial_const=1.0)
    dm, module = build(args.resolutions, args.batch_size)
    alone = attacks_alone(dm, module, attack)  # also caches the gallery templates
    dm2, module2 = build(args.resolutions, args.batch_size)
    loop = test_loop(dm2, module2, attack)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU")
    print(f"attacks alone       {alone:8.2f} s")
    print(f"Lightning test loop {loop:8.2f} s")
    print(f"loop / attacks      {loop / alone:8.3f}   (bar: <= 1.10)")
    if args.default_run:
        print(f"default run (configs/default.yaml, no W&B) wall time {default_run_seconds():.1f} s")


if __name__ == "__main__":
    main()
