"""Call every CUDA kernel of gmwae_fast once on small odd-sized inputs, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/gpu_sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 scripts/gpu_sanitize.py

Sizes are not multiples of the kernels' 64-row tiles or their 32/64-wide feature chunks, so every ragged edge is
visited. Run it with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (gpu_check.sh does): every tensor is then its own
allocation and memcheck sees a read past its end. Correctness is the selftest's job; this only checks the results
are finite. Exit status 0 when every call returned, 1 otherwise (2 without a usable backend).
``--backend cpu`` runs the same calls on the CPU kernels (what the test suite does to check this script).
"""

from __future__ import annotations

import argparse
import sys

import torch

import gmwae_fast


def _mmd_calls(dev: str, backend: str, dtype: torch.dtype) -> int:
    """Values only, the fused value+gradient pass (both sides, then the WAE side only) and per-bandwidth backward."""
    g = torch.Generator(device="cpu").manual_seed(0)
    calls = 0
    # d = 37 and 36: the tensor-core route (4-byte and 16-byte tile loads); 67: two chunks; 5: CUDA cores
    for xs, ys in (((133, 37), (71, 37)), ((69, 36), (65, 36)), ((23, 3, 67), (45, 67)), ((9, 5), (7, 5))):
        x = torch.randn(*xs, generator=g).to(dev, dtype)
        y = torch.randn(*ys, generator=g).to(dev, dtype)
        xw = torch.rand(xs[:-1], generator=g).add(0.1).to(dev, dtype)
        for unbiased in (True, False):
            with torch.no_grad():
                _finite(gmwae_fast.fast_imq_mmd(x, y, xw, unbiased=unbiased, backend=backend))
            for grads, reduction in (((x, xw, y), "sum"), ((x, xw), "sum"), ((x, y), "none")):
                leaves = [t.detach().requires_grad_(any(t is u for u in grads)) for t in (x, xw, y)]
                out = gmwae_fast.fast_imq_mmd(
                    leaves[0], leaves[2], leaves[1], unbiased=unbiased, reduction=reduction, backend=backend
                )
                out.sum().backward()
                _finite(out, *[t.grad for t in leaves if t.grad is not None])
                calls += 2
    return calls


def _reparam_calls(dev: str, backend: str, dtype: torch.dtype) -> int:
    """Forward and backward of gm_reparameterize with a seed and with explicit noise, both activations."""
    calls = 0
    for B, K, d in ((37, 3, 5), (5, 7, 67)):
        mu, sr = (torch.randn(B, K, d, device=dev, dtype=dtype) for _ in range(2))
        lg = torch.randn(B, K, device=dev, dtype=dtype)
        for act in ("softplus", "exp"):
            for kw in ({"seed": 11}, {"noise": torch.randn(B, K, d, device=dev, dtype=dtype)}):
                leaves = [t.detach().requires_grad_(True) for t in (mu, sr, lg)]
                z, pi = gmwae_fast.gm_reparameterize(*leaves, sigma_activation=act, backend=backend, **kw)
                (z.float().square().sum() + pi.float().log().sum()).backward()
                _finite(z, pi, *[t.grad for t in leaves])
                calls += 2
    return calls


def _finite(*ts: torch.Tensor) -> None:
    for t in ts:
        if not bool(torch.isfinite(t).all()):
            raise RuntimeError(f"non-finite result of shape {tuple(t.shape)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="call every gmwae_fast kernel once (for compute-sanitizer)")
    p.add_argument("--backend", choices=("cuda", "triton", "cpu"), default="cuda")
    a = p.parse_args(argv)
    dev = "cpu" if a.backend == "cpu" else "cuda"
    reason = (
        "no CUDA device"
        if dev == "cuda" and not torch.cuda.is_available()
        else gmwae_fast.available_backends(dev)[a.backend]
    )
    if reason is not None:
        print(f"gpu_sanitize: the {a.backend!r} backend cannot run: {reason}", file=sys.stderr)
        return 2
    calls = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        calls += _mmd_calls(dev, a.backend, dtype) + _reparam_calls(dev, a.backend, dtype)
        if dev == "cuda":
            torch.cuda.synchronize()
        print(f"gpu_sanitize: {dtype} done ({calls} op calls so far)", flush=True)
    print(f"gpu_sanitize: OK, {calls} forward/backward calls on {a.backend}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
