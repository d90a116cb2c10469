"""The implementations the MMD benchmark compares; every one computes the same quantity.

Unbiased multi-bandwidth IMQ MMD² between ``x`` ``(n, d)`` and ``y`` ``(m, d)`` with uniform weights, summed over the
bandwidths ``C_s = 2 d s`` (``s`` in :data:`gmwae_fast.PAPER_SCALES` by default, 15 values):

==================  ==========================================================================================
``per_bandwidth``   ``gmwae_fast.reference.mmd_per_bandwidth``: one ``n x m`` matrix per bandwidth, as the original
                    WAE code and popular PyTorch WAE libraries write it (eager PyTorch)
``vectorised``      ``gmwae_fast.reference.mmd_vectorised``: all bandwidths broadcast over one distance matrix
                    (``n x m x S``; the best eager formulation)
``compiled``        ``torch.compile(mmd_vectorised)`` (static shapes, default mode)
``keops``           pykeops ``LazyTensor``: one symbolic reduction per term, the bandwidths a vector parameter,
                    the diagonal of the self terms removed analytically
``fused_triton``    ``gmwae_fast.fast_imq_mmd(..., backend="triton")`` (CUDA only; the interpreter is not timed)
``fused_cuda``      ``gmwae_fast.fast_imq_mmd(..., backend="cuda")``
``fused_cpu``       ``gmwae_fast.fast_imq_mmd(..., backend="cpu")``
==================  ==========================================================================================

The formulas of today's code are imported from :mod:`gmwae_fast.reference`, never copied.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from _names import BASELINES, FUSED, LABELS, PROVIDERS  # noqa: E402,F401
from torch import Tensor

import gmwae_fast
from gmwae_fast import reference

#: Peak bytes of the materialised baselines, in units of ``n * m * S * element size`` (measured with eager
#: PyTorch: per_bandwidth keeps ~5 matrices per bandwidth for the backward; vectorised holds ``C + D`` and
#: ``C / (C + D)`` at once and keeps ``C + D`` of every term for the backward; compiled is a guess, its real peak
#: is measured). KeOps and the fused kernels are ``O((n + m) d)``.
FOOTPRINT = {
    ("per_bandwidth", "fwd"): 0.6,
    ("per_bandwidth", "fwd+bwd"): 5.5,
    ("vectorised", "fwd"): 2.0,
    ("vectorised", "fwd+bwd"): 6.0,
    ("compiled", "fwd"): 0.2,
    ("compiled", "fwd+bwd"): 1.0,
}


def footprint_bytes(provider: str, n: int, m: int, n_bandwidths: int, mode: str, dtype: torch.dtype) -> int:
    """Estimated peak bytes of one call (0 for the providers that materialise nothing)."""
    factor = FOOTPRINT.get((provider, mode), 0.0)
    elt = torch.empty((), dtype=dtype).element_size()
    return int(factor * n * m * n_bandwidths * elt)


def _keops_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    try:
        importlib.import_module("pykeops.torch")
    except Exception as exc:  # ImportError, or a broken install
        return f"pykeops is not installed or not importable ({type(exc).__name__}: {exc}); pip install pykeops"
    if dtype not in (torch.float32, torch.float64, torch.float16):
        return f"KeOps has no {dtype} support (float16/32/64 only)"
    if device.type == "cuda":
        import pykeops.config

        if not getattr(pykeops.config, "gpu_available", False):
            return "pykeops found no usable CUDA toolkit (nvrtc), so it runs on the CPU only"
    return None


def unavailable_reason(
    provider: str, device: torch.device, dtype: torch.dtype, allow_interpreter: bool = False
) -> Optional[str]:
    """``None`` if ``provider`` can be measured on ``device`` / ``dtype`` here, else why not."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device on this machine"
    if provider == "keops":
        return _keops_reason(device, dtype)
    if provider == "compiled" and not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if provider in FUSED:
        backend = provider.split("_", 1)[1]
        if backend == "triton" and device.type == "cpu" and not allow_interpreter:
            return (
                "triton runs CPU tensors only in the interpreter (TRITON_INTERPRET=1), which is a correctness "
                "tool: not benchmarked"
            )
        reason = gmwae_fast.available_backends(device)[backend]
        if reason is not None:
            return f"backend {backend!r} unusable on {device.type}: {reason}"
    return None


