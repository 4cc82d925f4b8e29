"""One device check for a GPU: CUDA correctness, speed, mixed precision and the paper's cost.

Prints one JSON object and writes it to ``--out`` (see benchmarks/README.md for every key):
versions; ``cuda_vs_cpu`` (largest CUDA-CPU differences of CW, EAD, JSMA, DR and the metrics
on the same inputs and weights); ``peak_tflops`` (matmul, this run); ``fwd_bwd_img_s`` of
SE-ResNet-50 forward + backward-to-input per batch, fp32 / bf16 autocast, eager /
channels_last / torch.compile, with the fraction of the measured peak; ``*_iter_over_fwd_bwd``
(attack iteration cost over a plain forward+backward at the same batch, 8631 classes);
``default_run_s`` (the default config through the CLI on the GPU); ``paper_protocol_gpu_hours``
(configs/paper/*.yaml costed with the measured figures, no early stops); ``loader_vs_step``.

Usage (one GPU, under 8 minutes):
    python benchmarks/device_check.py --out device_check.json
    python benchmarks/device_check.py --dry-run --out /tmp/dc.json   # CPU, toy sizes, < 2 min

``--dry-run`` runs every code path on the CPU at toy sizes (the "other" device of
``cuda_vs_cpu`` is the CPU again, recorded as such); its numbers are not GPU figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from crossres.attacks import JSMA, CarliniWagnerL2, DeepRepresentation, ElasticNet
from crossres.io import atomic_write_json
from crossres.metrics import CMC, FPIRAtFNIR
from crossres.metrics import functional as MF
from crossres.models.senet import SEResNet50
from crossres.models.tiny import TinyFaceNet
from crossres.types import Gallery

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = ROOT / "configs" / "paper"


@dataclass(frozen=True)
class Sizes:
    """What a full run and a dry run measure."""

    input_size: int
    classes: int
    batches: tuple[int, ...]
    matmul: int
    repeats: int
    steps: int  # extra attack iterations timed per call
    loader_batches: int
    workers: int


FULL = Sizes(224, 8631, (16, 32, 64, 128), 8192, 5, 4, 8, 4)
DRY = Sizes(32, 16, (2, 4), 256, 2, 2, 2, 0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, *, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def precision(device: torch.device, dtype: str | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


# ------------------------------------------------------------------------------ versions
def versions(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "device": name or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------- correctness
def compare_devices(device: torch.device, other: torch.device) -> dict[str, Any]:
    """The same attacks (a few steps) and metrics on ``device`` and ``other`` from the same
    inputs and weights (fp32): the largest absolute difference of the adversarial images and
    of the metric values, and whether the success masks are equal."""
    g = torch.Generator().manual_seed(0)
    model = frozen(TinyFaceNet(input_size=32, num_classes=10, seed=0))
    x = torch.rand(8, 3, 32, 32, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
        gallery = Gallery(model.features(torch.rand(10, 3, 32, 32, generator=g)), torch.arange(10))
    attacks = {
        "cw": (CarliniWagnerL2(binary_search_steps=2, steps=5, initial_const=1.0), "labels"),
        "ead": (ElasticNet(binary_search_steps=2, steps=5, initial_const=10.0), "labels"),
        "jsma": (JSMA(max_iter=10, theta=0.3, untargeted_target="runner_up"), "labels"),
        "dr": (DeepRepresentation(epsilon=4 / 255, steps=5), "targets"),
    }
    out: dict[str, Any] = {}
    for name, (attack, kind) in attacks.items():
        results = []
        for dev in (device, other):
            m = model.to(dev)
            xs, ys = x.to(dev), y.to(dev)
            if kind == "targets":
                r = attack(m, xs, (ys + 1) % 10, gallery=gallery.to(dev))
            else:
                r = attack(m, xs, ys)
            results.append(r)
        a, b = results
        out[name] = {
            "max_abs_diff": float((a.adversarial.cpu() - b.adversarial.cpu()).abs().max()),
            "success_equal": bool(torch.equal(a.success.cpu(), b.success.cpu())),
        }
    model.to("cpu")
    scores = torch.randn(60, 40, generator=g)
    pid = torch.cat([torch.randperm(40, generator=g)[:40], torch.arange(100, 120)])
    gid = torch.arange(40)
    sid = torch.arange(60)
    values = []
    for dev in (device, other):
        s, p, gi, si = (t.to(dev) for t in (scores, pid, gid, sid))
        cmc = CMC(max_rank=5).to(dev)
        cmc.update(s[:40], p[:40], gi, si[:40])
        fpir = FPIRAtFNIR(target_fnir=0.1).to(dev)
        fpir.update(s, p, gi, si)
        det = MF.det_curve(s[:40], p[:40], s[40:], gi)
        values.append(
            torch.cat([cmc.compute().cpu(), fpir.compute().cpu()[None], det.fpir.cpu()]).double()
        )
    out["metrics"] = {"max_abs_diff": float((values[0] - values[1]).abs().max())}
    out["max_abs_diff"] = max(v["max_abs_diff"] for v in out.values())
    out["other_device"] = str(other)
    return out


# --------------------------------------------------------------------------------- speed
def peak_tflops(device: torch.device, n: int, repeats: int) -> dict[str, float]:
    """Dense matmul throughput (TFLOP/s), fp32 (TF32 off) and bf16: the card's measured peak."""
    out = {}
    for key, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        seconds = timed(lambda a=a, b=b: a @ b, device, repeats=repeats)
        out[key] = 2 * n**3 / seconds / 1e12
    return out


