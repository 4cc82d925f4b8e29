"""Attack speed on the paper's SE-ResNet-50 (224x224, 8631 classes, random weights).

Every figure is a ratio measured in the same run, and in the same round: each repeat times
the unit and the attack calls back to back, the ratio is taken within the round, and the
median over rounds is printed, so a machine whose load drifts scales both sides alike.
- The unit, the physical limit: one plain forward + backward-to-input of the same model and
  batch, parameters frozen.
- CW and EAD per iteration over the unit (target <= 1.1): the marginal cost of an iteration,
  (T(1 + n steps) - T(1 step)) / n, so that the call's fixed costs (setup, the base class's
  final success check) are not spread over a few steps; the whole call per step is printed
  too, and the model's forward calls per iteration (must be 1).
- Our CW per step (marginal) vs torchattacks' CW at 8631 classes (target >= 1.3x):
  torchattacks as users call it (parameters left trainable, so its backward also computes
  weight gradients) and with the parameters frozen (the algorithm's own overhead:
  ``torch.eye(8631)`` built on the CPU and copied to the device every step). Its steps are
  counted with a forward hook, since it may stop early.
- The algorithms' own overhead per step, on a model of the same input and logits shapes that
  costs almost nothing (steady where the differences above are noisy): with one forward and
  one backward per iteration (counted), an iteration costs 1 + overhead / unit units.

Usage:
    .venv/bin/python benchmarks/attacks.py [--device cuda] [--batch 4] [--steps 2]
        [--repeats 5] [--model senet|timm] [--clock wall|process] [--threads N]
        [--only cw ead cw_vs_torchattacks overhead]

Adding measurements (JSMA, DR from ``benchmarks/jsma_dr.py``): register a function that takes
the ``Context`` and returns a dict of figures, e.g.
    MEASUREMENTS["jsma"] = lambda ctx: measure_jsma(ctx.model, ctx.images, ...)
``Context.rounds`` times callables round-robin with the unit (``Context.time`` is a plain
warm-up + median timer); a figure given as ``PerUnit(seconds)`` prints as seconds and as a
multiple of the unit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from crossres.attacks.cw import CarliniWagnerL2
from crossres.attacks.ead import ElasticNet

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], *, device: torch.device, clock: Callable[[], float]) -> float:
    synchronize(device)
    start = clock()
    fn()
    synchronize(device)
    return clock() - start


def median_time(
    fn: Callable[[], Any],
    *,
    device: torch.device,
    warmup: int = 1,
    repeats: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median time of ``fn()`` over ``repeats`` runs after ``warmup`` runs, by ``clock``
    (wall time; on a shared CPU the process's CPU time is steadier)."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device=device, clock=clock) for _ in range(repeats))


@dataclass
class Context:
    """What every measurement gets: the frozen model, a batch with its clean predictions as
    labels (so no sample starts adversarial), the timer settings."""

    model: nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    device: torch.device
    steps: int
    repeats: int
    warmup: int
    num_classes: int
    clock: Callable[[], float] = time.perf_counter
    #: every unit measured in this run (for the printout)
    units: list[float] = field(default_factory=list)

    def unit_step(self) -> None:
        """One plain forward + backward to the input, parameters frozen: the physical limit."""
        x = self.images.clone().requires_grad_(True)
        torch.autograd.grad(self.model(x).sum(), x)

    def time(self, fn: Callable[[], Any], *, warmup: int | None = None) -> float:
        return median_time(
            fn,
            device=self.device,
            warmup=self.warmup if warmup is None else warmup,
            repeats=self.repeats,
            clock=self.clock,
        )

    def rounds(self, fns: dict[str, Callable[[], Any]]) -> list[dict[str, float]]:
        """``repeats`` rounds; each times the unit, then every fn once (after ``warmup``
        untimed rounds). Returns one {name: seconds, "unit": seconds} per round."""
        out = []
        for r in range(self.warmup + self.repeats):
            row = {"unit": timed(self.unit_step, device=self.device, clock=self.clock)}
            for name, fn in fns.items():
                row[name] = timed(fn, device=self.device, clock=self.clock)
            if r >= self.warmup:
                out.append(row)
                self.units.append(row["unit"])
        return out


@dataclass(frozen=True)
class PerUnit:
    """Seconds, printed also as a multiple of the unit (median of this run's units)."""

    seconds: float


def median(values: Any) -> float:
    return statistics.median(list(values))


MEASUREMENTS: dict[str, Callable[[Context], dict[str, Any]]] = {}


def register(name: str) -> Callable:
    def add(fn: Callable[[Context], dict[str, Any]]) -> Callable[[Context], dict[str, Any]]:
        MEASUREMENTS[name] = fn
        return fn

    return add


class ForwardCounter:
    """Counts the model's forward calls."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.handle = model.register_forward_hook(self.hook)

    def hook(self, *_: Any) -> None:
        self.calls += 1


def counted(ctx: Context, fn: Callable[[], Any]) -> int:
    """Forward calls of one untimed run of ``fn``."""
    counter = ForwardCounter(ctx.model)
    try:
        fn()
    finally:
        counter.handle.remove()
    return counter.calls


def attack_calls(ctx: Context, make: Callable[[int], Any]) -> dict[str, Callable[[], Any]]:
    """Calls of the attack built by ``make(steps)`` with 1 and 1 + ctx.steps iterations."""
    calls = {}
    for key, steps in (("short", 1), ("long", 1 + ctx.steps)):
        attack = make(steps)
        calls[key] = lambda a=attack: a(ctx.model, ctx.images, ctx.labels)
    return calls


def marginal(row: dict[str, float], steps: int) -> float:
    return (row["long"] - row["short"]) / steps


def per_iteration(ctx: Context, make: Callable[[int], Any]) -> dict[str, Any]:
    """Marginal and whole-call time per iteration of an attack built by ``make(steps)``
    (one binary-search step, no early abort: every sample runs every step)."""
    calls = attack_calls(ctx, make)
    forwards = (counted(ctx, calls["long"]) - counted(ctx, calls["short"])) / ctx.steps
    rows = ctx.rounds(calls)
    return {
        "per iteration (marginal)": PerUnit(median(marginal(r, ctx.steps) for r in rows)),
        "per iteration (whole call)": PerUnit(median(r["long"] for r in rows) / (1 + ctx.steps)),
        "ratio to fwd+bwd (marginal, median of per-round ratios)": median(
            marginal(r, ctx.steps) / r["unit"] for r in rows
        ),
        "model forwards per iteration": forwards,
        "target": "ratio <= 1.1",
    }


@register("cw")
def measure_cw(ctx: Context) -> dict[str, Any]:
    return per_iteration(
        ctx, lambda s: CarliniWagnerL2(binary_search_steps=1, steps=s, abort_early=False)
    )


@register("ead")
def measure_ead(ctx: Context) -> dict[str, Any]:
    return per_iteration(
        ctx, lambda s: ElasticNet(binary_search_steps=1, steps=s, abort_early=False)
    )


@register("cw_vs_torchattacks")
def measure_cw_vs_torchattacks(ctx: Context) -> dict[str, Any]:
    """Per step: our CW's marginal iteration against torchattacks' CW, whose calls have no
    fixed cost worth spreading (c = 1 so that its cost falls and it rarely stops early)."""
    import torchattacks

    steps = 1 + ctx.steps
    params = list(ctx.model.parameters())
    flags = [p.requires_grad for p in params]

    def theirs(trainable: bool) -> Callable[[], Any]:
        attack = torchattacks.CW(ctx.model, c=1.0, kappa=0, steps=steps, lr=1e-2)

        def call() -> None:
            for p in params:
                p.requires_grad_(trainable)
            try:
                attack(ctx.images, ctx.labels)
            finally:
                for p, flag in zip(params, flags, strict=True):
                    p.grad = None
                    p.requires_grad_(flag)

        return call

    calls = attack_calls(
        ctx, lambda s: CarliniWagnerL2(binary_search_steps=1, steps=s, abort_early=False)
    )
    calls["users"] = theirs(True)
    calls["frozen"] = theirs(False)
    ran = {key: counted(ctx, calls[key]) for key in ("users", "frozen")}
    rows = ctx.rounds(calls)
    figures: dict[str, Any] = {
        "ours per step (marginal)": PerUnit(median(marginal(r, ctx.steps) for r in rows))
    }
    for key, label in (("users", "as users call it"), ("frozen", "parameters frozen")):
        figures[f"torchattacks per step ({label}; {ran[key]} of {steps} steps ran)"] = PerUnit(
            median(r[key] / ran[key] for r in rows)
        )
        figures[f"speed-up ({label}, median of per-round ratios)"] = median(
            r[key] / ran[key] / marginal(r, ctx.steps) for r in rows
        )
    figures["target"] = "speed-up >= 1.3"
    return figures


class CheapModel(nn.Module):
    """Same input and logits shapes as the real model at almost no cost: what an attack's
    step costs on it, beyond its own forward+backward, is the algorithm's overhead."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


@register("overhead")
def measure_overhead(ctx: Context) -> dict[str, Any]:
    """The algorithms' own cost per step, measured on ``CheapModel`` (many steps, so the
    figure is steady even on a busy machine): with one forward+backward per step (counted
    above), an iteration on the real model costs 1 + overhead / unit units, and torchattacks'
    CW (frozen) is (unit + its overhead) / (unit + ours) times slower per step."""
    import torchattacks

    cheap = CheapModel(ctx.images.shape[1], ctx.num_classes).to(ctx.device).eval()
    for p in cheap.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        labels = cheap(ctx.images).argmax(1)
    steps = 20

    def fwd_bwd() -> None:
        x = ctx.images.clone().requires_grad_(True)
        torch.autograd.grad(cheap(x).sum(), x)

    def ours(kind: type, steps: int) -> Callable[[], Any]:
        attack = kind(binary_search_steps=1, steps=steps, abort_early=False)
        return lambda: attack(cheap, ctx.images, labels)

    def theirs(steps: int) -> Callable[[], Any]:
        attack = torchattacks.CW(cheap, c=1.0, steps=steps, lr=1e-2)
        return lambda: attack(ctx.images, labels)

    makers: dict[str, Callable[[int], Callable[[], Any]]] = {
        "cw": lambda s: ours(CarliniWagnerL2, s),
        "ead": lambda s: ours(ElasticNet, s),
        "torchattacks_cw": theirs,
    }
    calls: dict[str, Callable[[], Any]] = {"cheap": fwd_bwd}
    ran = {}
    for name, make in makers.items():
        for key, s in (("short", 1), ("long", 1 + steps)):
            calls[f"{name}_{key}"] = make(s)
            counter = ForwardCounter(cheap)
            try:
                calls[f"{name}_{key}"]()
            finally:
                counter.handle.remove()
            ran[f"{name}_{key}"] = counter.calls
    rows = ctx.rounds(calls)
    unit = median(ctx.units)
    figures: dict[str, Any] = {"cheap model fwd+bwd": PerUnit(median(r["cheap"] for r in rows))}
    overhead = {}
    for name in makers:
        extra_steps = ran[f"{name}_long"] - ran[f"{name}_short"]
        overhead[name] = median(
            (r[f"{name}_long"] - r[f"{name}_short"]) / extra_steps - r["cheap"] for r in rows
        )
        figures[f"{name} overhead per step"] = PerUnit(overhead[name])
    for name in ("cw", "ead"):
        figures[f"{name}: implied ratio to fwd+bwd (1 + overhead / unit)"] = (
            1 + overhead[name] / unit
        )
    figures["implied speed-up vs torchattacks CW (parameters frozen)"] = (
        unit + overhead["torchattacks_cw"]
    ) / (unit + overhead["cw"])
    return figures


def build_model(kind: str, num_classes: int) -> nn.Module:
    if kind == "senet":
        try:
            from crossres.models.senet import SEResNet50
        except ImportError:  # not written yet: timm's network has the same cost
            print("crossres.models.senet not importable; using timm's seresnet50")
        else:
            return SEResNet50(num_classes)
    import timm

    return timm.create_model("seresnet50", pretrained=False, num_classes=num_classes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=8631)
    parser.add_argument("--steps", type=int, default=2, help="extra iterations timed per call")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--model", choices=("senet", "timm"), default="senet")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or the process's CPU time (steadier on a shared CPU; CPU only)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--only", nargs="*", choices=sorted(MEASUREMENTS), default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.clock == "process" and device.type != "cpu":
        print("--clock process measures CPU time: use it with --device cpu", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = build_model(args.model, args.classes).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device)
    with torch.no_grad():
        labels = model(images).argmax(1)
    ctx = Context(
        model,
        images,
        labels,
        device,
        args.steps,
        args.repeats,
        args.warmup,
        num_classes=args.classes,
        clock=CLOCKS[args.clock],
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"model={type(model).__name__} classes={args.classes} batch={args.batch} "
        f"size={args.size} device={name} threads={torch.get_num_threads()} "
        f"steps={args.steps} repeats={args.repeats} clock={args.clock} torch={torch.__version__}"
    )
    results = {key: MEASUREMENTS[key](ctx) for key in args.only or list(MEASUREMENTS)}
    unit = median(ctx.units) if ctx.units else ctx.time(ctx.unit_step)
    spread = f" (min {min(ctx.units):.4f}, max {max(ctx.units):.4f})" if ctx.units else ""
    print(f"unit = forward+backward-to-input: {unit:.4f} s, median of {len(ctx.units)}{spread}")
    for key, figures in results.items():
        print(f"[{key}]")
        for label, value in figures.items():
            if isinstance(value, PerUnit):
                value = f"{value.seconds:.4f} s = {value.seconds / unit:.3f} x unit"
            elif isinstance(value, float):
                value = f"{value:.3f}"
            print(f"  {label}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
