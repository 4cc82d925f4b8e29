"""The ``crossres`` command: LightningCLI subcommands (test, fit, ...) plus a few tools.

crossres test --config configs/default.yaml     run a benchmark (YAML: class_path/init_args)
crossres fit --config configs/paper/cr_training.yaml
crossres report RUN_DIR                          (re)write RUN_DIR/report.md from the store
crossres gallery --config FILE                   build (and cache) the gallery templates
crossres select-queries --config FILE            select the queries, write their manifest
crossres fetch-faces                             fetch the embedded real faces into the cache
crossres prepare [--force]                       fetch the faces, train the default's CR weights
crossres transfer RUN_DIR --target LABEL|MODEL [--weights W] [--resolution R]
                                                 evaluate a run's stored adversarials elsewhere

A ``CrossresError`` (bad input, a missing prepared artefact) or a configuration jsonargparse
cannot parse ends the command with one line ``crossres: <message>`` on stderr and status 2
(README "When something is wrong"); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import sys
from argparse import ArgumentError
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from crossres.callbacks.metrics import MetricCallback
from crossres.callbacks.report import ReportCallback
from crossres.callbacks.store import ResultStoreCallback, run_directory
from crossres.datamodules.query_selection import manifest_reader, prepare_queries
from crossres.errors import CrossresError
from crossres.lightning_modules import CrossResolutionDistillation, FrozenTarget
from crossres.locks import RunDirLock
from crossres.models.base import FaceModel
from crossres.run_dir import claim_run_dir

# Run-directory locks taken by this process's commands, released when the command ends (in
# tests several commands run in one process one after the other).
_RUN_LOCKS: list[RunDirLock] = []

# Configuration keys that decide a run's results: a change in any of them is a new run.
RESULT_KEYS = ("model", "data", "seed_everything")


class CrossresCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # always present, configurable as --store.* / --metrics.* / --report.*
        parser.add_lightning_class_args(ResultStoreCallback, "store")
        parser.add_lightning_class_args(MetricCallback, "metrics")
        parser.add_lightning_class_args(ReportCallback, "report")
        # the data are prepared for the model's input (size, resize before the crop)
        parser.link_arguments(
            "model", "data.init_args.input_size", compute_fn=input_size, apply_on="instantiate"
        )
        parser.link_arguments(
            "model",
            "data.init_args.resize_shortest",
            compute_fn=resize_shortest,
            apply_on="instantiate",
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        root = run_directory(cfg.store.run_dir, cfg.trainer.default_root_dir)
        if cfg.store.run_dir:  # one run directory: the saved config and logs go there too
            cfg.trainer.default_root_dir = str(root)
        logger = cfg.trainer.logger
        # W&B writes inside the run directory unless told otherwise
        for lg in logger if isinstance(logger, list) else [logger]:
            is_wandb = getattr(lg, "class_path", "").endswith("WandbLogger")
            if is_wandb and str(lg.init_args.get("save_dir", ".")) == ".":
                lg.init_args["save_dir"] = str(root)
        if self.subcommand == "test" and _is_launch_process():
            # held until this process ends (the kernel drops it even on SIGKILL): a second
            # run on the same directory is refused at once instead of mixing its rows in
            _RUN_LOCKS.append(RunDirLock(root).acquire())
            claim_run_dir(root, config=result_config(cfg))

    # Query selection is its own step, run before the loop when the manifest is missing (the
    # datamodule only reads it). Only the launching process selects: Lightning starts the other
    # DDP processes after it, and torchrun's join them in the process-group rendezvous, which
    # the launching process reaches after writing the manifest.
    def before_test(self) -> None:
        prepare_queries(
            self.datamodule,
            selection_models(self.model),
            device=self.trainer.strategy.root_device,
            select=_is_launch_process(),
        )

    before_fit = before_validate = before_test


def selection_models(model: pl.LightningModule) -> list[FaceModel]:
    """The models whose correct answers define the queries: every target of a benchmark run,
    the frozen teacher (the Base model) of cross-resolution training."""
    if isinstance(model, FrozenTarget):
        return list(model.models.values())
    if isinstance(model, CrossResolutionDistillation):
        return [model.teacher]
    return []


def result_config(cfg) -> dict:
    """The part of the configuration that decides the results (plus the attack callbacks)."""
    full = cfg.as_dict()
    out = {k: full.get(k) for k in RESULT_KEYS}
    callbacks = (full.get("trainer") or {}).get("callbacks") or []
    out["callbacks"] = [c for c in callbacks if "Attack" in str(c.get("class_path", ""))]
    return out


def _is_launch_process() -> bool:
    """True in the process the user started (rank 0), not in DDP children it spawns."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def input_size(model: pl.LightningModule) -> int:
    return int(model.input_config().input_size[-1])


def resize_shortest(model: pl.LightningModule) -> int | None:
    return model.input_config().resize_shortest