def fwd_bwd_flops(model: nn.Module, size: int, device: torch.device) -> float:
    """FLOPs of one image's forward + backward to the input (counted by torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, size, size, device=device, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()  # parameters frozen: the gradient reaches the input only
    return float(counter.get_total_flops())


def fwd_bwd_step(model: nn.Module, x: torch.Tensor, dtype: str | None) -> Callable[[], Any]:
    def step() -> None:
        xi = x.detach().requires_grad_(True)
        with precision(x.device, dtype):
            out = model(xi)
        torch.autograd.grad(out.float().sum(), xi)

    return step


def throughput(
    model: nn.Module, sizes: Sizes, device: torch.device, peak: dict[str, float], args
) -> dict[str, Any]:
    """Images/s of forward + backward-to-input per batch and variant; the best per variant
    with its fraction of the measured matmul peak of its dtype."""
    flops = fwd_bwd_flops(model, sizes.input_size, device)
    variants: dict[str, dict[str, Any]] = {}
    for layout in ("eager", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        model.to(memory_format=fmt)
        for dtype in (None, "bfloat16"):
            key = f"{'fp32' if dtype is None else 'bf16'}_{layout}"
            per_batch = {}
            for batch in sizes.batches:
                x = torch.rand(batch, 3, sizes.input_size, sizes.input_size, device=device)
                x = x.contiguous(memory_format=fmt)
                try:
                    s = timed(fwd_bwd_step(model, x, dtype), device, repeats=sizes.repeats)
                except torch.OutOfMemoryError:
                    per_batch[batch] = None
                    torch.cuda.empty_cache()
                    break
                per_batch[batch] = batch / s
            variants[key] = summarize_variant(
                per_batch, flops, peak["fp32" if not dtype else "bf16"]
            )
    model.to(memory_format=torch.contiguous_format)
    variants["compile"] = compiled_throughput(model, sizes, device, variants, flops, peak, args)
    best = max(
        (v for v in variants.values() if v.get("img_s")), key=lambda v: v["img_s"], default={}
    )
    return {"flops_per_image": flops, "variants": variants, "best": best}


def summarize_variant(per_batch: dict[int, float | None], flops: float, peak: float) -> dict:
    ok = {b: v for b, v in per_batch.items() if v}
    if not ok:
        return {"img_s": None, "per_batch": per_batch}
    batch = max(ok, key=ok.get)
    return {
        "img_s": ok[batch],
        "best_batch": batch,
        "fraction_of_peak": ok[batch] * flops / 1e12 / peak,
        "per_batch": per_batch,
    }


def compiled_throughput(model, sizes, device, variants, flops, peak, args) -> dict[str, Any]:
    """torch.compile of the best eager variant at its best batch, if compiling (the first
    call) finishes within ``--compile-limit`` seconds; else the reason it was skipped."""
    if args.dry_run:
        return {"skipped": "dry run (compiling takes minutes on a shared CPU)"}
    if args.compile_limit <= 0:
        return {"skipped": "--compile-limit 0"}
    base = max(
        (k for k in variants if variants[k].get("img_s")), key=lambda k: variants[k]["img_s"]
    )
    dtype = None if base.startswith("fp32") else "bfloat16"
    batch = variants[base]["best_batch"]
    fmt = torch.channels_last if base.endswith("channels_last") else torch.contiguous_format
    model.to(memory_format=fmt)
    x = torch.rand(batch, 3, sizes.input_size, sizes.input_size, device=device)
    x = x.contiguous(memory_format=fmt)
    try:
        compiled = torch.compile(model)
        step = fwd_bwd_step(compiled, x, dtype)
        start = time.perf_counter()
        step()
        sync(device)
        compile_s = time.perf_counter() - start
        if compile_s > args.compile_limit:
            return {"skipped": f"first call took {compile_s:.0f} s > {args.compile_limit} s"}
        s = timed(step, device, repeats=sizes.repeats)
    except Exception as error:  # a compiler failure is a finding, not a crash
        return {"skipped": f"{type(error).__name__}: {str(error)[:200]}"}
    finally:
        model.to(memory_format=torch.contiguous_format)
    img_s = batch / s
    return {
        "img_s": img_s,
        "of": base,
        "best_batch": batch,
        "compile_s": compile_s,
        "fraction_of_peak": img_s * flops / 1e12 / peak["fp32" if dtype is None else "bf16"],
    }


def attack_ratios(model: nn.Module, sizes: Sizes, device: torch.device, batch: int) -> dict:
    """Marginal cost of one attack iteration, (T(1 + s) - T(1)) / s, over one plain forward
    + backward-to-input of the same batch (fp32, eager): goal <= 1.1. No early stops: CW and
    EAD without abort, JSMA targeted with a tiny theta, DR towards random templates (a
    paper delta, 4/255; the k-NN does not accept in a few steps). DR's figure is per
    evaluation (one forward+backward of the live samples, one L-BFGS-B round)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, sizes.input_size, sizes.input_size, generator=g).to(device)
    with torch.no_grad():
        labels = model(x).argmax(1)
    targets = (labels + 1) % sizes.classes
    gallery = Gallery(
        torch.randn(sizes.classes, model.pretrained_cfg.feature_dim, generator=g).to(device),
        torch.arange(sizes.classes, device=device),
    )
    unit = timed(fwd_bwd_step(model, x, None), device, repeats=sizes.repeats)
    s = sizes.steps
    makers: dict[str, tuple[Callable[[int], Any], Callable[[Any], Any]]] = {
        "cw": (
            lambda n: CarliniWagnerL2(binary_search_steps=1, steps=n, abort_early=False),
            lambda a: a(model, x, labels),
        ),
        "ead": (
            lambda n: ElasticNet(binary_search_steps=1, steps=n, abort_early=False),
            lambda a: a(model, x, labels),
        ),
        "jsma": (
            lambda n: JSMA(max_iter=n + 1, theta=1e-4, max_perturbations_per_pixel=10**6),
            lambda a: a(model, x, targets=targets),
        ),
        "dr": (
            lambda n: DeepRepresentation(epsilon=4 / 255, steps=n),
            lambda a: a(model, x, targets, gallery=gallery),
        ),
    }
    out: dict[str, Any] = {"unit_fwd_bwd_s": unit, "batch": batch}
    for name, (make, call) in makers.items():
        short, long = make(1), make(1 + s)
        t_short = timed(lambda a=short, c=call: c(a), device, repeats=sizes.repeats)
        t_long = timed(lambda a=long, c=call: c(a), device, repeats=sizes.repeats)
        per = s
        if name == "dr":  # rounds of evaluations (all live samples together), not iterations
            r_short, r_long = call(short), call(long)
            rounds = int(r_long.extra["evaluations"].max() - r_short.extra["evaluations"].max())
            iters = float(r_long.iterations.float().mean() - r_short.iterations.float().mean())
            per = max(rounds, 1)
            out["dr_evaluations_per_iter"] = rounds / iters if iters > 0 else None
        out[f"{name}_iter_over_fwd_bwd"] = (t_long - t_short) / per / unit
    out["goal"] = "<= 1.1"
    return out