def make_inputs(
    n: int, d: int, dtype: torch.dtype, device: torch.device, m: Optional[int] = None, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``x ~ N(0, I)`` ``(n, d)`` and ``y ~ N(0.5, I)`` ``(m, d)`` (the shift keeps MMD² well away from zero so the
    value check is meaningful), drawn on the CPU from ``seed`` so every device sees the same numbers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randn(m if m is not None else n, d, generator=g) + 0.5
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def reference_value(x: Tensor, y: Tensor, scales: Sequence[float] = gmwae_fast.PAPER_SCALES) -> float:
    """Float64 oracle (``gmwae_fast.reference.imq_mmd_reference``) on the inputs as given (already rounded to
    their dtype), uniform weights, unbiased, summed over the bandwidths."""
    bws = reference.bandwidths_for(x.shape[1], scales)
    with torch.no_grad():
        return float(reference.imq_mmd_reference(x.double(), y.double(), bandwidths=bws))


# ---------------------------------------------------------------------------------------------------------------
# the formulations
# ---------------------------------------------------------------------------------------------------------------


def _bw_tensor(d: int, scales: Sequence[float], like: Tensor) -> Tensor:
    return torch.tensor(reference.bandwidths_for(d, scales), dtype=like.dtype, device=like.device)


def _keops_mmd_fn(d: int, scales: Sequence[float], like: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    from pykeops.torch import LazyTensor

    c = _bw_tensor(d, scales, like)  # (S,) vector parameter of every formula
    n_bw = c.shape[0]

    def term(p: Tensor, q: Tensor) -> Tensor:
        p_i = LazyTensor(p[:, None, :])
        q_j = LazyTensor(q[None, :, :])
        c_p = LazyTensor(c)
        dist = ((p_i - q_j) ** 2).sum(-1)  # (n, m, 1), differences, never the |a|^2+|b|^2-2ab form
        k = (c_p / (c_p + dist)).sum(-1)  # sum over the S bandwidths inside the formula
        return k.sum(dim=1).sum()  # one reduction over j, then the n row sums

    def mmd(x: Tensor, y: Tensor) -> Tensor:
        n, m = x.shape[0], y.shape[0]
        kxx = term(x, x) - n * n_bw  # the diagonal: k_s(0) = 1 for each bandwidth
        kyy = term(y, y) - m * n_bw
        kxy = term(x, y)
        return kxx / (n * (n - 1)) + kyy / (m * (m - 1)) - 2.0 * kxy / (n * m)

    return mmd


def mmd_function(
    provider: str, d: int, like: Tensor, scales: Sequence[float] = gmwae_fast.PAPER_SCALES
) -> Callable[[Tensor, Tensor], Tensor]:
    """``f(x, y) -> scalar MMD²`` of ``provider`` (builds what needs building; compiling happens at first call)."""
    scales = tuple(scales)
    if provider == "per_bandwidth":
        return lambda x, y: reference.mmd_per_bandwidth(x, y, scales)
    if provider == "vectorised":
        bw = _bw_tensor(d, scales, like)
        return lambda x, y: reference.mmd_vectorised(x, y, bw)
    if provider == "compiled":
        import torch._dynamo

        torch._dynamo.reset()  # a fresh cache per case: static shapes, no recompile-limit fallback to eager
        compiled = torch.compile(reference.mmd_vectorised, dynamic=False)
        bw = _bw_tensor(d, scales, like)
        return lambda x, y: compiled(x, y, bw)
    if provider == "keops":
        return _keops_mmd_fn(d, scales, like)
    if provider in FUSED:
        backend = provider.split("_", 1)[1]
        return lambda x, y: gmwae_fast.fast_imq_mmd(x, y, scales=scales, backend=backend)
    raise ValueError(f"unknown provider {provider!r}")


@dataclass
class Runner:
    """One benchmarkable call: ``run()`` evaluates the MMD (and its backward in ``fwd+bwd`` mode, gradient with
    respect to ``x``; ``y`` plays the prior samples and needs none) and returns the detached value."""

    run: Callable[[], Tensor]
    x: Tensor

    def grad(self) -> Optional[Tensor]:
        return self.x.grad


def make_runner(
    provider: str, x: Tensor, y: Tensor, mode: str, scales: Sequence[float] = gmwae_fast.PAPER_SCALES
) -> Runner:
    f = mmd_function(provider, x.shape[1], x, scales)
    if mode == "fwd":
        xi = x.detach()

        def run() -> Tensor:
            with torch.no_grad():
                return f(xi, y)

        return Runner(run, xi)
    if mode != "fwd+bwd":
        raise ValueError(f"unknown mode {mode!r}")
    xg = x.detach().clone().requires_grad_(True)

    def run_bwd() -> Tensor:
        xg.grad = None  # the last call's gradient stays readable through Runner.grad()
        v = f(xg, y)
        v.backward()
        return v.detach()

    return Runner(run_bwd, xg)


def check_value(provider: str, value: float, ref: float, dtype: torch.dtype) -> tuple[float, Optional[float]]:
    """``(relative error, tolerance)`` of a provider's value against the float64 reference; tolerance ``None``
    means "recorded, not asserted" (materialised baselines in bfloat16/float16 compute the whole formula in that
    dtype, so their error is a result, not a bug). Fused kernels compute in float32 for every input dtype."""
    rel = abs(value - ref) / max(abs(ref), 1e-30)
    if not math.isfinite(value):
        rel = math.inf
    low_precision = dtype in (torch.bfloat16, torch.float16)
    if provider in FUSED:
        return rel, 1e-4
    if low_precision:
        return rel, None
    return rel, 1e-3