# Parse errors raise (``main`` prints them as one line) instead of jsonargparse's usage dump.
_RAISE_PARSE_ERRORS = {"exit_on_error": False} | {
    name: {"exit_on_error": False} for name in ("fit", "validate", "test", "predict")
}


def run_lightning(argv: list[str] | None) -> None:
    try:
        CrossresCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults={"inference_mode": False},
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            parser_kwargs=_RAISE_PARSE_ERRORS,
            args=argv,
        )
    finally:
        while _RUN_LOCKS:
            _RUN_LOCKS.pop().release()


def report_main(argv: list[str]) -> int:
    import argparse

    from crossres.report.markdown import write_report

    p = argparse.ArgumentParser(prog="crossres report", description=__doc__)
    p.add_argument("run_dir", type=Path)
    args = p.parse_args(argv)
    if not (args.run_dir / "results").is_dir():
        print(
            f"crossres report: {args.run_dir} has no results/ folder (not a run directory?)",
            file=sys.stderr,
        )
        return 2
    path = write_report(args.run_dir)
    print(f"wrote {path}")
    return 0


def fetch_faces_main(argv: list[str]) -> int:
    from crossres.datamodules.embedded_sources import main

    return main(argv)


def configured_cli(argv: list[str]) -> CrossresCLI:
    """The model, datamodule and trainer of a run's YAML, built without running anything."""
    return CrossresCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"inference_mode": False, "logger": False},
        save_config_callback=None,
        seed_everything_default=0,
        parser_kwargs=_RAISE_PARSE_ERRORS,
        run=False,
        args=argv,
    )


def select_queries_main(argv: list[str]) -> int:
    """Select the queries of a run (the same YAML as ``crossres test``) with its target models
    and write their manifest; a manifest already there is kept."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: crossres select-queries --config FILE [--model.* ... --data.* ...]")
        return 0 if argv else 2
    cli = configured_cli(argv)
    if manifest_reader(cli.datamodule) is None:
        print(
            f"crossres select-queries: {type(cli.datamodule).__name__} has no query manifest "
            "to select (only VGGFace2 data have one)"
        )
        return 0
    models = selection_models(cli.model)
    if not models:
        print(
            f"crossres select-queries: {type(cli.model).__name__} names no target model "
            "(use FrozenTarget or CrossResolutionDistillation)",
            file=sys.stderr,
        )
        return 2
    path = prepare_queries(cli.datamodule, models, device=cli.trainer.strategy.root_device)
    print(f"query manifest: {path}")
    return 0


def gallery_main(argv: list[str]) -> int:
    """Build (and cache) every target's gallery templates for a benchmark config, without
    attacking: ``crossres gallery --config FILE`` (the same YAML as ``crossres test``)."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: crossres gallery --config FILE [--model.* ... --data.* ...]")
        return 0 if argv else 2
    cli = configured_cli(argv)
    if not hasattr(cli.model, "build_targets"):
        print(
            "crossres gallery: the config's model has no gallery (use FrozenTarget)",
            file=sys.stderr,
        )
        return 2
    prepare_queries(cli.datamodule, selection_models(cli.model))
    cli.datamodule.setup("test")
    cli.model.build_targets(cli.datamodule)
    for label, target in cli.model.targets.items():
        g = target.gallery
        print(
            f"{label}: {len(g)} templates x {g.features.shape[1]} "
            f"(model {target.model.pretrained_cfg.weights_hash[:12] or 'untracked'})"
        )
    return 0


def prepare_main(argv: list[str]) -> int:
    from crossres.prepare import main

    return main(argv, fit=run_lightning)  # the runner goes in: prepare never imports the CLI


def _check_transfer_target(target: str, labels: list[str]) -> None:
    """A transfer target is a target label of the run or a registry model name."""
    from crossres.models.registry import list_models

    if target in labels or target.startswith("timm/") or target in list_models():
        return
    raise CrossresError(
        f"--target {target!r} is neither a target of the run {labels} nor a registry model "
        f"name ({', '.join(list_models())}, or timm/<name>)"
    )


