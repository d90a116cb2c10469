"""``torch.library`` layer of the IMQ MMD op family (contract: ``docs/ARCHITECTURE.md``).

Each backend provides four primitive ops (``imq_self``, ``imq_cross`` and their ``_grad`` versions):

* C++ (``csrc/ops.cpp``, CPU and CUDA kernels): ``torch.ops.gmwae_fast.imq_self`` ... Their schemas are declared
  in C++; this module adds the fake (meta) implementations and the autograd formulas.
* Triton (``kernels/imq_mmd.py`` launchers): declared here as custom ops ``torch.ops.gmwae_fast.triton_imq_self``
  ... with the same schemas, fakes and autograd.

On top of them, two backend-generic *fused* ops serve ``reduction="sum"`` when a gradient is needed: one kernel
pass returns the summed value and the gradient of that sum, which the backward only rescales by the incoming
scalar cotangent (``imq_self_total``, ``imq_cross_total``).

All ops are opaque to :func:`torch.compile` (no graph break) and checked with :func:`torch.library.opcheck`. The
C++ op set is registered at import (when the extension is installed), so ``torch.compile(fullgraph=True)`` works
as the very first call. Double backward is not supported: gradients computed with ``create_graph=True`` carry a
node that raises :class:`RuntimeError` if they are differentiated again (never a silent zero).
"""

from __future__ import annotations

import importlib.util
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .. import _kernel_modules, backends
from ._autograd import first_order_only

__all__ = ["OpSet", "op_set"]


class OpSet(NamedTuple):
    """The four primitive ops of one backend."""

    self_values: Callable
    cross_values: Callable
    self_grad: Callable
    cross_grad: Callable


# ---------------------------------------------------------------------------------------------------------------
# Triton custom ops (the launchers import triton lazily, so this module imports without it).
# ---------------------------------------------------------------------------------------------------------------


def _tk():
    return _kernel_modules.load("imq_mmd")


@torch.library.custom_op("gmwae_fast::triton_imq_self", mutates_args=())
def triton_imq_self(a: Tensor, wa: Tensor, bw: Tensor, group: int, unbiased: bool) -> Tensor:
    return _tk().imq_self(a, wa, bw, group, unbiased)


@torch.library.custom_op("gmwae_fast::triton_imq_cross", mutates_args=())
def triton_imq_cross(a: Tensor, wa: Tensor, b: Tensor, wb: Tensor, bw: Tensor) -> Tensor:
    return _tk().imq_cross(a, wa, b, wb, bw)


