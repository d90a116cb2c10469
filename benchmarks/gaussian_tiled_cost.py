"""The tiled Gaussian MMD (``gmwae_fast.mmd2(kernel="gaussian")``) against DAN's materialised loss, forward and
backward, float32 inputs, CPU (the figures of ``docs/migrating.md``, DAN entry)::

    .venv/bin/python benchmarks/gaussian_tiled_cost.py

DAN's ``mmd_rbf_noaccelerate`` is written here from its published math with its memory pattern (a ``(2B, 2B, d)``
difference tensor, then five ``(2B, 2B)`` kernel matrices); ``d = 64``, ``kernel_mul = 2``, ``kernel_num = 5``.
Time: one call after a warm-up; memory: peak resident-set growth of one call (``gmwae_fast._measure``).
"""

import time

import torch

import gmwae_fast
from gmwae_fast._measure import measure_peak_memory


def dan_loss(source, target, kernel_mul=2.0, kernel_num=5):
    total = torch.cat([source, target])
    l2 = ((total.unsqueeze(0) - total.unsqueeze(1)) ** 2).sum(2)
    n = total.shape[0]
    bw = l2.detach().sum() / (n * n - n) / kernel_mul ** (kernel_num // 2)
    kern = sum(torch.exp(-l2 / (bw * kernel_mul**i)) for i in range(kernel_num))
    b = source.shape[0]
    return (kern[:b, :b] + kern[b:, b:] - kern[:b, b:] - kern[b:, :b]).mean()


def ours(source, target):
    bws = gmwae_fast.dan_bandwidths(source, target)
    return gmwae_fast.mmd2(source, target, kernel="gaussian", bandwidths=bws, unbiased=False)


def main() -> None:
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    print("| B | DAN (materialised) | mmd2 gaussian (tiled) | values |")
    print("| --- | --- | --- | --- |")
    for b in (256, 1024):
        s, t = torch.randn(b, 64), torch.randn(b, 64) + 0.1
        row = [str(b)]
        vals = []
        for fn in (dan_loss, ours):

            def step():
                x = s.clone().requires_grad_(True)
                v = fn(x, t)
                v.backward()
                return v

            vals.append(float(step().detach()))
            t0 = time.perf_counter()
            step()
            dt = time.perf_counter() - t0
            peak, _ = measure_peak_memory(step, cpu)
            row.append(f"{dt * 1e3:.0f} ms, {0 if peak is None else peak / 2**20:.0f} MiB")
        row.append(f"{vals[0]:.6g} / {vals[1]:.6g}")
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
