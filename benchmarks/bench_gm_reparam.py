"""Fused per-mode reparameterisation (``gmwae_fast.gm_reparameterize``) against the unfused PyTorch sequence.

    pytest benchmarks/bench_gm_reparam.py --benchmark-only                 # this file alone
    pytest benchmarks/bench_gm_reparam.py --benchmark-only --benchmark-json out.json

The GM-WAE encoder output at ``B = 1024`` inputs, ``K = 10`` modes, ``d in {10, 64}``, float32, all requiring
grad. Providers:

* ``unfused``: what users write today, ``sigma = softplus(sigma_raw); eps = randn_like(sigma);
  z = mu + sigma * eps; pi = softmax(logits, -1)`` (five kernels; autograd keeps ``sigma_raw``, ``eps`` and ``pi``);
* ``unfused-compiled``: the same under ``torch.compile`` (GPU only: on a CPU the compile is slow and not the target);
* ``fused-cpu`` / ``fused-cuda`` / ``fused-triton``: ``gm_reparameterize(..., backend=...)`` (one kernel each way,
  noise regenerated in the backward; the Triton interpreter on CPU tensors is skipped, it measures nothing useful).

Modes: ``fwd`` (the forward with autograd recording, as in training) and ``fwd_bwd`` (forward, then backward with
fixed cotangents for ``z`` and ``pi``). Groups are named ``gm_reparam-B1024-K10-d<d>-<mode>``.

Memory saved for backward: counted once per case outside the timed region with
``torch.autograd.graph.saved_tensors_hooks`` (bytes of the distinct storages autograd packs during the forward), and
stored in each case's ``extra_info``: ``saved_bytes`` (everything) and ``saved_bytes_beyond_inputs`` (storages that
are not ``mu``, ``sigma_raw`` or ``logits``, i.e. what the op adds to the activation memory of a training step).

Self-contained: it uses only pytest-benchmark's ``benchmark`` fixture (the shared ``conftest.py`` of this folder
collects ``bench_*.py`` files).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gmwae_fast

B, K = 1024, 10
DIMS = (10, 64)
MODES = ("fwd", "fwd_bwd")
PROVIDERS = ("unfused", "unfused-compiled", "fused-cpu", "fused-cuda", "fused-triton")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def unfused(mu, sigma_raw, logits):
    sigma = F.softplus(sigma_raw)
    eps = torch.randn_like(sigma)
    z = mu + sigma * eps
    pi = torch.softmax(logits, dim=-1)
    return z, pi


_COMPILED = {}


def _provider_fn(provider: str, device: torch.device):
    """The callable ``(mu, sigma_raw, logits) -> (z, pi)`` of a provider, or raise ``pytest.skip`` with why not."""
    if provider == "unfused":
        return unfused
    if provider == "unfused-compiled":
        if device.type != "cuda":
            pytest.skip("torch.compile of the unfused sequence is benchmarked on a GPU only")
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(unfused, fullgraph=True)
        return _COMPILED["fn"]
    backend = provider.split("-", 1)[1]
    if backend == "triton" and device.type == "cpu":
        pytest.skip("Triton on CPU tensors runs in the interpreter: not a performance path")
    reason = gmwae_fast.available_backends(device, op="gm_reparam")[backend]
    if reason is not None:
        pytest.skip(f"backend {backend!r} unusable on {device.type}: {reason}")

    def fused(mu, sigma_raw, logits):
        return gmwae_fast.gm_reparameterize(mu, sigma_raw, logits, backend=backend)

    return fused


def saved_bytes(fn, inputs) -> tuple[int, int]:
    """``(all, beyond the inputs)``: bytes of the distinct storages autograd saves during ``fn(*inputs)``."""
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    del out
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    total = sum(storages.values())
    beyond = sum(n for p, n in storages.items() if p not in input_ptrs)
    return total, beyond


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_gm_reparam(benchmark, provider, d, mode):
    device = _device()
    fn = _provider_fn(provider, device)
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(B, K, d, generator=g).to(device).requires_grad_()
    sigma_raw = torch.randn(B, K, d, generator=g).to(device).requires_grad_()
    logits = torch.randn(B, K, generator=g).to(device).requires_grad_()
    gz = torch.randn(B, K, d, generator=g).to(device)
    gpi = torch.randn(B, K, generator=g).to(device)
    inputs = (mu, sigma_raw, logits)

    def fwd():
        out = fn(*inputs)
        _sync(device)
        return out

    def fwd_bwd():
        z, pi = fn(*inputs)
        torch.autograd.backward([z, pi], [gz, gpi])
        _sync(device)

    run = fwd if mode == "fwd" else fwd_bwd
    for _ in range(3):  # warm-up: compile, Triton JIT, allocator
        run()
    for t in inputs:
        t.grad = None
    total, beyond = saved_bytes(fn, inputs)
    benchmark.group = f"gm_reparam-B{B}-K{K}-d{d}-{mode}"
    benchmark.extra_info.update(
        {
            "provider": provider,
            "B": B,
            "K": K,
            "d": d,
            "mode": mode,
            "device": str(device),
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "saved_bytes": total,
            "saved_bytes_beyond_inputs": beyond,
        }
    )
    benchmark.pedantic(run, rounds=30 if device.type == "cpu" else 200, iterations=1, warmup_rounds=2)