def build_model(sizes: Sizes, dry_run: bool) -> nn.Module:
    """SE-ResNet-50 at 224x224 with 8631 classes (random weights: cost does not depend on
    them); the dry run's toy stand-in is TinyFaceNet (SE-ResNet-50 needs 224x224 input)."""
    if dry_run:
        return TinyFaceNet(input_size=sizes.input_size, num_classes=sizes.classes, seed=0)
    return SEResNet50(sizes.classes)


# ------------------------------------------------------------------------ paper protocol
def paper_protocol(
    per_image_s: float, ratios: dict[str, Any], *, gpus: int = 8, configs: Path = PAPER_CONFIGS
) -> dict[str, Any]:
    """GPU hours of configs/paper/*.yaml with every attack running its whole budget: each
    forward+backward of a query costs ``per_image_s`` (best fp32 batch) times the attack's
    measured iteration ratio. Counted per query: CW/EAD binary_search_steps x steps; JSMA
    max_iter (its target scan's forwards are left out: at most 1000 forwards, ~1/3 of the
    cost of 1000 forward+backward, and 0 with ``untargeted_target: runner_up``); DR steps x
    the measured evaluations per iteration. Queries: targets x resolutions x n_identities x
    n_images. DDP over ``gpus`` splits queries, so the wall time is hours / gpus (no
    communication in the attack loop; the metrics gather once at the end)."""
    rows = []
    for path in sorted(configs.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        callbacks = (cfg.get("trainer") or {}).get("callbacks") or []
        attacks = [c for c in callbacks if "AttackCallback" in c.get("class_path", "")]
        if not attacks:
            continue
        data = cfg["data"]["init_args"]
        queries = (
            len(cfg["model"]["init_args"]["targets"])
            * len(data["resolutions"])
            * data["n_identities"]
            * data["n_images"]
        )
        for cb in attacks:
            attack = cb["init_args"]["attack"]
            kind = attack["class_path"].rsplit(".", 1)[-1]
            knobs = attack.get("init_args") or {}
            passes, ratio = attack_passes(kind, knobs, ratios)
            hours = queries * passes * per_image_s * ratio / 3600
            rows.append(
                {
                    "config": path.name,
                    "attack": cb["init_args"].get("name", kind),
                    "queries": queries,
                    "fwd_bwd_per_query": passes,
                    "ratio": ratio,
                    "gpu_hours": hours,
                }
            )
    total = sum(r["gpu_hours"] for r in rows)
    return {
        "gpu_hours": total,
        f"wall_hours_{gpus}_gpus_ddp": total / gpus,
        "per_image_fwd_bwd_s": per_image_s,
        "attacks": rows,
    }


def attack_passes(kind: str, knobs: dict, ratios: dict[str, Any]) -> tuple[float, float]:
    if kind in ("CarliniWagnerL2", "ElasticNet"):
        key = "cw" if kind == "CarliniWagnerL2" else "ead"
        passes = knobs.get("binary_search_steps", 10) * knobs.get("steps", 100)
        return float(passes), ratios[f"{key}_iter_over_fwd_bwd"]
    if kind == "JSMA":
        return float(knobs.get("max_iter", 1000)), ratios["jsma_iter_over_fwd_bwd"]
    if kind == "DeepRepresentation":
        # each L-BFGS-B iteration costs the measured evaluations (forward+backward) per iteration
        per_iter = ratios.get("dr_evaluations_per_iter") or 1.0
        return knobs.get("steps", 100) * per_iter, ratios["dr_iter_over_fwd_bwd"]
    raise ValueError(f"no cost model for attack {kind!r}")


# -------------------------------------------------------------------------------- loader
class _Faces(torch.utils.data.Dataset):
    """JPEG bytes of face-sized images decoded and put through the paper's pipeline
    (degrade to 16 px, resize to 256, crop 224), as VGGFace2's loader does per query."""

    def __init__(self, n: int, size: int) -> None:
        import io

        from PIL import Image

        g = torch.Generator().manual_seed(2)
        self.blobs = []
        for _ in range(min(n, 16)):
            pixels = (torch.rand(3, size + 40, size, generator=g) * 255).byte()
            buf = io.BytesIO()
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buf, format="JPEG")
            self.blobs.append(buf.getvalue())
        self.n = n
        self.size = size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        import io

        from PIL import Image

        from crossres.datamodules.resolution import ResolutionTransform

        crop = min(224, self.size)
        t = ResolutionTransform(16, input_size=crop, resize_shortest=max(crop, min(256, self.size)))
        return t(Image.open(io.BytesIO(self.blobs[i % len(self.blobs)])))