def transfer_main(argv: list[str]) -> int:
    """Evaluate the stored adversarials of a run on another target (a label of the run or a
    registry model) and/or at another resolution; rows go into the run's store, then the
    report is rewritten (see ``crossres.transfer``)."""
    import argparse

    import torch

    from crossres.lightning_modules.frozen_target import TargetSpec
    from crossres.report.markdown import write_report
    from crossres.transfer import transfer

    p = argparse.ArgumentParser(prog="crossres transfer", description=transfer_main.__doc__)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--target", required=True, help="a target label of the run or a model name")
    p.add_argument("--weights", default=None, help="weight file of a registry model")
    p.add_argument("--resolution", type=int, default=None, help="evaluate at this resolution")
    p.add_argument("--source", action="append", default=None, help="source target label(s)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    config = args.run_dir / "config.yaml"
    if not config.is_file():
        raise CrossresError(f"{args.run_dir} has no config.yaml (not a `crossres test` run?)")
    if args.resolution is not None and args.resolution < 0:
        raise CrossresError(f"--resolution must be >= 0 (0 = original), got {args.resolution}")
    import tempfile

    import yaml

    # the configuration's sections, without the arguments of `test` itself (ckpt_path, ...)
    sections = ("seed_everything", "trainer", "model", "data", "store", "metrics", "report")
    saved = {k: v for k, v in yaml.safe_load(config.read_text()).items() if k in sections}
    # an unknown --target is refused before the run's models and templates are built
    stored = ((saved.get("model") or {}).get("init_args") or {}).get("targets") or []
    run_labels = [t.get("label") for t in stored if isinstance(t, dict)]
    if run_labels:
        _check_transfer_target(args.target, run_labels)
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "config.yaml"
        plain.write_text(yaml.safe_dump(saved))
        cli = configured_cli(["--config", str(plain), "--trainer.logger=false"])
    frozen, dm = cli.model, cli.datamodule
    if not isinstance(frozen, FrozenTarget):
        raise CrossresError(f"{config} is no benchmark run (its model is not a FrozenTarget)")
    labels = [s.label for s in frozen.specs]
    if args.target not in labels:
        _check_transfer_target(args.target, labels)
        frozen = FrozenTarget(
            [TargetSpec(name=args.target, label=args.target, weights=args.weights)],
            similarity=frozen.similarity,
            gallery_normalize=frozen.gallery_normalize,
            logit_scale=frozen.logit_scale,
        )
        dm.configure_for(frozen.input_config())
    dm.setup("test")
    frozen.to(torch.device(args.device))
    frozen.build_targets(dm)
    target = frozen.targets[args.target].to(torch.device(args.device))
    n = transfer(args.run_dir, dm, target, resolution=args.resolution, sources=args.source)
    print(f"crossres transfer: {n} rows written to {args.run_dir}")
    print(f"wrote {write_report(args.run_dir)}")
    return 0


TOOLS = {
    "report": report_main,
    "fetch-faces": fetch_faces_main,
    "gallery": gallery_main,
    "select-queries": select_queries_main,
    "prepare": prepare_main,
    "transfer": transfer_main,
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in TOOLS:
            return TOOLS[args[0]](args[1:])
        run_lightning(argv)  # None: LightningCLI reads sys.argv itself
    except ArgumentError as e:  # jsonargparse: a bad key or value in the YAML or the flags
        print(f"crossres: {parse_error_line(str(e), configs=_config_files(args))}", file=sys.stderr)
        return 2
    except Exception as e:
        user_error = _crossres_error(e)
        if user_error is None:
            raise
        print(f"crossres: {_one_line(user_error)}", file=sys.stderr)
        return 2
    return 0


def _crossres_error(e: BaseException | None) -> CrossresError | None:
    """``e`` or the ``CrossresError`` it was raised from (jsonargparse re-raises what a class
    raises while the CLI instantiates it as a ValueError ``from`` it); None for anything else.
    Only explicit causes count: a bug raised while handling a user error stays a bug."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, CrossresError):
            return e
        seen.add(id(e))
        e = e.__cause__
    return None


# jsonargparse's nested report: the lines that only frame the error, the ones that name where
_FRAME = re.compile(
    r"^ *(Does not validate against any of the Union subtypes|Subtypes:|Errors:)", re.MULTILINE
)
_KEY = re.compile(r'^Parser key "([^"]+)":$')
_CLASS = re.compile(r"^Problem with given class_path '([^']+)':$")


def parse_error_line(message: str, *, configs: Sequence[str] = ()) -> str:
    """jsonargparse's parse error (a tree of every alternative it tried, with the values) as
    one line: the keys and class down the first branch, and the error found there. A flat
    message (YAML syntax, a missing file) is kept whole, naming the ``configs`` read."""
    if not _FRAME.search(message):
        text = " ".join(message.split())
        if configs:  # PyYAML reads the text of the file: name the file instead
            text = text.replace('"<unicode string>"', " + ".join(configs))
        return f"bad configuration: {text}"
    keys: list[str] = []
    cls = ""
    leaf = ""
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        if not line or _FRAME.match(line):
            continue
        if m := _KEY.match(line):
            keys.append(m[1])
        elif m := _CLASS.match(line):
            cls = m[1]
        else:
            leaf = line
            break
    where = ".".join(keys) + (f" ({cls})" if cls else "")
    return f"bad configuration at {where}: {leaf}" if where else f"bad configuration: {leaf}"


def _config_files(args: Sequence[str]) -> list[str]:
    """The ``--config`` files named on the command line."""
    files = [b for a, b in zip(args, args[1:], strict=False) if a == "--config"]
    return files + [a.removeprefix("--config=") for a in args if a.startswith("--config=")]


def _one_line(e: BaseException) -> str:
    text = str(e)
    # re-raised from a DataLoader worker: the worker's traceback, then the error itself
    own = f"{type(e).__module__}.{type(e).__qualname__}: "
    if "Original Traceback" in text and own in text:
        text = text.rsplit(own, 1)[1]
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
