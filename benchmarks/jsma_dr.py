"""JSMA and DR speed and memory on the paper's SE-ResNet-50 (224x224, 8631 classes, random
weights), every figure a ratio measured in the same run:

- the unit: one plain forward + backward-to-input of the same model and batch, parameters
  frozen (logits for JSMA, features for DR), median of ``repeats``;
- JSMA per iteration over the unit (target <= 2.5): the marginal cost
  (T(max_iter = 1 + n) - T(max_iter = 1)) / n of a targeted run that never succeeds, so the
  call's fixed costs (the base class's final success check) are not spread over n;
- JSMA peak memory at 224x224 with 8631 classes (target < 2 GiB): on the CPU, growth of the
  peak RSS during one call in a freshly spawned process (``/proc/self/clear_refs`` resets
  the high-water mark; a fresh process, because memory the allocator kept from earlier calls
  would hide the growth), or ``torch.cuda.max_memory_allocated`` on a GPU; the unit's own
  peak is printed beside it;
- JSMA vs torchattacks' JSMA at 1000 classes on a small conv net at 3x32x32 (torchattacks
  builds the full Jacobian, one backward per class, and pixel-pair matrices): time per image
  and iteration, ours batched (target >= 100x);
- DR per round (one batched function evaluation: forward + backward of every live sample,
  plus each sample's L-BFGS-B step) over the features unit (target <= 1.1), marginal between
  two step budgets; the rounds are counted on the model.

Usage:
    .venv/bin/python benchmarks/jsma_dr.py [--device cpu|cuda] [--batch 2] [--iterations 3]
        [--repeats 2] [--clock wall|process] [--threads N] [--only jsma memory torchattacks dr]
        [--foolbox2 DIR]

``--foolbox2 DIR`` (a directory holding an unpacked foolbox 2.x package, e.g. from
``pip download --no-deps foolbox==2.4.0``) also runs foolbox 2's own SaliencyMapAttack on
small random nets and counts the samples where ours returns the same image and verdict.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crossres.attacks.base import frozen_eval
from crossres.attacks.dr import DeepRepresentation
from crossres.attacks.jsma import JSMA
from crossres.types import Gallery

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}
MIB = 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    fn: Callable[[], Any],
    *,
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = clock()
        fn()
        synchronize(device)
        times.append(clock() - start)
    return statistics.median(times)


def forward_backward(model: nn.Module, images: torch.Tensor, *, features: bool) -> Callable:
    """One plain forward + backward to the input, parameters frozen: the physical limit."""

    def step() -> None:
        with frozen_eval(model), torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)
            out = model.features(x) if features else model(x)
            torch.autograd.grad(out.float().pow(2).sum(), x)

    return step


# ------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory growth over a block: CUDA allocator peak, or the process's peak RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_kib("VmHWM") * 1024
        self.peak_mib = (peak - self.base) / MIB


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}: peak RSS needs Linux")


def _fresh_peak_mib(
    what: str, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, iterations: int
) -> float:
    """In a fresh process (spawned): peak RSS growth of one call, nothing cached before."""
    torch.set_num_threads(1)
    with PeakMemory(images.device) as peak:
        if what == "unit":
            forward_backward(model, images, features=False)()
        else:
            JSMA(max_iter=1 + iterations, theta=0.1)(model, images, targets=targets)
    return peak.peak_mib


def fresh_peak_mib(
    what: str, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, iterations: int
) -> float:
    """CPU peak memory of ``what`` ("unit" or "jsma") measured in a spawned process: in this
    one, memory the allocator kept from earlier calls would hide the growth."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_fresh_peak_mib, (what, model, images, targets, iterations))


def memory_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _status_kib("VmHWM")
    except (OSError, RuntimeError):
        return False
    return True


