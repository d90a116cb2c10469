"""Strong scaling of the distributed MMD (``fast_imq_mmd(..., process_group=...)``) on one machine.

    .venv/bin/python benchmarks/bench_distributed.py --n 8192 --d 10 64 --ranks 1 2 \\
        --out benchmarks/results/distributed-cpu-intel-xeon-2c.md

For each ``d`` and each world size ``R``, ``R`` processes (gloo on 127.0.0.1, one torch thread each) hold ``N / R``
rows of ``x`` (requires grad, the encoder's codes) and ``N / R`` rows of ``y`` (the prior samples) and time
``fast_imq_mmd(x_r, y_r, process_group=WORLD)`` forward + backward (15 ``PAPER_SCALES``, unbiased, float32).
A step's time is the slowest rank's (ranks start together after a barrier); the table gives the median over the
repeats. ``R = 1`` also times the plain single-process call (no process group) as the baseline. Speed-up =
baseline / step time, efficiency = speed-up / R. The values of every world size are checked against each other.

Not collected by ``pytest benchmarks`` (no test functions): a plain script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _data(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), 0.8 * torch.randn(n, d, generator=g) + 0.1


def _step(x_r: torch.Tensor, y_r: torch.Tensor, pg, backend: str) -> tuple[float, float]:
    import gmwae_fast

    x = x_r.clone().requires_grad_(True)
    t0 = time.perf_counter()
    v = gmwae_fast.fast_imq_mmd(x, y_r, process_group=pg, backend=backend, scales=gmwae_fast.GAUJAC2019_SCALES)
    v.backward()
    return time.perf_counter() - t0, float(v.detach())


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, d: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x, y = _data(args.n, d)
    rows = args.n // world
    x_r, y_r = x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]
    res = {"dist": [], "plain": [], "value": None}
    for i in range(args.warmup + args.repeat):
        dist.barrier()
        t, v = _step(x_r, y_r, dist.group.WORLD, args.backend)
        if i >= args.warmup:
            res["dist"].append(t)
        res["value"] = v
        if world == 1:
            t, _ = _step(x, y, None, args.backend)
            if i >= args.warmup:
                res["plain"].append(t)
    with open(os.path.join(out, f"{world}-{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: argparse.Namespace, d: int, world: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, _free_port(), args, d, out), nprocs=world, join=True)
        ranks = []
        for r in range(world):
            with open(os.path.join(out, f"{world}-{r}.json")) as f:
                ranks.append(json.load(f))
    return ranks


def _rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for d in args.d:
        base, ref_value = None, None
        for world in args.ranks:
            load0 = os.getloadavg()[0]
            ranks = _run(args, d, world)
            step = [max(r["dist"][i] for r in ranks) for i in range(args.repeat)]
            per_rank = [statistics.median(r["dist"]) for r in ranks]
            if world == 1:
                base, ref_value = statistics.median(ranks[0]["plain"]), ranks[0]["value"]
            med = statistics.median(step)
            rows.append(
                dict(
                    d=d,
                    world=world,
                    step=med,
                    q=(min(step), max(step)),
                    per_rank=per_rank,
                    plain=base if world == 1 else None,
                    speedup=base / med,
                    eff=base / med / world,
                    rel=abs(ranks[0]["value"] - ref_value) / abs(ref_value),
                    load=(load0, os.getloadavg()[0]),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _markdown(args: argparse.Namespace, rows: list[dict], cmd: str) -> str:
    import gmwae_fast

    lines = [
        f"# Distributed MMD strong scaling ({args.machine})",
        "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} with",
        f"`{cmd}`; torch {torch.__version__}, gmwae_fast {getattr(gmwae_fast, '__version__', '?')}, "
        f"Python {platform.python_version()}, {os.cpu_count()} logical CPUs.",
        "",
        f"`fast_imq_mmd(x_r, y_r, process_group=WORLD, backend={args.backend!r})`, forward + backward (gradient "
        f"w.r.t. x), N = {args.n} points of x and N of y split evenly over R ranks, 15 `PAPER_SCALES`, "
        f"unbiased, float32, gloo on 127.0.0.1, one torch thread per rank, {args.repeat} timed repeats after "
        f"{args.warmup} warm-up. Step = the slowest rank's time, median over repeats (min-max in brackets); "
        "per rank = each rank's median. Baseline = the plain single-process call (no process group, one "
        "thread). Speed-up = baseline / step; efficiency = speed-up / R. `rel. diff` = |MMD²(R) - "
        "MMD²(R = 1)| / MMD²(R = 1).",
        "",
        "| d | R | step (median) | per rank | baseline (R = 1, plain) | speed-up | efficiency | rel. diff | "
        "load avg (before, after) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        plain = f"{r['plain'] * 1e3:.0f} ms" if r["plain"] is not None else ""
        lines.append(
            f"| {r['d']} | {r['world']} | {r['step'] * 1e3:.0f} ms ({r['q'][0] * 1e3:.0f}-"
            f"{r['q'][1] * 1e3:.0f}) | {', '.join(f'{t * 1e3:.0f} ms' for t in r['per_rank'])} | {plain} | "
            f"{r['speedup']:.2f}x | {r['eff'] * 100:.0f}% | {r['rel']:.1e} | "
            f"{r['load'][0]:.1f}, {r['load'][1]:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _machine() -> str:
    """``N-core <CPU model>, <ISA of the C++ kernels>, no GPU`` for the report title."""
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    try:
        from gmwae_fast import _C

        isa = _C.CPU_ISA
    except Exception:  # noqa: BLE001 - no extension: the description still stands
        isa = "no C++ kernels"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core {model}, {isa}, {gpu}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--d", type=int, nargs="+", default=[10, 64])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--machine", default=_machine(), help="machine for the report (default: from /proc/cpuinfo)")
    p.add_argument("--notes", default="", help="a paragraph appended to the report (e.g. the machine's load)")
    p.add_argument("--out", default=None, help="markdown report path (default: print only)")
    args = p.parse_args()
    if args.ranks[0] != 1:
        raise SystemExit("--ranks must start with 1 (the baseline)")
    rows = _rows(args)
    cmd = "python benchmarks/bench_distributed.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in (
            ("n", args.n),
            ("d", args.d),
            ("ranks", args.ranks),
            ("repeat", args.repeat),
            ("backend", args.backend),
        )
    )
    text = _markdown(args, rows, cmd) + (f"\n{args.notes}\n" if args.notes else "")
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