@torch.library.custom_op("gmwae_fast::triton_imq_self_grad", mutates_args=())
def triton_imq_self_grad(
    h: Tensor, a: Tensor, wa: Tensor, bw: Tensor, group: int, unbiased: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(_tk().imq_self_grad(h, a, wa, bw, group, unbiased))


@torch.library.custom_op("gmwae_fast::triton_imq_cross_grad", mutates_args=())
def triton_imq_cross_grad(
    h: Tensor, a: Tensor, wa: Tensor, b: Tensor, wb: Tensor, bw: Tensor, b_grad: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(_tk().imq_cross_grad(h, a, wa, b, wb, bw, b_grad))


# ---------------------------------------------------------------------------------------------------------------
# Fake implementations and autograd, shared by the C++ and Triton op sets.
# ---------------------------------------------------------------------------------------------------------------


def _self_values_fake(a, wa, bw, group, unbiased):
    return bw.new_empty(bw.shape, dtype=torch.float64)


def _cross_values_fake(a, wa, b, wb, bw):
    return bw.new_empty(bw.shape, dtype=torch.float64)


def _self_grad_fake(h, a, wa, bw, group, unbiased):
    return bw.new_empty(bw.shape, dtype=torch.float64), torch.empty_like(a), torch.empty_like(wa)


def _cross_grad_fake(h, a, wa, b, wb, bw, b_grad=True):
    return (
        bw.new_empty(bw.shape, dtype=torch.float64),
        torch.empty_like(a),
        torch.empty_like(wa),
        torch.empty_like(b),
        torch.empty_like(wb),
    )


def _register(ops: OpSet) -> None:
    torch.library.register_fake(ops.self_values)(_self_values_fake)
    torch.library.register_fake(ops.cross_values)(_cross_values_fake)
    torch.library.register_fake(ops.self_grad)(_self_grad_fake)
    torch.library.register_fake(ops.cross_grad)(_cross_grad_fake)

    def self_setup(ctx, inputs, output):
        a, wa, bw, group, unbiased = inputs
        ctx.save_for_backward(a, wa, bw)
        ctx.group, ctx.unbiased = group, unbiased

    def self_backward(ctx, grad):
        a, wa, bw = ctx.saved_tensors
        _, da, dwa = ops.self_grad(grad.to(torch.float64).contiguous(), a, wa, bw, ctx.group, ctx.unbiased)
        da, dwa = first_order_only("imq_self", (da, dwa), (grad, a, wa))
        return da, dwa, None, None, None

    def cross_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def cross_backward(ctx, grad):
        a, wa, b, wb, bw = ctx.saved_tensors
        b_grad = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
        _, da, dwa, db, dwb = ops.cross_grad(grad.to(torch.float64).contiguous(), a, wa, b, wb, bw, b_grad)
        da, dwa, db, dwb = first_order_only("imq_cross", (da, dwa, db, dwb), (grad, a, wa, b, wb))
        return da, dwa, (db if b_grad else None), (dwb if b_grad else None), None

    torch.library.register_autograd(ops.self_values, self_backward, setup_context=self_setup)
    torch.library.register_autograd(ops.cross_values, cross_backward, setup_context=cross_setup)


TRITON_OPS = OpSet(triton_imq_self, triton_imq_cross, triton_imq_self_grad, triton_imq_cross_grad)
_register(TRITON_OPS)

_COMPILED_OPS: OpSet | None = None


def _compiled_ops() -> OpSet:
    global _COMPILED_OPS
    if _COMPILED_OPS is None:
        if backends.extension() is None:
            raise RuntimeError(backends.extension_error())
        ns = torch.ops.gmwae_fast
        _COMPILED_OPS = OpSet(
            ns.imq_self.default, ns.imq_cross.default, ns.imq_self_grad.default, ns.imq_cross_grad.default
        )
        _register(_COMPILED_OPS)
    return _COMPILED_OPS


# Register at import when the extension is installed, so that the first call inside torch.compile finds the
# registrations done (register_fake cannot run while dynamo traces). Without an extension nothing is loaded here.
if importlib.util.find_spec("gmwae_fast._C") is not None and backends.extension() is not None:
    _compiled_ops()


def op_set(backend: str) -> OpSet:
    """The primitive ops of a concrete backend (``"triton"``, ``"cpu"`` or ``"cuda"``)."""
    if backend == "triton":
        return TRITON_OPS
    if backend in ("cpu", "cuda"):
        return _compiled_ops()
    raise ValueError(f"backend {backend!r} has no fused op set")


# ---------------------------------------------------------------------------------------------------------------
# Fused value+gradient ops for reduction="sum" (one pass; the backward rescales the saved gradient).
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("gmwae_fast::imq_self_total", mutates_args=())
def imq_self_total(
    h: Tensor, a: Tensor, wa: Tensor, bw: Tensor, group: int, unbiased: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """``(sum_s h_s self_s, d/da, d/dwa)`` in one kernel pass (``h`` a constant float64 ``(S,)``)."""
    values, da, dwa = op_set(backend).self_grad(h, a, wa, bw, group, unbiased)
    return (h * values).sum(), da, dwa


@imq_self_total.register_fake
def _(h, a, wa, bw, group, unbiased, backend):
    return bw.new_empty((), dtype=torch.float64), torch.empty_like(a), torch.empty_like(wa)


def _self_total_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])  # kernel by-products: the backward never reads their grads
    ctx.save_for_backward(output[1], output[2], inputs[1], inputs[2])


def _self_total_backward(ctx, g_total, _g_da, _g_dwa):
    da, dwa, a, wa = ctx.saved_tensors
    da, dwa = first_order_only(
        "imq_self_total", ((g_total * da).to(da.dtype), (g_total * dwa).to(dwa.dtype)), (g_total, a, wa)
    )
    return None, da, dwa, None, None, None, None


imq_self_total.register_autograd(_self_total_backward, setup_context=_self_total_setup)


@torch.library.custom_op("gmwae_fast::imq_cross_total", mutates_args=())
def imq_cross_total(
    h: Tensor, a: Tensor, wa: Tensor, b: Tensor, wb: Tensor, bw: Tensor, backend: str, b_grad: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(sum_s h_s cross_s, d/da, d/dwa, d/db, d/dwb)`` in one kernel pass (``h`` a constant float64 ``(S,)``;
    ``d/db``, ``d/dwb`` zero and not computed when ``b_grad`` is false)."""
    values, da, dwa, db, dwb = op_set(backend).cross_grad(h, a, wa, b, wb, bw, b_grad)
    return (h * values).sum(), da, dwa, db, dwb


@imq_cross_total.register_fake
def _(h, a, wa, b, wb, bw, backend, b_grad=True):
    return (
        bw.new_empty((), dtype=torch.float64),
        torch.empty_like(a),
        torch.empty_like(wa),
        torch.empty_like(b),
        torch.empty_like(wb),
    )


def _cross_total_setup(ctx, inputs, output):
    ctx.b_grad = inputs[-1]
    ctx.mark_non_differentiable(*output[1:])  # kernel by-products: the backward never reads their grads
    ctx.save_for_backward(*(output[1:] if ctx.b_grad else output[1:3]), *inputs[1:5])


def _cross_total_backward(ctx, g_total, *_unused):
    saved = ctx.saved_tensors
    anchors = (g_total, *saved[-4:])
    grads = [(g_total * g).to(g.dtype) for g in saved[:-4]]
    grads = list(first_order_only("imq_cross_total", tuple(grads), anchors))
    if not ctx.b_grad:  # d/db and d/dwb were not computed (zeros): no gradient for b, wb
        grads += [None, None]
    return (None, *grads, None, None, None)


imq_cross_total.register_autograd(_cross_total_backward, setup_context=_cross_total_setup)


# ---------------------------------------------------------------------------------------------------------------
# Eager entry points of the fused ops. A Python custom op imports torch._dynamo at its first call (its backend
# wrapper is a dynamo-disabled function: ~1.5-20 s on a 2-core machine), so eager calls run the same forward and
# backward as a torch.autograd.Function; code that torch.compile traces keeps the opaque custom ops.
# ---------------------------------------------------------------------------------------------------------------


class _SelfTotal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, a, wa, bw, group, unbiased, backend):
        values, da, dwa = op_set(backend).self_grad(h, a, wa, bw, group, unbiased)
        ctx.save_for_backward(da, dwa, a, wa)
        return (h * values).sum()

    @staticmethod
    def backward(ctx, g_total):
        return _self_total_backward(ctx, g_total, None, None)


class _CrossTotal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, a, wa, b, wb, bw, backend, b_grad):
        values, da, dwa, db, dwb = op_set(backend).cross_grad(h, a, wa, b, wb, bw, b_grad)
        ctx.b_grad = b_grad
        ctx.save_for_backward(*((da, dwa, db, dwb) if b_grad else (da, dwa)), a, wa, b, wb)
        return (h * values).sum()

    @staticmethod
    def backward(ctx, g_total):
        return _cross_total_backward(ctx, g_total)


def self_total(h: Tensor, a: Tensor, wa: Tensor, bw: Tensor, group: int, unbiased: bool, backend: str) -> Tensor:
    """``sum_s h_s self_s`` with its gradient from the same kernel pass (:func:`imq_self_total`)."""
    if torch.compiler.is_compiling():
        return imq_self_total(h, a, wa, bw, group, unbiased, backend)[0]
    return _SelfTotal.apply(h, a, wa, bw, group, unbiased, backend)


def cross_total(
    h: Tensor, a: Tensor, wa: Tensor, b: Tensor, wb: Tensor, bw: Tensor, backend: str, b_grad: bool = True
) -> Tensor:
    """``sum_s h_s cross_s`` with its gradient from the same kernel pass (:func:`imq_cross_total`)."""
    if torch.compiler.is_compiling():
        return imq_cross_total(h, a, wa, b, wb, bw, backend, b_grad)[0]
    return _CrossTotal.apply(h, a, wa, b, wb, bw, backend, b_grad)
