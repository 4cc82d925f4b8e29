"""Scoring benchmark: full matmul vs chunked top-k search, time and peak memory.

    .venv/bin/python benchmarks/metrics.py                       # the paper's sizes + 1M x 128
    .venv/bin/python benchmarks/metrics.py --gallery-dim 512     # 1M x 512 (2 GB gallery)
    .venv/bin/python benchmarks/metrics.py --device cuda

1. 1000 probes x 8631 templates x 2048-d (the paper's gallery): ``similarity`` (one matmul)
   + ``summarize_probes`` against ``search`` (chunked), with their agreement.
2. A gallery of up to 1,000,000 templates: ``search`` (chunked top-k, exact mate ranks) at
   growing gallery sizes, and the full matrix where it still fits, to show that the
   chunked search's extra memory does not grow with the gallery while the full matrix's
   does (1000 x 10^6 float32 scores alone would be 4 GB).

Every scenario runs in a fresh process (spawn), so one scenario's freed-but-cached memory
cannot hide another's. Peak memory on the CPU is the peak resident set size above the
resident size once the inputs exist (Linux: VmHWM reset through /proc/self/clear_refs;
elsewhere ru_maxrss, which cannot be reset and so also counts the inputs); on CUDA it is
``torch.cuda.max_memory_allocated`` above the inputs. Timings on a shared machine are
noisy: compare numbers from one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue as queue_module
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Scenario:
    name: str
    method: str  # "full" or "chunked"
    n_probe: int
    n_gallery: int
    dim: int
    chunk_size: int
    k: int
    device: str
    repeats: int
    noise: float


def _status_kib(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", status.read_text(), re.M)
    return int(m.group(1)) if m else None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _run(sc: Scenario, queue) -> None:  # runs in a child process
    import gc

    import torch

    from crossres.metrics import functional as MF
    from crossres.metrics.scoring import search, similarity

    torch.manual_seed(0)
    device = torch.device(sc.device)
    gallery = torch.randn(sc.n_gallery, sc.dim, device=device)
    gids = torch.arange(sc.n_gallery, device=device)
    n_mated = sc.n_probe * 9 // 10  # the rest are non-mated searches (open set)
    mate = torch.randint(0, sc.n_gallery, (sc.n_probe,), device=device)
    probes = gallery[mate] + sc.noise * torch.randn(sc.n_probe, sc.dim, device=device)
    pids = torch.where(torch.arange(sc.n_probe, device=device) < n_mated, mate, -1 - mate)

    def once():
        if sc.method == "full":
            return MF.summarize_probes(similarity(probes, gallery), pids, gids)
        return search(probes, gallery, gids, pids, k=sc.k, chunk_size=sc.chunk_size).summary

    # warm-up on a slice (first-call allocations and kernels), outside the measurement
    small = gallery[: min(sc.n_gallery, 2 * sc.chunk_size)]
    search(probes, small, gids[: small.shape[0]], pids, k=sc.k, chunk_size=sc.chunk_size)
    similarity(probes[:8], small)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    resettable = _reset_peak()
    rss0 = _status_kib("VmRSS") if resettable else 0
    times = []
    for _ in range(sc.repeats):
        t0 = time.perf_counter()
        summary = once()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        what = "CUDA allocated above inputs"
    elif resettable:
        peak_mib = (_status_kib("VmHWM") - rss0) / 1024
        what = "RSS above inputs"
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        what = "ru_maxrss (includes inputs)"
    hits = float((summary.mate_rank[:n_mated] == 1).double().mean())
    queue.put(
        {
            **asdict(sc),
            "seconds": min(times),
            "peak_mib": peak_mib,
            "peak_what": what,
            "inputs_mib": (gallery.numel() + probes.numel()) * 4 / 2**20,
            "full_matrix_mib": sc.n_probe * sc.n_gallery * 4 / 2**20,
            "hit_rate": hits,
            "mate_rank": summary.mate_rank.cpu().tolist() if sc.n_gallery <= 10_000 else None,
            "mate_score": summary.mate_score.cpu().tolist() if sc.n_gallery <= 10_000 else None,
        }
    )


def run_in_child(sc: Scenario) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(sc, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=2)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(
                    f"scenario {sc.name!r} ({sc.method}, G={sc.n_gallery}) died with exit code "
                    f"{proc.exitcode}; see its traceback above"
                ) from None
    proc.join()
    return result


def row(r: dict) -> str:
    return (
        f"{r['name']:<28} {r['method']:<8} G={r['n_gallery']:>9,} D={r['dim']:>5} "
        f"time {r['seconds']:8.3f} s   peak +{r['peak_mib']:8.1f} MiB ({r['peak_what']})   "
        f"full matrix {r['full_matrix_mib']:8.1f} MiB   inputs {r['inputs_mib']:7.1f} MiB   "
        f"hit@1 {r['hit_rate']:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--probes", type=int, default=1000)
    ap.add_argument("--classes", type=int, default=8631)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--gallery", type=int, default=1_000_000)
    ap.add_argument("--gallery-dim", type=int, default=128)
    ap.add_argument("--chunk-size", type=int, default=8192)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--noise", type=float, default=0.8, help="probe = its template + noise * N(0, I)"
    )
    ap.add_argument("--steps", type=int, default=4, help="gallery sizes: G/2^(steps-1) .. G")
    ap.add_argument("--skip-paper", action="store_true", help="only the large-gallery part")
    ap.add_argument(
        "--full-max", type=int, default=250_000, help="largest gallery for the full matrix"
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    common = dict(
        n_probe=args.probes,
        chunk_size=args.chunk_size,
        k=args.k,
        device=args.device,
        repeats=args.repeats,
        noise=args.noise,
    )
    results = []
    print(
        f"# scoring benchmark: {args.probes} probes (90% mated), noise {args.noise}, "
        f"device {args.device}, chunk {args.chunk_size} rows, top-{args.k}"
    )
    if not args.skip_paper:
        for method in ("full", "chunked"):
            r = run_in_child(
                Scenario("paper gallery", method, n_gallery=args.classes, dim=args.dim, **common)
            )
            results.append(r)
            print(row(r), flush=True)
        full, chunked = results
        same_rank = sum(
            a == b for a, b in zip(full["mate_rank"], chunked["mate_rank"], strict=True)
        )
        n_mated = sum(1 for x in full["mate_rank"] if x > 0)
        diffs = [
            abs(a - b)
            for a, b in zip(full["mate_score"], chunked["mate_score"], strict=True)
            if a == a
        ]
        print(
            f"  agreement: {same_rank}/{len(full['mate_rank'])} mate ranks equal ({n_mated} mated), "
            f"max |mate score difference| {max(diffs):.2e}; chunked/full time "
            f"{chunked['seconds'] / full['seconds']:.2f}x",
            flush=True,
        )

    sizes = [args.gallery >> i for i in reversed(range(args.steps))]
    for g in sizes:
        if g <= args.full_max:
            r = run_in_child(
                Scenario("large gallery", "full", n_gallery=g, dim=args.gallery_dim, **common)
            )
            results.append(r)
            print(row(r), flush=True)
        r = run_in_child(
            Scenario("large gallery", "chunked", n_gallery=g, dim=args.gallery_dim, **common)
        )
        results.append(r)
        print(row(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
