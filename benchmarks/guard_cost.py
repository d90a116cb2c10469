"""One-time cost of the first-use guard (gmwae_fast/guard.py): the wall time of each route's check, per device.

    python benchmarks/guard_cost.py              # the GPU routes on cuda:0 (a GPU machine; scripts/gpu_check.sh)
    python benchmarks/guard_cost.py --cpu        # the same checks on the CPU routes (cpu for cuda; triton only
                                                 # under TRITON_INTERPRET=1): what the check costs without a GPU

Each route is checked once cold (the first call in the process: kernel compilation or loading included, which the
user's first call would pay anyway) and then, after ``guard.reset()``, warm (the check's own cost). Prints one
line per route and a JSON object with ``--json FILE``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import gmwae_fast
from gmwae_fast import guard


def _time(backend: str, op: str, device: str) -> float:
    guard.reset()
    t0 = time.perf_counter()
    err = guard.check(backend, op, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    if err is not None:
        raise RuntimeError(f"{backend}:{op} failed its check: {err}")
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="check the CPU routes instead of the GPU ones")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    device = "cpu" if args.cpu else "cuda:0"
    routes = [(b, op) for (b, op) in guard.GUARDED]
    if args.cpu:  # the compiled kernels' CPU twin stands in for the CUDA route
        routes = [("cpu" if b == "cuda" else b, op) for (b, op) in routes]
        guard.GUARDED = {(b, op): ("cpu",) for (b, op) in routes}
    rows = []
    for backend, op in routes:
        reason = gmwae_fast.available_backends(device, op=op)[backend]
        if reason is not None:
            rows.append(dict(route=f"{backend}:{op}", skipped=reason))
            continue
        cold = _time(backend, op, device)
        warm = min(_time(backend, op, device) for _ in range(3))
        rows.append(dict(route=f"{backend}:{op}", cold_ms=round(cold * 1e3, 2), warm_ms=round(warm * 1e3, 2)))
    out = dict(
        device=torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        torch=torch.__version__,
        gmwae_fast=gmwae_fast.__version__,
        threads=torch.get_num_threads(),
        rows=rows,
    )
    for r in rows:
        print(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
