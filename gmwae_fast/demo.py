"""Compare :func:`gmwae_fast.fast_imq_mmd` with the materialised penalty users run today.

``python -m gmwae_fast.demo [--n 4096] [--d 10] [--device auto]`` prints, for the per-bandwidth materialised
formula, the vectorised one and the fused op: the value (and its error against float64), the forward+backward time
and the peak memory. Peak memory is measured in a fresh subprocess per method (CPU: peak RSS above the process
after warm-up; CUDA: ``torch.cuda.max_memory_allocated``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from . import PAPER_SCALES, available_backends, fast_imq_mmd, reference

METHODS = ("per_bandwidth", "vectorised", "fused")


def _inputs(n: int, d: int, device: str):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device)
    y = torch.randn(n, d, generator=gen).to(device)
    return x, y


def _run(method: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xg = x.detach().requires_grad_(True)
    if method == "per_bandwidth":
        out = reference.mmd_per_bandwidth(xg, y, PAPER_SCALES)
    elif method == "vectorised":
        bw = torch.tensor(reference.bandwidths_for(x.shape[1], PAPER_SCALES), device=x.device, dtype=x.dtype)
        out = reference.mmd_vectorised(xg, y, bw)
    else:
        out = fast_imq_mmd(xg, y)
    out.backward()
    return out.detach()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_rss_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _current_rss_kib() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _measure_one(method: str, n: int, d: int, device: str, repeats: int) -> dict:
    x, y = _inputs(n, d, device)
    if device.startswith("cuda"):
        _run(method, x, y)  # warm-up (and first-use costs)
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # Peak RSS only grows, so take the baseline from the current RSS before the first call.
        base = _current_rss_kib()
        _run(method, x, y)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        val = _run(method, x, y)
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = max(_peak_rss_kib() - base, 0) / 1024
    times.sort()
    return {"method": method, "value": float(val), "time_s": times[len(times) // 2], "peak_mib": peak}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gmwae_fast.demo", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="points per sample (default 4096)")
    p.add_argument("--d", type=int, default=10, help="dimension (default 10)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--_one", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    if args._one:  # child process: one method, JSON on stdout
        print(json.dumps(_measure_one(args._one, args.n, args.d, device, args.repeats)))
        return 0

    x, y = _inputs(args.n, args.d, device)
    exact = float(reference.imq_mmd_reference(x.double(), y.double(),
                                              bandwidths=reference.bandwidths_for(args.d, PAPER_SCALES)))
    backend = next(b for b in ("cuda", "triton", "cpu", "reference") if available_backends(device)[b] is None)
    print(f"n = m = {args.n}, d = {args.d}, 15 IMQ bandwidths, {device}; fused backend: {backend}")
    print(f"float64 MMD² = {exact:.10e}")
    print(f"{'method':<16}{'value':>18}{'rel. error':>12}{'fwd+bwd':>12}{'peak MiB':>10}")
    rows = []
    for method in METHODS:
        cmd = [sys.executable, "-m", "gmwae_fast.demo", "--n", str(args.n), "--d", str(args.d), "--device", device,
               "--repeats", str(args.repeats), "--_one", method]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"{method:<16}{'failed: ' + last[:60]:>52}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        rel = abs(r["value"] - exact) / abs(exact)
        print(f"{method:<16}{r['value']:>18.10e}{rel:>12.1e}{r['time_s'] * 1e3:>10.1f}ms{r['peak_mib']:>10.1f}")
    fused = next((r for r in rows if r["method"] == "fused"), None)
    if fused:
        for r in rows:
            if r is not fused:
                print(f"fused vs {r['method']}: {r['time_s'] / fused['time_s']:.1f}x faster, "
                      f"{r['peak_mib'] / max(fused['peak_mib'], 0.1):.0f}x less peak memory")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
