"""WAE batch sizes on one CPU thread: the fused op against the original WAE code's penalty, forward + backward.

    pytest benchmarks/bench_small_batch.py --benchmark-only               # pytest-benchmark, one group per (n, d)
    .venv/bin/python benchmarks/bench_small_batch.py                      # interleaved ratio table (docs/migrating.md)
    .venv/bin/python benchmarks/bench_small_batch.py --n 128 --d 64 --rounds 400

The sizes of WAE papers: ``n = m in {64, 128, 256}``, ``d in {8, 16, 64}``, float32, the 7 :data:`WAE_SCALES`
(``sigma2 = 1``), unbiased, one thread (``torch.set_num_threads(1)``), the gradient with respect to the codes only
(the prior samples need none). Providers:

* ``wae_classic``: :func:`gmwae_fast.reference.mmd_per_bandwidth`, the original WAE code's formula (one ``n x m``
  matrix per bandwidth; eager PyTorch);
* ``fused_cpu``: ``gmwae_fast.fast_imq_mmd(z, prior, backend="cpu")`` (same value: the default is the WAE penalty).

Small calls are timed in microseconds, where a loaded or frequency-scaling machine drifts by 2x within a minute:
the script mode interleaves the two providers call by call and reports the median of each and the median of the
per-round ratios, which is what the ratio table quotes. Timed tests prove nothing here (see the Standards); this
file records figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch

import gmwae_fast
from gmwae_fast import reference

SIZES = (64, 128, 256)
DIMS = (8, 16, 64)
PROVIDERS = ("wae_classic", "fused_cpu")


def provider_fn(provider: str):
    """``(z, prior) -> penalty`` of a provider (both the unbiased 7-scale WAE penalty)."""
    if provider == "wae_classic":
        return lambda z, p: reference.mmd_per_bandwidth(z, p, gmwae_fast.WAE_SCALES)
    if provider == "fused_cpu":
        return lambda z, p: gmwae_fast.fast_imq_mmd(z, p, backend="cpu")
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def inputs(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def step(fn, z: torch.Tensor, prior: torch.Tensor) -> None:
    """One forward + backward, as a training step runs the penalty."""
    zz = z.detach().requires_grad_()
    fn(zz, prior).backward()


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("n", SIZES)
def test_small_batch(benchmark, one_thread, n, d, provider):
    if provider == "fused_cpu":
        reason = gmwae_fast.available_backends("cpu")["cpu"]
        if reason is not None:
            pytest.skip(f"backend 'cpu' unusable: {reason}")
    fn = provider_fn(provider)
    z, prior = inputs(n, d)
    benchmark.group = f"small_batch-n{n}-d{d}-fwd+bwd-fp32-1thread"
    benchmark.extra_info.update(n=n, d=d, scales=len(gmwae_fast.WAE_SCALES), threads=1, provider=provider)
    benchmark.pedantic(step, args=(fn, z, prior), rounds=50, iterations=5, warmup_rounds=5)


def interleaved(n: int, d: int, rounds: int) -> dict:
    """Median seconds per provider and the median per-round ratio ``wae_classic / fused_cpu``."""
    z, prior = inputs(n, d)
    fns = {p: provider_fn(p) for p in PROVIDERS}
    a, b = fns["wae_classic"](z, prior).item(), fns["fused_cpu"](z, prior).item()
    if abs(a - b) > 1e-4:  # the float32 matrix formula cancels terms of size ~S: absolute agreement
        raise RuntimeError(f"the providers disagree at n={n} d={d}: {a} vs {b}")
    for _ in range(10):
        for fn in fns.values():
            step(fn, z, prior)
    times = {p: [] for p in PROVIDERS}
    for _ in range(rounds):
        for p, fn in fns.items():
            t0 = time.perf_counter()
            step(fn, z, prior)
            times[p].append(time.perf_counter() - t0)
    ratios = [c / f for c, f in zip(times["wae_classic"], times["fused_cpu"])]
    return {p: statistics.median(t) for p, t in times.items()} | {"ratio": statistics.median(ratios)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="*", default=list(SIZES))
    ap.add_argument("--d", type=int, nargs="*", default=list(DIMS))
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, gmwae_fast {gmwae_fast.__version__}, 1 thread, float32, fwd+bwd, 7 scales")
    print("| n | d | WAE formula | fused cpu | ratio |\n|---|---|---|---|---|")
    for n in args.n:
        for d in args.d:
            r = interleaved(n, d, args.rounds)
            classic, fused = r["wae_classic"] * 1e6, r["fused_cpu"] * 1e6
            print(f"| {n} | {d} | {classic:.0f} us | {fused:.0f} us | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