def loader_vs_step(
    model: nn.Module, sizes: Sizes, device: torch.device, batch: int, step_s: float
) -> dict[str, Any]:
    """Seconds per batch the DataLoader (``workers`` processes, pinned memory, prefetch 2)
    delivers, against the attack step's seconds per batch: below 1 the GPU never waits."""
    size = 250 if sizes is FULL else sizes.input_size
    dataset = _Faces(batch * (sizes.loader_batches + 1), size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        num_workers=sizes.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if sizes.workers else None,
        persistent_workers=False,
    )
    it = iter(loader)
    next(it)  # workers started
    start = time.perf_counter()
    n = 0
    for images in it:
        images.to(device, non_blocking=True)
        n += 1
    sync(device)
    per_batch = (time.perf_counter() - start) / max(n, 1)
    return {
        "loader_s_per_batch": per_batch,
        "step_s_per_batch": step_s,
        "ratio": per_batch / step_s,
        "workers": sizes.workers,
        "batch": batch,
        "keeps_up": per_batch < step_s,
    }


# ---------------------------------------------------------------------------- default run
def default_run(args) -> dict[str, Any]:
    """The default config through the CLI on the GPU, timed; with ``--cpu-report`` (the
    report.md of a CPU run of the same config) the numbers of both reports are compared."""
    if args.dry_run:
        return {"skipped": "dry run: the default config takes minutes on 2 CPU cores"}
    if args.skip_default:
        return {"skipped": "--skip-default"}
    run_dir = Path(args.run_dir)
    cmd = [
        sys.executable, "-m", "crossres.cli", "test",
        "--config", str(ROOT / "configs" / "default.yaml"),
        "--trainer.accelerator=gpu",
        f"--trainer.default_root_dir={run_dir}",
    ]  # fmt: skip
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.default_limit)
    except subprocess.TimeoutExpired:
        return {"skipped": f"over {args.default_limit} s", "command": " ".join(cmd)}
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {
        "seconds": seconds,
        "returncode": proc.returncode,
        "command": " ".join(cmd),
    }
    if proc.returncode:
        out["stderr_tail"] = proc.stderr[-2000:]
        return out
    reports = sorted(run_dir.rglob("report.md"), key=os.path.getmtime)
    if args.cpu_report and reports:
        out["tables_vs_cpu"] = compare_reports(reports[-1], Path(args.cpu_report), args.tolerance)
    return out


