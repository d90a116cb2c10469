"""Cost of ``gmwae_fast.mmd_test`` on the CPU (the figures of ``docs/two_sample_test.md``)::

    .venv/bin/python benchmarks/two_sample_cost.py

Time of one test (``P`` permutations, ``d = 10``, float32, the 7 WAE scales) with ``method="shared"`` (one pass for
all permutations) and ``method="separate"`` (one fused ``backend="cpu"`` pass per permutation; at the larger sizes
timed on fewer permutations and scaled, as noted), the largest extra memory of the shared pass (its
``(N, P + 1)`` labels and tile buffers, computed), beside the ``(N, N)`` float32 kernel matrix a kernel-matrix test
would hold.
"""

import time

import torch

import gmwae_fast


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    torch.manual_seed(0)
    print("| n = m | P | shared | separate | ratio | shared extra memory | N x N float32 matrix |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n, perms, sep_perms in ((1000, 1000, 100), (5000, 1000, 10), (20000, 200, 2)):
        x, y = torch.randn(n, 10), torch.randn(n, 10) + 0.05
        shared = _time(lambda: gmwae_fast.mmd_test(x, y, permutations=perms, seed=0))
        sep = _time(lambda: gmwae_fast.mmd_test(x, y, permutations=sep_perms, seed=0, method="separate"))
        sep = sep * (perms + 1) / (sep_perms + 1)  # per-pass cost is constant: scaled to P
        N, block, width = 2 * n, 1024, 10
        chunk = min(N, (1 << 22) // (block * width))
        extra = (N * (perms + 1) * 2 + block * N + block * chunk * width) * 8 / 2**20
        note = "" if sep_perms == perms else f" (from {sep_perms})"
        print(
            f"| {n} | {perms} | {shared:.1f} s | {sep:.1f} s{note} | {sep / shared:.1f}x | {extra:.0f} MiB | "
            f"{N * N * 4 / 2**20:.0f} MiB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
