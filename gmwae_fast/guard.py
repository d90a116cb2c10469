"""First-use check of GPU routes: a small fixed case against the float64 reference, once per route and device.

The CUDA tile kernels (with and without the tensor-core route), the Triton kernels and the fused
reparameterisation have been tested in the SIMT emulator and the Triton interpreter; a real GPU can still differ (a
compiler, a driver, an architecture). So the first time a guarded route runs in a process on a device,
:func:`check` runs it on a small fixed case (values and gradients of points and weights, grouped and plain) and
compares it with the ``reference`` backend in float64. On disagreement (or an exception) the route is disabled for
that device with one warning line naming it and the error: ``"auto"`` falls back to the next backend, an explicit
request raises :class:`RuntimeError` with the reason, and :func:`gmwae_fast.available_backends` and
:func:`gmwae_fast.build_info` (``guard``) report it. When only the CUDA tensor-core route fails (and the CUDA-core
route passes the same case), only it is turned off (``GMWAE_FAST_CUDA_TENSOR_CORES=0`` in this process).

``GMWAE_FAST_GUARD=0`` turns the guard off. The check runs in eager calls; a call traced by :func:`torch.compile`
uses what earlier eager calls found. Its cost (a few small kernel launches per route) is measured by
``benchmarks/bench_guard.py``.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import torch

__all__ = ["ENV", "GUARDED", "check", "failure", "report", "reset"]

#: Environment variable: ``0`` turns the guard off.
ENV = "GMWAE_FAST_GUARD"
_TC_ENV = "GMWAE_FAST_CUDA_TENSOR_CORES"
#: ``(backend, op family)`` -> the device types on which it is checked before first use.
GUARDED: dict[tuple[str, str], tuple[str, ...]] = {
    ("cuda", "imq_mmd"): ("cuda",),
    ("triton", "imq_mmd"): ("cuda",),
    ("cuda", "gm_reparam"): ("cuda",),
    ("triton", "gm_reparam"): ("cuda",),
}
#: Relative tolerance of the check against the float64 reference (the contract is 1e-5 for float32; a broken
#: route is off by far more).
RTOL = 1e-4

#: ``(route, device)`` -> ``None`` (passed) or why it failed; route: ``backend:op`` or ``cuda:imq_mmd:tensor_cores``.
_STATE: dict[tuple[str, str], Optional[str]] = {}
_running = False


def _device_key(device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def failure(backend: str, op: str, device) -> Optional[str]:
    """Why route ``backend`` of op family ``op`` failed its first-use check on ``device``, or ``None`` (passed,
    not yet checked, or not guarded)."""
    if not _STATE:
        return None
    return _STATE.get((f"{backend}:{op}", _device_key(device)))


def report() -> dict[str, Optional[str]]:
    """Every route checked so far: ``"backend:op@device"`` -> ``None`` (passed) or the failure."""
    return {f"{route}@{dev}": err for (route, dev), err in _STATE.items()}


def reset() -> None:
    """Forget every result (the next call of each route checks it again)."""
    _STATE.clear()


def check(backend: str, op: str, device) -> Optional[str]:
    """Run the first-use check of ``backend`` for op family ``op`` on ``device`` if it is guarded and not yet
    checked; returns why it failed (the route is then disabled) or ``None``."""
    global _running
    dev = torch.device(device)
    if _running or dev.type not in GUARDED.get((backend, op), ()) or os.environ.get(ENV, "1") == "0":
        return None
    key = (f"{backend}:{op}", _device_key(dev))
    if key in _STATE:
        return _STATE[key]
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return None  # inside torch.func transforms the check's own autograd cannot run: check at a later call
    _running = True
    try:  # the check needs autograd, whatever mode the caller's first call runs in (no_grad, inference_mode)
        with torch.inference_mode(False), torch.enable_grad():
            err = _checked(lambda: _CHECKS[op](backend, torch.device(key[1])))
            if err is None and (backend, op) == ("cuda", "imq_mmd"):
                _tensor_core_check(torch.device(key[1]))
    finally:
        _running = False
    _STATE[key] = err
    if err is not None:
        warnings.warn(
            f"gmwae_fast: the {backend} {op} route failed its first-use check on {key[1]} ({err}); it is disabled "
            f"in this process and 'auto' uses the next backend ({ENV}=0 skips the check)",
            RuntimeWarning,
            stacklevel=4,
        )
    return err


def _checked(fn: Callable[[], Optional[str]]) -> Optional[str]:
    try:
        return fn()
    except Exception as exc:  # a launch failure, a compile error, an illegal address: the route is unusable
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _tensor_core_check(dev: torch.device) -> None:
    """The CUDA float kernels take the tensor-core route for 32 <= d <= 64 on capable devices: check that case;
    when it fails and the CUDA-core route passes it, turn the tensor-core route off."""
    if os.environ.get(_TC_ENV) == "0":
        return
    key = ("cuda:imq_mmd:tensor_cores", str(dev))
    err = _checked(lambda: _imq_case("cuda", dev, d=40))
    if err is not None:
        os.environ[_TC_ENV] = "0"  # read by the extension at every launch
        if _checked(lambda: _imq_case("cuda", dev, d=40)) is not None:
            del os.environ[_TC_ENV]
            raise RuntimeError(f"the d = 40 case failed on both CUDA routes ({err})")
        warnings.warn(
            f"gmwae_fast: the CUDA tensor-core route failed its first-use check on {dev} ({err}); it is turned off "
            f"in this process ({_TC_ENV}=0), the CUDA-core route passed and runs instead",
            RuntimeWarning,
            stacklevel=5,
        )
    _STATE[key] = err


def _close(name: str, got: torch.Tensor, want: torch.Tensor) -> Optional[str]:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = float(want.abs().max()) or 1.0
    err = float((got - want).abs().max()) / scale if torch.isfinite(got).all() else float("inf")
    return None if err <= RTOL else f"{name} off by {err:.2g} relative to the float64 reference"


def _imq_case(backend: str, dev: torch.device, d: int = 10) -> Optional[str]:
    """Grouped unbiased x (13, 3, d) with weights against plain y (29, d), float32, three bandwidths: the value per
    bandwidth (values kernels) and the gradients of points and weights (fused gradient kernels)."""
    from .mmd import fast_imq_mmd

    g = torch.Generator().manual_seed(1234)
    x = torch.randn(13, 3, d, generator=g)
    y = torch.randn(29, d, generator=g) * 1.3 + 0.2
    w = torch.rand(13, 3, generator=g) + 0.05
    bws = [0.2 * d, 2.0 * d, 20.0 * d]
    outs = {}
    for name, be, dtype in (("got", backend, torch.float32), ("want", "reference", torch.float64)):
        xs, ys, ws = (t.to(dev, dtype).requires_grad_(True) for t in (x, y, w))
        per_band = fast_imq_mmd(xs, ys, ws, bandwidths=bws, reduction="none", backend=be)
        total = fast_imq_mmd(xs, ys, ws, bandwidths=bws, backend=be)
        grads = torch.autograd.grad(total, (xs, ys, ws))
        outs[name] = (per_band, *grads)
    for label, got, want in zip(("values", "d/dx", "d/dy", "d/dw"), outs["got"], outs["want"]):
        err = _close(f"{label} (d = {d})", got, want)
        if err:
            return err
    return None


def _reparam_case(backend: str, dev: torch.device) -> Optional[str]:
    """gm_reparameterize with given noise (B, K, d) = (7, 5, 6), float32: z, pi and the gradients of mu,
    sigma_raw and logits, against the reference backend in float64."""
    from .reparam import gm_reparameterize

    g = torch.Generator().manual_seed(4321)
    mu, s_raw, noise = (torch.randn(7, 5, 6, generator=g) for _ in range(3))
    logits = torch.randn(7, 5, generator=g)
    cot_z, cot_pi = torch.randn(7, 5, 6, generator=g), torch.randn(7, 5, generator=g)
    outs = {}
    for name, be, dtype in (("got", backend, torch.float32), ("want", "reference", torch.float64)):
        m, s, lg = (t.to(dev, dtype).requires_grad_(True) for t in (mu, s_raw, logits))
        z, pi = gm_reparameterize(m, s, lg, noise=noise.to(dev, dtype), backend=be)
        loss = (z * cot_z.to(dev, dtype)).sum() + (pi * cot_pi.to(dev, dtype)).sum()
        outs[name] = (z, pi, *torch.autograd.grad(loss, (m, s, lg)))
    for label, got, want in zip(("z", "pi", "d/dmu", "d/dsigma_raw", "d/dlogits"), outs["got"], outs["want"]):
        err = _close(label, got, want)
        if err:
            return err
    return None


_CHECKS: dict[str, Callable[[str, torch.device], Optional[str]]] = {"imq_mmd": _imq_case, "gm_reparam": _reparam_case}