def compare_reports(gpu: Path, cpu: Path, tolerance: float) -> dict[str, Any]:
    import re

    number = re.compile(r"-?\d+\.\d+(?:e-?\d+)?")
    a = [float(v) for v in number.findall(gpu.read_text())]
    b = [float(v) for v in number.findall(cpu.read_text())]
    if len(a) != len(b):
        return {"equal": False, "reason": f"{len(a)} numbers on the GPU, {len(b)} on the CPU"}
    diff = max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)
    return {"equal": diff <= tolerance, "max_abs_diff": diff, "tolerance": tolerance}


# ---------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="device_check.json", help="where the JSON goes")
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, < 2 minutes")
    parser.add_argument("--compile-limit", type=float, default=120.0, help="seconds, 0: skip")
    parser.add_argument("--default-limit", type=float, default=180.0, help="CLI run, seconds")
    parser.add_argument("--skip-default", action="store_true", help="no CLI run")
    parser.add_argument("--run-dir", default="runs/device_check", help="CLI run directory")
    parser.add_argument("--cpu-report", default=None, help="report.md of a CPU default run")
    parser.add_argument(
        "--tolerance", type=float, default=1e-3, help="largest table difference GPU vs CPU"
    )
    parser.add_argument("--gpus", type=int, default=8, help="GPUs for the DDP wall time")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run for the CPU code paths", file=sys.stderr)
        return 2
    sizes = DRY if args.dry_run else FULL
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    started = time.perf_counter()
    report: dict[str, Any] = {"dry_run": args.dry_run, **versions(device)}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        report[name] = fn()
        report.setdefault("stage_s", {})[name] = time.perf_counter() - t
        return report[name]

    stage("cuda_vs_cpu", lambda: compare_devices(device, torch.device("cpu")))
    peak = stage("peak_tflops", lambda: peak_tflops(device, sizes.matmul, sizes.repeats))
    model = frozen(build_model(sizes, args.dry_run)).to(device)
    tp = stage("fwd_bwd_img_s", lambda: throughput(model, sizes, device, peak, args))
    batch = tp["variants"]["fp32_eager"]["best_batch"]
    ratios = stage("attack_ratios", lambda: attack_ratios(model, sizes, device, batch))
    for key, value in ratios.items():
        if key.endswith("_iter_over_fwd_bwd"):
            report[key] = value
    per_image = 1.0 / tp["variants"]["fp32_eager"]["img_s"]
    stage("paper_protocol", lambda: paper_protocol(per_image, ratios, gpus=args.gpus))
    report["paper_protocol_gpu_hours"] = report["paper_protocol"]["gpu_hours"]
    step_s = ratios["unit_fwd_bwd_s"]
    stage("loader_vs_step", lambda: loader_vs_step(model, sizes, device, batch, step_s))
    stage("default_run", lambda: default_run(args))
    run = report["default_run"]
    report["default_run_s"] = run.get("seconds") if isinstance(run, dict) else None
    report["total_s"] = time.perf_counter() - started
    text = json.dumps(report, indent=2, default=str)
    print(text)
    atomic_write_json(Path(args.out), json.loads(text))
    return 0 if math.isfinite(report["total_s"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
