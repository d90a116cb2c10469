"""``torch.library`` layer of the fused per-mode reparameterisation (public API: ``gmwae_fast/reparam.py``).

Two primitive ops per fused backend, with the same schemas::

    gm_reparam(Tensor mu, Tensor sigma_raw, Tensor logits, Tensor? seed, Tensor? noise, str activation)
        -> (Tensor z, Tensor pi)
    gm_reparam_backward(Tensor grad_z, Tensor grad_pi, Tensor sigma_raw, Tensor logits, Tensor? seed,
                        Tensor? noise, str activation) -> (Tensor d_sigma_raw, Tensor d_logits)

* C++ (schemas in ``csrc/ops.cpp``, kernels ``csrc/gm_reparam_cpu.cpp`` / ``csrc/gm_reparam_cuda.cu``):
  ``torch.ops.gmwae_fast.gm_reparam`` and ``.gm_reparam_backward``; this module adds their fakes and autograd.
* Triton (``kernels/gm_reparam.py`` launchers): custom ops ``torch.ops.gmwae_fast.triton_gm_reparam`` and
  ``.triton_gm_reparam_backward``, declared here.

Contract: ``mu``, ``sigma_raw``, ``noise`` ``(B, K, d)`` of one floating dtype, contiguous; ``logits`` ``(B, K)``
floating; ``seed`` an int64 tensor with one element, on the inputs' device (read by the kernel: no host sync, CUDA
graph safe) or on the CPU (read on the host), ``None`` iff ``noise`` is given. ``activation`` is ``"softplus"`` or
``"exp"``. ``z`` has ``mu``'s dtype and ``pi`` ``logits``'s; math is float32 (float64 for float64 inputs).

Autograd (shared): the forward saves ``sigma_raw``, ``logits``, ``seed`` (and ``noise`` when given) — never the
generated noise, which the backward op regenerates from ``(seed, element index)``; ``d_mu = grad_z``.
``noise`` gets no gradient (it is a constant sample). Double backward is not supported: under
``create_graph=True`` the gradients of ``sigma_raw`` and ``logits`` raise if differentiated again (``d_mu`` is exact).

All ops are opaque to :func:`torch.compile` (no graph break) and checked with :func:`torch.library.opcheck`.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .. import _kernel_modules, backends
from ._autograd import first_order_only

__all__ = ["ReparamOps", "op_set", "TRITON_OPS"]


class ReparamOps(NamedTuple):
    """The forward and backward primitive ops of one backend."""

    forward: Callable
    backward: Callable


# ---------------------------------------------------------------------------------------------------------------
# Triton custom ops (the launchers import triton lazily, so this module imports without it).
# ---------------------------------------------------------------------------------------------------------------


def _tk():
    return _kernel_modules.load("gm_reparam")


@torch.library.custom_op("gmwae_fast::triton_gm_reparam", mutates_args=())
def triton_gm_reparam(
    mu: Tensor, sigma_raw: Tensor, logits: Tensor, seed: Optional[Tensor], noise: Optional[Tensor], activation: str
) -> tuple[Tensor, Tensor]:
    return tuple(_tk().gm_reparam(mu, sigma_raw, logits, seed, noise, activation))


@torch.library.custom_op("gmwae_fast::triton_gm_reparam_backward", mutates_args=())
def triton_gm_reparam_backward(
    grad_z: Tensor,
    grad_pi: Tensor,
    sigma_raw: Tensor,
    logits: Tensor,
    seed: Optional[Tensor],
    noise: Optional[Tensor],
    activation: str,
) -> tuple[Tensor, Tensor]:
    return tuple(_tk().gm_reparam_backward(grad_z, grad_pi, sigma_raw, logits, seed, noise, activation))


# ---------------------------------------------------------------------------------------------------------------
# Fake implementations and autograd, shared by the C++ and Triton ops.
# ---------------------------------------------------------------------------------------------------------------


def _forward_fake(mu, sigma_raw, logits, seed, noise, activation):
    return torch.empty_like(mu, memory_format=torch.contiguous_format), torch.empty_like(
        logits, memory_format=torch.contiguous_format
    )


def _backward_fake(grad_z, grad_pi, sigma_raw, logits, seed, noise, activation):
    return torch.empty_like(sigma_raw, memory_format=torch.contiguous_format), torch.empty_like(
        logits, memory_format=torch.contiguous_format
    )


def _register(ops: ReparamOps) -> None:
    torch.library.register_fake(ops.forward)(_forward_fake)
    torch.library.register_fake(ops.backward)(_backward_fake)

    def setup_context(ctx, inputs, output):
        mu, sigma_raw, logits, seed, noise, activation = inputs
        ctx.save_for_backward(sigma_raw, logits, seed, noise)
        ctx.activation = activation

    def backward(ctx, grad_z, grad_pi):
        sigma_raw, logits, seed, noise = ctx.saved_tensors
        if grad_z is None:
            grad_z = torch.zeros_like(sigma_raw)
        if grad_pi is None:
            grad_pi = torch.zeros_like(logits)
        d_mu = grad_z if ctx.needs_input_grad[0] else None
        d_sigma_raw = d_logits = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            d_sigma_raw, d_logits = ops.backward(
                grad_z.contiguous(), grad_pi.contiguous(), sigma_raw, logits, seed, noise, ctx.activation
            )
            d_sigma_raw, d_logits = first_order_only(
                "gm_reparam", (d_sigma_raw, d_logits), (grad_z, grad_pi, sigma_raw, logits)
            )
        return d_mu, d_sigma_raw, d_logits, None, None, None

    torch.library.register_autograd(ops.forward, backward, setup_context=setup_context)


TRITON_OPS = ReparamOps(
    torch.ops.gmwae_fast.triton_gm_reparam.default, torch.ops.gmwae_fast.triton_gm_reparam_backward.default
)
_register(TRITON_OPS)

_COMPILED_OPS: Optional[ReparamOps] = None


def _register_compiled() -> Optional[str]:
    """Register fake + autograd of the C++ ops; ``None`` on success, else why they are unavailable. Which device
    kernels ``_C`` has is the registry's question (``backends.unavailable_reason(..., op="gm_reparam")``)."""
    global _COMPILED_OPS
    if _COMPILED_OPS is not None:
        return None
    if backends.extension() is None:
        return backends.extension_error()
    try:
        ns = torch.ops.gmwae_fast
        ops = ReparamOps(ns.gm_reparam.default, ns.gm_reparam_backward.default)
    except (AttributeError, RuntimeError):
        return "gmwae_fast._C was built before the gm_reparam ops existed (rebuild the extension)"
    _register(ops)
    _COMPILED_OPS = ops
    return None


# Register at import when the extension is installed, so that the first call inside torch.compile finds the
# registrations done (tracing them would break the graph). Without an extension nothing is loaded here.
if importlib.util.find_spec("gmwae_fast._C") is not None:
    _register_compiled()


def op_set(backend: str) -> ReparamOps:
    """The ops of a concrete fused backend (``"triton"``, ``"cpu"`` or ``"cuda"``), as chosen by
    :func:`gmwae_fast.backends.select_backend` (which has checked that the backend has these kernels)."""
    if backend == "triton":
        return TRITON_OPS
    if backend in ("cpu", "cuda"):
        reason = _register_compiled()
        if reason is not None:
            raise RuntimeError(f"backend {backend!r} cannot run gm_reparameterize: {reason}")
        return _COMPILED_OPS
    raise ValueError(f"backend {backend!r} has no fused op set")
