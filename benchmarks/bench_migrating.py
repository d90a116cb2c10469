"""Three public WAE codes' MMD penalties, computed the way they compute them (materialised pairwise matrices),
against their ``gmwae_fast`` mapping: fwd+bwd time and peak memory, float32, CPU (the figures of
``docs/migrating.md``).

    .venv/bin/python benchmarks/bench_migrating.py                           # every client at its default sizes
    .venv/bin/python benchmarks/bench_migrating.py --client konny --n 1024 --repeat 3
    .venv/bin/python benchmarks/bench_migrating.py --spread                  # AntixK vs fused estimator spread

A standalone script (the ``bench_*.py`` collection hook of this folder finds no test in it). The client forms are
written here from each code's published math with the same memory pattern (``n x n`` matrices per bandwidth;
``n x n x d`` difference tensors), not taken from the clients. A client run whose predicted footprint exceeds
``--max-gib`` is reported as skipped with the prediction. fwd+bwd: the value, then its gradient with respect to the
codes (the prior samples need none). Time: median of ``--repeat`` calls after one warm-up; memory: peak RSS of one
untimed call (``gmwae_fast._measure.measure_peak_memory``).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

import gmwae_fast
from gmwae_fast._measure import measure_peak_memory, timed_call

Penalty = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# -- the client forms (float32, materialised) ---------------------------------------------------------------------


def schelotto_like(z: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Seven bandwidths ``C = 2 d s``; ``|a|^2 + |b|^2 - 2 a.b`` distance matrices; ``n * MMD^2`` divided by ``n``."""
    n, d = z.shape
    sq_z, sq_p = (z * z).sum(1, keepdim=True), (prior * prior).sum(1, keepdim=True)
    dzz = sq_z + sq_z.t() - 2 * z @ z.t()
    dpp = sq_p + sq_p.t() - 2 * prior @ prior.t()
    dzp = sq_z + sq_p.t() - 2 * z @ prior.t()
    off = 1 - torch.eye(n, dtype=z.dtype)
    total = z.new_zeros(())
    for s in gmwae_fast.WAE_SCALES:
        c = 2 * d * s
        total = total + ((c / (c + dzz) + c / (c + dpp)) * off).sum() / (n - 1) - 2 * (c / (c + dzp)).sum() / n
    return total / n


def _pair_sums_repeat(a: torch.Tensor, b: torch.Tensor, c: float, eps: float, keep_diag: bool) -> torch.Tensor:
    """``sum k(a_i, b_j)`` from two repeated ``(n, n, d)`` copies (1Konny's memory pattern)."""
    aa = a.unsqueeze(1).repeat(1, b.shape[0], 1)
    bb = b.unsqueeze(0).repeat(a.shape[0], 1, 1)
    k = c / (eps + c + (aa - bb).pow(2).sum(2))
    return k.sum() if keep_diag else k.sum() - k.diagonal().sum()


def konny_like(z: torch.Tensor, prior: torch.Tensor, z_var: float = 2.0) -> torch.Tensor:
    n, d = z.shape
    c = 2 * d * z_var
    return (_pair_sums_repeat(prior, prior, c, 1e-9, False) + _pair_sums_repeat(z, z, c, 1e-9, False)) / (
        n * (n - 1)
    ) - 2 * _pair_sums_repeat(prior, z, c, 1e-9, True) / (n * n)


def antixk_like(z: torch.Tensor, prior: torch.Tensor, z_var: float = 2.0) -> torch.Tensor:
    """Off-diagonal sums of ``C / (1e-7 + C + D)`` from broadcast ``(n, n, d)`` differences, over ``n (n - 1)``."""
    n, d = z.shape
    c = 2 * d * z_var

    def off_sum(a, b):
        k = c / (1e-7 + c + (a.unsqueeze(1) - b.unsqueeze(0)).pow(2).sum(-1))
        return k.sum() - k.diagonal().sum()

    return (off_sum(prior, prior) + off_sum(z, z) - 2 * off_sum(prior, z)) / (n * (n - 1))


# -- the mappings ---------------------------------------------------------------------------------------------------


def schelotto_fused(z, prior):
    return gmwae_fast.fast_imq_mmd(z, prior, scales=gmwae_fast.WAE_SCALES)


def konny_fused(z, prior, z_var=2.0):
    return gmwae_fast.fast_imq_mmd(z, prior, scales=(1.0,), sigma2=z_var, eps=1e-9)


def antixk_fused_exact(z, prior, z_var=2.0):
    n, d = z.shape
    c = 2 * d * z_var
    t = gmwae_fast.imq_mmd_terms(z, prior, scales=(1.0,), sigma2=z_var, eps=1e-7)
    matched = (c / (c + 1e-7 + (z - prior).pow(2).sum(1).double())).sum()
    cross = (t.cross * n * n - matched) / (n * (n - 1))
    return (t.self_x / t.den_x + t.self_y / t.den_y - 2 * cross).sum()