# ---------------------------------------------------------------------------- JSMA
def unreachable_targets(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The least likely class of each image: a random net never reaches it in a few steps."""
    with torch.no_grad(), frozen_eval(model):
        return model(images).argmin(1)


def measure_jsma(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    repeats: int,
    *,
    iterations: int = 3,
    clock: Callable[[], float] = time.perf_counter,
    memory: bool = True,
) -> dict[str, float]:
    """JSMA's marginal time per iteration over one forward+backward of the same batch, and its
    peak memory. ``labels`` serve as targets when they are never reached (as with
    ``unreachable_targets``); a sample that succeeds would leave the batch early."""
    device = images.device
    unit = median_time(
        forward_backward(model, images, features=False), device=device, repeats=repeats, clock=clock
    )

    def attack(n: int) -> Callable[[], Any]:
        return lambda: JSMA(max_iter=n, theta=0.1)(model, images, targets=labels)

    short = median_time(attack(1), device=device, repeats=repeats, clock=clock)
    long = median_time(attack(1 + iterations), device=device, repeats=repeats, clock=clock)
    out = {
        "batch": images.shape[0],
        "unit_s": unit,
        "per_iteration_s": (long - short) / iterations,
        "whole_call_per_iteration_s": long / iterations,
    }
    out["ratio"] = out["per_iteration_s"] / unit
    if memory and device.type == "cuda":
        with PeakMemory(device) as plain:
            forward_backward(model, images, features=False)()
        with PeakMemory(device) as ours:
            attack(1 + iterations)()
        out["peak_mib"] = ours.peak_mib
        out["unit_peak_mib"] = plain.peak_mib
    elif memory and memory_supported(device):
        out["peak_mib"] = fresh_peak_mib("jsma", model, images, labels, iterations)
        out["unit_peak_mib"] = fresh_peak_mib("unit", model, images, labels, iterations)
    return out


class SmallConvNet(nn.Module):
    """A CIFAR-sized net with many classes: small enough for torchattacks' JSMA."""

    def __init__(self, classes: int = 1000, *, seed: int = 0) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(32 * 16, classes),
        )
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def measure_jsma_vs_torchattacks(
    *,
    classes: int = 1000,
    size: int = 32,
    batch: int = 16,
    iterations: int = 1,
    ours_iterations: int = 30,
    repeats: int = 2,
    device: torch.device | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Time per image and iteration: torchattacks' JSMA (one image at a time, as it runs;
    ``iterations`` of them) against ours (batched; marginal over ``ours_iterations``), the
    same net."""
    import torchattacks

    device = device or torch.device("cpu")
    model = SmallConvNet(classes).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(batch, 3, size, size, generator=gen).to(device)
    targets = unreachable_targets(model, images)
    features = 3 * size * size
    # torchattacks runs ceil(features * gamma / 2) iterations unless it succeeds first
    gamma = 2 * iterations / features
    theirs = torchattacks.JSMA(model, theta=1.0, gamma=gamma)
    for p in model.parameters():
        p.requires_grad_(False)
    labels = model(images).argmax(1)
    one = images[:1], labels[:1]
    t_theirs = median_time(lambda: theirs(*one), device=device, repeats=repeats, clock=clock)
    t_short = median_time(
        lambda: JSMA(max_iter=1)(model, images, targets=targets),
        device=device,
        repeats=repeats,
        clock=clock,
    )
    t_long = median_time(
        lambda: JSMA(max_iter=1 + ours_iterations)(model, images, targets=targets),
        device=device,
        repeats=repeats,
        clock=clock,
    )
    theirs_per = t_theirs / iterations
    ours_per = (t_long - t_short) / ours_iterations / batch
    return {
        "classes": classes,
        "size": size,
        "torchattacks_per_image_iteration_s": theirs_per,
        "ours_per_image_iteration_s": ours_per,
        "speedup": theirs_per / ours_per,
        # torchattacks changes two features per iteration, ours one: per changed feature
        "speedup_per_changed_feature": theirs_per / 2 / ours_per,
    }


# ------------------------------------------------------------------------------ DR
class CountingFeatures(nn.Module):
    """Counts ``features`` calls (one per batched DR round, plus the final success check)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def measure_dr(
    model: nn.Module,
    images: torch.Tensor,
    gallery: Any,
    targets: torch.Tensor,
    repeats: int,
    *,
    steps: tuple[int, int] = (2, 5),
    epsilon: float = 0.03,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """DR's marginal time per round (one batched evaluation of every live sample) over one
    forward+backward of the features of the same batch. Targets should stay out of reach
    (every sample runs every round), which ``rounds_per_sample`` lets one check."""
    device = images.device
    counting = CountingFeatures(model)
    unit = median_time(
        forward_backward(counting, images, features=True),
        device=device,
        repeats=repeats,
        clock=clock,
    )
    timing, rounds, per_sample = {}, {}, {}
    for s in steps:
        attack = DeepRepresentation(epsilon=epsilon, steps=s)
        result = {}

        def run(attack=attack, result=result) -> None:
            counting.calls = 0
            result["r"] = attack(counting, images, targets, gallery=gallery)
            result["calls"] = counting.calls

        timing[s] = median_time(run, device=device, repeats=repeats, clock=clock)
        rounds[s] = result["calls"] - 1  # minus the base class's final success check
        per_sample[s] = result["r"].extra["evaluations"].float().mean().item()
    lo, hi = steps
    per_round = (timing[hi] - timing[lo]) / max(rounds[hi] - rounds[lo], 1)
    return {
        "batch": images.shape[0],
        "unit_s": unit,
        "rounds": float(rounds[hi]),
        "rounds_per_sample": per_sample[hi],
        "per_round_s": per_round,
        "ratio": per_round / unit,
        "whole_call_per_round_s": timing[hi] / rounds[hi],
    }


# ------------------------------------------------------------------ foolbox 2 check
def crosscheck_foolbox2(path: str, *, samples: int = 8, seeds: int = 4) -> dict[str, int]:
    """Run foolbox 2.x's SaliencyMapAttack (fast=True, its defaults but our knobs) and ours on
    small random nets; count the samples where both return the same verdict and image."""
    import collections
    import collections.abc

    import numpy as np

    for name in ("Mapping", "Iterable", "Sequence"):  # foolbox 2 predates Python 3.10
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))
    sys.path.insert(0, path)
    import foolbox

    if not foolbox.__version__.startswith("2."):
        raise RuntimeError(f"--foolbox2 {path}: found foolbox {foolbox.__version__}, need 2.x")

    class Float32(nn.Module):  # numpy 2 promotes foolbox's float32 + float64 to float64
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.float())

    agree = total = 0
    for seed in range(seeds):
        classes = (2, 10, 200, 1000)[seed % 4]
        theta = (0.1, 0.3, 0.5)[seed % 3]
        net = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, classes)
        )
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        net.eval()
        x = torch.rand(samples, 3, 6, 6, generator=gen)
        labels = net(x).argmax(1)
        ours = JSMA(max_iter=100, theta=theta, max_perturbations_per_pixel=10)(net, x, labels)
        fmodel = foolbox.models.PyTorchModel(
            Float32(net).eval(), bounds=(0, 1), num_classes=classes
        )
        for i in range(samples):
            attack = foolbox.attacks.SaliencyMapAttack(
                fmodel, criterion=foolbox.criteria.Misclassification()
            )
            adv = attack(
                x[i : i + 1].numpy(),
                labels[i : i + 1].numpy(),
                unpack=False,
                max_iter=100,
                theta=theta,
                max_perturbations_per_pixel=10,
            )[0]
            total += 1
            same = (adv.perturbed is not None) == bool(ours.success[i])
            if same and adv.perturbed is not None:
                same = np.abs(adv.perturbed - ours.adversarial[i].numpy()).max() <= 1e-6
            agree += int(same)
    return {"agree": agree, "total": total}


