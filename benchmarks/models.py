"""SEResNet50 throughput at 224x224 as a fraction of the machine's matmul FLOP rate.

Measured in one run, side by side (timings on shared machines drift; ratios within one run
are what to compare):

- the fp32 matmul rate (2048x2048 by default), the machine's practical peak;
- forward (logits, no grad) and forward+backward to the input with frozen weights (what an
  attack step costs), in images/s and as a fraction of the matmul rate, using 8.2 GFLOP per
  forward and 16.4 per forward+backward (the FLOP counter's figure is printed as a check);
- eager vs channels_last vs torch.compile. Compiled variants run in a child process with a
  time limit (``--compile-timeout``), so a compile that does not finish is reported, not waited
  for.

On a CPU shared with other jobs, ``--clock process --threads 1`` counts this process's CPU
seconds instead of wall time (matmul rate and model throughput alike, so the fractions keep
their meaning: they are then per CPU-second).

    python benchmarks/models.py --batch 8 --repeats 5 --device cpu
    python benchmarks/models.py --batch 4 --repeats 3 --threads 1 --clock process
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from crossres.models.senet import SEResNet50

FWD_GFLOP = 8.2
FWD_BWD_GFLOP = 16.4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
_clock = time.perf_counter


def _time(fn: Callable[[], object], *, repeats: int, device: torch.device) -> float:
    """Median seconds (of the chosen clock) per call over ``repeats`` calls, after a warm-up."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = _clock()
        fn()
        _sync(device)
        times.append(_clock() - t0)
    return sorted(times)[len(times) // 2]


def matmul_gflops(*, n: int, repeats: int, device: torch.device) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    inner = 4 if device.type == "cpu" else 50
    seconds = _time(lambda: [a @ b for _ in range(inner)], repeats=repeats, device=device)
    return 2 * n**3 * inner / seconds / 1e9


def counted_forward_gflop(model: torch.nn.Module, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, 224, 224, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


@dataclass
class Row:
    name: str
    fwd_ips: float = float("nan")
    bwd_ips: float = float("nan")
    compile_s: float = 0.0
    max_rel_diff: float = 0.0
    note: str = ""


def measure(
    name: str,
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    repeats: int,
    device: torch.device,
    reference: torch.Tensor | None,
) -> Row:
    row = Row(name)
    batch = x.shape[0]

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    def forward_backward() -> torch.Tensor:
        xi = x.detach().requires_grad_(True)
        logits = model(xi)
        # an attack-like scalar: the margin of the top logit over the rest's sum
        loss = logits.max(dim=1).values.sum() - logits.sum()
        (grad,) = torch.autograd.grad(loss, xi)
        return grad

    t0 = time.perf_counter()
    out = forward()  # compiles, for compiled variants
    forward_backward()
    _sync(device)
    row.compile_s = time.perf_counter() - t0  # wall time: what a user waits
    if reference is not None:
        row.max_rel_diff = float((out - reference).abs().max() / reference.abs().max())
    row.fwd_ips = batch / _time(forward, repeats=repeats, device=device)
    row.bwd_ips = batch / _time(forward_backward, repeats=repeats, device=device)
    return row


def build(channels_last: bool, device: torch.device) -> SEResNet50:
    torch.manual_seed(0)  # the same weights in every process
    model = SEResNet50(channels_last=channels_last)
    with torch.no_grad():  # small residual gains, as trained nets have: rounding stays small
        for name, m in model.named_modules():
            if name.endswith("bn3"):
                m.weight.fill_(0.1)
    return model.eval().to(device).requires_grad_(False)


def _setup(args: argparse.Namespace) -> torch.device:
    global _clock
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    _clock = CLOCKS["wall" if device.type == "cuda" else args.clock]
    return device


def _compiled_child(
    args: argparse.Namespace,
    name: str,
    channels_last: bool,
    x: torch.Tensor,
    ref: torch.Tensor,
    out: mp.Queue,
) -> None:
    device = _setup(args)
    try:
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1  # no worker pool to outlive a timed-out child
        runner = torch.compile(build(channels_last, device))
        row = measure(
            name, runner, x.to(device), repeats=args.repeats, device=device, reference=ref
        )
    except Exception as err:  # noqa: BLE001 - report and go on (e.g. no C++ compiler)
        row = Row(name, note=f"failed: {type(err).__name__}: {str(err)[:160]}")
    out.put(row)


def run_compiled(
    args: argparse.Namespace, name: str, channels_last: bool, x: torch.Tensor, ref: torch.Tensor
) -> Row:
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    child = ctx.Process(
        target=_compiled_child, args=(args, name, channels_last, x.cpu(), ref.cpu(), results)
    )
    child.start()
    try:
        return results.get(timeout=args.compile_timeout)
    except queue.Empty:
        return Row(name, note=f"not done after {args.compile_timeout:.0f} s (compile + timing)")
    finally:
        if child.is_alive():
            child.terminate()
        child.join()
        results.close()
        results.join_thread()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile variants")
    parser.add_argument(
        "--compile-timeout", type=float, default=900, help="seconds per compiled variant"
    )
    args = parser.parse_args(argv)
    device = _setup(args)

    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", {torch.get_num_threads()} threads, {_clock.__name__} clock, batch {args.batch}, "
        f"repeats {args.repeats}",
        flush=True,
    )
    peak = matmul_gflops(n=args.matmul_size, repeats=args.repeats, device=device)
    print(f"matmul {args.matmul_size}x{args.matmul_size} fp32: {peak:.1f} GFLOP/s", flush=True)

    base = build(False, device)
    counted = counted_forward_gflop(base, device)
    print(
        f"FLOP counter: {counted:.2f} GFLOP per forward (using {FWD_GFLOP} / {FWD_BWD_GFLOP})",
        flush=True,
    )
    x = torch.rand(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        reference = base(x)

    rows = [measure("eager", base, x, repeats=args.repeats, device=device, reference=reference)]
    print(f"  {rows[-1]}", flush=True)
    del base
    cl = build(True, device)
    rows.append(
        measure(
            "eager channels_last", cl, x, repeats=args.repeats, device=device, reference=reference
        )
    )
    print(f"  {rows[-1]}", flush=True)
    del cl
    if not args.no_compile:
        for name, channels_last in (("compile", False), ("compile channels_last", True)):
            rows.append(run_compiled(args, name, channels_last, x, reference))
            print(f"  {rows[-1]}", flush=True)

    print()
    print(
        f"{'variant':<24}{'fwd img/s':>10}{'of peak':>9}{'fwd+bwd img/s':>15}{'of peak':>9}"
        f"{'warm-up s':>11}{'max rel diff':>14}"
    )
    for r in rows:
        if r.note:
            print(f"{r.name:<24}{r.note}")
            continue
        print(
            f"{r.name:<24}{r.fwd_ips:>10.2f}{r.fwd_ips * FWD_GFLOP / peak:>9.1%}"
            f"{r.bwd_ips:>15.2f}{r.bwd_ips * FWD_BWD_GFLOP / peak:>9.1%}"
            f"{r.compile_s:>11.1f}{r.max_rel_diff:>14.1e}"
        )
    ok = [r for r in rows if not r.note]
    best_fwd = max(ok, key=lambda r: r.fwd_ips)
    best_bwd = max(ok, key=lambda r: r.bwd_ips)
    eager = ok[0]
    print()
    print(f"fastest forward: {best_fwd.name} ({best_fwd.fwd_ips / eager.fwd_ips:.2f}x eager)")
    print(
        f"fastest forward+backward (attack step): {best_bwd.name} "
        f"({best_bwd.bwd_ips / eager.bwd_ips:.2f}x eager)"
    )
    print(
        f"bound at this matmul rate: {peak / FWD_GFLOP:.1f} forward img/s, "
        f"{peak / FWD_BWD_GFLOP:.1f} forward+backward img/s"
    )


if __name__ == "__main__":
    main()
