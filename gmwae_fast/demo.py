"""Compare :func:`gmwae_fast.fast_imq_mmd` with the materialised penalty users run today.

``python -m gmwae_fast.demo [--n 4096] [--d 10] [--device auto|cpu|cuda] [--repeats 3]`` prints what ran (device,
fused backend, CPU instruction set, threads), then for the per-bandwidth materialised formula, the vectorised one
and the fused op: the value (and its error against float64), the median forward+backward time and the peak
memory. Each method runs in a fresh subprocess: one warm-up call (first-use costs, the compiled extension loaded),
then one untimed call measured by the benchmark suite's helper (:func:`gmwae_fast._measure.measure_peak_memory`:
peak RSS delta on a CPU, ``max_memory_allocated`` delta on CUDA), then ``--repeats`` timed calls.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from . import PAPER_SCALES, backends, fast_imq_mmd, reference
from ._measure import measure_peak_memory, timed_call

METHODS = ("per_bandwidth", "vectorised", "fused")


def _inputs(n: int, d: int, device: str):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device)
    y = torch.randn(n, d, generator=gen).to(device)
    return x, y


def _run(method: str, x: torch.Tensor, y: torch.Tensor, backend: str) -> torch.Tensor:
    xg = x.detach().requires_grad_(True)
    if method == "per_bandwidth":
        out = reference.mmd_per_bandwidth(xg, y, PAPER_SCALES)
    elif method == "vectorised":
        bw = torch.tensor(reference.bandwidths_for(x.shape[1], PAPER_SCALES), device=x.device, dtype=x.dtype)
        out = reference.mmd_vectorised(xg, y, bw)
    else:
        out = fast_imq_mmd(xg, y, scales=PAPER_SCALES, backend=backend)
    out.backward()
    return out.detach()


def _measure_one(method: str, n: int, d: int, device: str, repeats: int, backend: str) -> dict:
    dev = torch.device(device)
    x, y = _inputs(n, d, device)
    _run(method, x, y, backend)  # warm-up: first-use costs and the extension library outside the measurement
    peak, how = measure_peak_memory(lambda: _run(method, x, y, backend), dev)
    times, val = [], None
    for _ in range(repeats):
        val, seconds = timed_call(lambda: _run(method, x, y, backend), dev)
        times.append(seconds)
    times.sort()
    return {
        "method": method,
        "value": float(val),
        "time_s": times[len(times) // 2],
        "peak_mib": None if peak is None else peak / 2**20,
        "mem_method": how,
    }


def device_line(device: str, backend: str) -> str:
    """One line saying what runs: device, fused backend, CPU instruction set of the C++ kernels, threads."""
    if device.startswith("cuda"):
        where = f"cuda ({torch.cuda.get_device_name(torch.device(device))})"
    else:
        where = f"cpu, {torch.get_num_threads()} torch threads"
    ext = backends.extension()
    isa = getattr(ext, "CPU_ISA", None) if ext is not None else None
    isa_txt = f"C++ CPU kernels: {isa}" if isa else f"C++ extension: {backends.extension_error() or 'not loaded'}"
    return f"device: {where}; fused backend: {backend}; {isa_txt}; torch {torch.__version__}"


def _child(method: str, args, device: str, backend: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "gmwae_fast.demo",
        "--n",
        str(args.n),
        "--d",
        str(args.d),
        "--device",
        device,
        "--repeats",
        str(args.repeats),
        "--_backend",
        backend,
        "--_one",
        method,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise RuntimeError(last[:100])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _print_ratios(rows: list) -> None:
    fused = next((r for r in rows if r["method"] == "fused"), None)
    if fused is None:
        return
    for r in rows:
        if r is fused:
            continue
        line = f"fused vs {r['method']}: {r['time_s'] / fused['time_s']:.1f}x faster"
        if r["peak_mib"] is not None and fused["peak_mib"]:
            line += f", {r['peak_mib'] / fused['peak_mib']:.0f}x less peak memory"
        print(line)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m gmwae_fast.demo", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="points per sample (default 4096)")
    p.add_argument("--d", type=int, default=10, help="dimension (default 10)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method (median printed)")
    p.add_argument("--_one", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--_backend", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.n < 2 or args.d < 1 or args.repeats < 1:
        p.error("--n must be >= 2, --d >= 1 and --repeats >= 1")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args._one:  # child process: one method, JSON on stdout
        print(json.dumps(_measure_one(args._one, args.n, args.d, device, args.repeats, args._backend)))
        return 0

    backend = backends.resolve_backend("auto", device, op="imq_mmd")
    x, y = _inputs(args.n, args.d, device)
    exact = float(
        reference.imq_mmd_reference(x.double(), y.double(), bandwidths=reference.bandwidths_for(args.d, PAPER_SCALES))
    )
    print(f"n = m = {args.n}, d = {args.d}, {len(PAPER_SCALES)} IMQ bandwidths, forward + backward (grad of x)")
    print(device_line(device, backend))
    print(f"float64 MMD² = {exact:.10e}")
    print(f"{'method':<16}{'value':>18}{'rel. error':>12}{'fwd+bwd':>12}{'peak MiB':>10}")
    rows = []
    for method in METHODS:
        try:
            r = _child(method, args, device, backend)
        except RuntimeError as exc:
            print(f"{method:<16}failed: {exc}")
            continue
        rows.append(r)
        rel = abs(r["value"] - exact) / abs(exact)
        print(f"{method:<16}{r['value']:>18.10e}{rel:>12.1e}{r['time_s'] * 1e3:>10.1f}ms{_mib(r['peak_mib']):>10}")
    if rows:
        print(f"peak memory: {rows[-1]['mem_method']}, one untimed call after a warm-up call")
    _print_ratios(rows)
    return 0 if len(rows) == len(METHODS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
