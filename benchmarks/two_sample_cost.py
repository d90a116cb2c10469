"""Cost of ``gmwae_fast.mmd_test`` on the CPU (the figures of ``docs/two_sample_test.md``)::

    .venv/bin/python benchmarks/two_sample_cost.py

Time of one test (``P`` permutations, ``d = 10``, float32, ``backend="cpu"``) and the process's peak resident set,
beside the size of the ``(N, N)`` float32 kernel matrix a kernel-matrix test would hold.
"""

import resource
import time

import torch

import gmwae_fast


def main() -> None:
    torch.manual_seed(0)
    for n, perms in ((2000, 100), (10000, 10)):
        x, y = torch.randn(n, 10), torch.randn(n, 10) + 0.05
        t = time.perf_counter()
        r = gmwae_fast.mmd_test(x, y, permutations=perms, seed=0, backend="cpu")
        dt = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        matrix = (2 * n) ** 2 * 4 / 2**20
        print(
            f"n=m={n} d=10 P={perms}: {dt:.1f} s ({dt / (perms + 1) * 1e3:.0f} ms per statistic), p={r.p_value:.3f}, "
            f"peak RSS {rss:.0f} MiB; an (N, N) float32 kernel matrix would be {matrix:.0f} MiB",
            flush=True,
        )


if __name__ == "__main__":
    main()