def antixk_fused_ustat(z, prior, z_var=2.0):
    return gmwae_fast.fast_imq_mmd(z, prior, scales=(1.0,), sigma2=z_var, eps=1e-7)


#: client -> (default d, default sizes, client form, bytes per n^2 of the client form (predicted), mappings)
CLIENTS = {
    "schelotto": (8, (1024, 4096), schelotto_like, 4 * 14, {"fast_imq_mmd": schelotto_fused}),
    "konny": (64, (512, 1024), konny_like, 4 * 64 * 7, {"fast_imq_mmd": konny_fused}),
    "antixk": (
        128,
        (144, 1024),
        antixk_like,
        4 * 128 * 6,
        {"imq_mmd_terms (exact)": antixk_fused_exact, "fast_imq_mmd (full cross)": antixk_fused_ustat},
    ),
}


def _fwd_bwd(fn: Penalty, z: torch.Tensor, prior: torch.Tensor) -> Callable[[], float]:
    def call() -> float:
        zz = z.detach().requires_grad_(True)
        out = fn(zz, prior)
        out.backward()
        return float(out.detach())

    return call


def _measure(fn: Penalty, z, prior, repeat: int) -> tuple[float, float, float, int]:
    """``(value, median s, best s, peak bytes)``."""
    call = _fwd_bwd(fn, z, prior)
    value = call()  # warm-up
    times = [timed_call(call, z.device)[1] for _ in range(repeat)]
    peak, _ = measure_peak_memory(call, z.device)
    return value, statistics.median(times), min(times), peak or 0


def run_client(name: str, n: int, d: int, repeat: int, max_bytes: int) -> None:
    _, _, client, per_n2, mappings = CLIENTS[name]
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=gen) * 1.1 + 0.1
    prior = torch.randn(n, d, generator=gen)
    predicted = per_n2 * n * n
    if predicted > max_bytes:
        print(
            f"| {name} | {n} | {d} | client | skipped: predicted {predicted / 2**30:.1f} GiB > "
            f"{max_bytes / 2**30:.1f} GiB | | | |",
            flush=True,
        )
        base = None
    else:
        base = _measure(client, z, prior, repeat)
        print(
            f"| {name} | {n} | {d} | client (materialised) | {base[1] * 1e3:.1f} ms | {base[2] * 1e3:.1f} ms "
            f"| {base[3] / 2**20:.0f} MiB | {base[0]:.6g} |",
            flush=True,
        )
    for label, fn in mappings.items():
        val, med, best, peak = _measure(fn, z, prior, repeat)
        speed = f" ({base[1] / med:.1f}x)" if base else ""
        print(
            f"| {name} | {n} | {d} | {label} | {med * 1e3:.1f} ms{speed} | {best * 1e3:.1f} ms "
            f"| {peak / 2**20:.1f} MiB | {val:.6g} |",
            flush=True,
        )


def spread(n: int = 144, d: int = 128, draws: int = 2000, shift: float = 0.0) -> None:
    """Mean and standard deviation over ``draws`` batches of AntixK's estimator and of the full-cross one
    (codes ``N(shift, I)``, prior ``N(0, I)``, independent), float64."""
    gen = torch.Generator().manual_seed(1)
    vals = {"antixk (off-diagonal cross)": [], "fast_imq_mmd (full cross)": []}
    for _ in range(draws):
        z = torch.randn(n, d, generator=gen, dtype=torch.float64) + shift
        prior = torch.randn(n, d, generator=gen, dtype=torch.float64)
        vals["antixk (off-diagonal cross)"].append(float(antixk_fused_exact(z, prior)))
        vals["fast_imq_mmd (full cross)"].append(float(antixk_fused_ustat(z, prior)))
    for label, v in vals.items():
        print(
            f"| n={n} d={d} shift={shift} | {label} | mean {statistics.fmean(v):.4g} | "
            f"std {statistics.stdev(v):.4g} | {draws} draws |",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--client", choices=sorted(CLIENTS), action="append", help="default: all three")
    p.add_argument("--n", type=int, action="append", help="batch sizes (default: per client)")
    p.add_argument("--d", type=int, help="latent dimension (default: per client)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-gib", type=float, default=8.0, help="skip a client form predicted to need more")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--spread", action="store_true", help="only the estimator-spread experiment")
    p.add_argument("--draws", type=int, default=2000, help="batches in the spread experiment")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
        + ("float64, values only" if args.spread else "float32, fwd+bwd (grad w.r.t. z)")
    )
    if args.spread:
        for shift in (0.0, 0.1):
            spread(draws=args.draws, shift=shift)
        return
    print(
        "| client | n | d | provider | median time | best time | peak memory | value |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for name in args.client or sorted(CLIENTS):
        d = args.d or CLIENTS[name][0]
        for n in args.n or CLIENTS[name][1]:
            run_client(name, n, d, args.repeat, int(args.max_gib * 2**30))


if __name__ == "__main__":
    main()