# ----------------------------------------------------------------------------- main
class TimmFace(nn.Module):
    """timm's seresnet50 (8631 classes) with ``features``: the fallback model."""

    def __init__(self, classes: int = 8631) -> None:
        super().__init__()
        import timm

        self.net = timm.create_model("seresnet50", pretrained=False, num_classes=classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(device: torch.device) -> tuple[nn.Module, str]:
    try:
        from crossres.models.senet import SEResNet50
    except ImportError:
        return TimmFace().to(device).eval(), "timm seresnet50 (fallback)"
    return SEResNet50(8631).to(device).eval(), "crossres SEResNet50"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave)")
    parser.add_argument(
        "--only",
        nargs="+",
        default=["jsma", "memory", "torchattacks", "dr"],
        choices=["jsma", "memory", "torchattacks", "dr"],
    )
    parser.add_argument("--foolbox2", default=None, help="directory holding foolbox 2.x")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = CLOCKS[args.clock]
    gen = torch.Generator().manual_seed(0)
    rows: list[tuple[str, str, str]] = []

    def add(label: str, value: str, target: str = "-") -> None:
        rows.append((label, value, target))

    model, name = build_model(device)
    images = torch.rand(args.batch, 3, 224, 224, generator=gen).to(device)
    print(
        f"model: {name}, 224x224, 8631 classes, random weights; device {device}, "
        f"batch {args.batch}, torch threads {torch.get_num_threads()}, clock {args.clock}"
    )

    if "jsma" in args.only or "memory" in args.only:
        targets = unreachable_targets(model, images)
        jsma = measure_jsma(
            model,
            images,
            targets,
            args.repeats,
            iterations=args.iterations,
            clock=clock,
            memory="memory" in args.only,
        )
        add("unit: forward+backward (logits)", f"{jsma['unit_s']:.3f} s")
        if "jsma" in args.only:
            add("JSMA per iteration / unit (8631 classes)", f"{jsma['ratio']:.2f}", "<= 2.5")
            whole = jsma["whole_call_per_iteration_s"] / jsma["unit_s"]
            add("JSMA whole call per iteration / unit", f"{whole:.2f}")
        if "peak_mib" in jsma:
            add(f"JSMA peak memory, batch {args.batch} (MiB)", f"{jsma['peak_mib']:.0f}", "< 2048")
            add("unit's own peak memory (MiB)", f"{jsma['unit_peak_mib']:.0f}")

    if "torchattacks" in args.only:
        cmp = measure_jsma_vs_torchattacks(device=device, repeats=args.repeats, clock=clock)
        theirs, ours = cmp["torchattacks_per_image_iteration_s"], cmp["ours_per_image_iteration_s"]
        add("torchattacks JSMA per image-iteration (1000 cl., 3x32x32)", f"{theirs:.3f} s")
        add("ours per image-iteration (batch 16)", f"{ours * 1e3:.3f} ms")
        add("speedup per iteration", f"{cmp['speedup']:.0f}x", ">= 100x")
        add("speedup per changed feature", f"{cmp['speedup_per_changed_feature']:.0f}x")

    if "dr" in args.only:
        with torch.no_grad(), frozen_eval(model):
            dim = model.features(images[:1]).shape[1]
        templates = torch.randn(8631, dim, generator=gen).to(device) * 100.0  # out of reach
        gallery = Gallery(templates, torch.arange(8631, device=device))
        targets = torch.arange(args.batch, device=device)
        dr = measure_dr(model, images, gallery, targets, args.repeats, clock=clock)
        add("unit: forward+backward (features)", f"{dr['unit_s']:.3f} s")
        add("DR per round (batched evaluation) / unit", f"{dr['ratio']:.2f}", "<= 1.1")
        add("DR whole call per round / unit", f"{dr['whole_call_per_round_s'] / dr['unit_s']:.2f}")
        add(
            "DR rounds, evaluations per sample",
            f"{dr['rounds']:.0f}, {dr['rounds_per_sample']:.1f}",
        )

    if args.foolbox2:
        check = crosscheck_foolbox2(args.foolbox2)
        add(
            "same result as foolbox 2 SaliencyMapAttack",
            f"{check['agree']}/{check['total']}",
            "all",
        )

    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'measured':>12}  target")
    for label, value, target in rows:
        print(f"{label:<{width}}  {value:>12}  {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
