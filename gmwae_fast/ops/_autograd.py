"""Autograd helpers shared by the op families: first-order-only gradients that refuse to be differentiated again.

The backward formulas of the fused ops are themselves kernels with no autograd. Under ``create_graph=True`` their
outputs would silently carry no dependence on the inputs, so a second derivative (a gradient penalty, a Hessian
product) would come out as zero. :func:`first_order_only` ties such gradients to the inputs through a node whose
backward raises, so the first-order gradients still work with ``create_graph=True`` while any attempt to
differentiate through them fails loudly.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["first_order_only", "refuse_forward_ad"]


class _NoSecondOrder(torch.autograd.Function):
    """Identity in the forward (a copy); raises in the backward."""

    @staticmethod
    def forward(ctx, grad: Tensor, op_name: str, *anchors: Tensor) -> Tensor:
        ctx.op_name = op_name
        return grad.clone()

    @staticmethod
    def backward(ctx, *_grads):
        raise RuntimeError(
            f"gmwae_fast: double backward through {ctx.op_name} is not supported: its gradient is computed by a "
            "fused kernel with no derivative of its own. Differentiate the first-order gradient with the "
            "'reference' backend (plain PyTorch autograd) instead."
        )


def first_order_only(
    op_name: str, grads: Sequence[Optional[Tensor]], anchors: Sequence[Optional[Tensor]]
) -> tuple[Optional[Tensor], ...]:
    """``grads`` unchanged outside ``create_graph=True``; otherwise each tied to the ``anchors`` that require grad
    through a node that raises :class:`RuntimeError` on a second differentiation."""
    if not torch.is_grad_enabled():
        return tuple(grads)
    live = tuple(t for t in anchors if isinstance(t, Tensor) and t.requires_grad)
    if not live:
        return tuple(grads)
    return tuple(None if g is None else _NoSecondOrder.apply(g, op_name, *live) for g in grads)


def _forward_ad_active(tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether forward-mode AD sees any of ``tensors``: a ``torch.func.jvp`` transform is on the functorch stack,
    or a ``torch.autograd.forward_ad`` dual level is open and one of them carries a tangent."""
    stack = torch._C._functorch.peek_interpreter_stack()
    if stack is not None and stack.key() == torch._C._functorch.TransformType.Jvp:
        return True
    from torch.autograd import forward_ad

    if forward_ad._current_level < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def refuse_forward_ad(op_name: str, backend: str, tensors: Sequence[Optional[Tensor]]) -> None:
    """Raise :class:`RuntimeError` when forward-mode AD reaches a fused op: its kernels have no forward-mode
    formula, and without this check the tangent would come out as zero (``torch.func.jvp``) or ``None``
    (``forward_ad.make_dual``), silently."""
    if torch.compiler.is_compiling() or not _forward_ad_active(tensors):
        return
    raise RuntimeError(
        f"gmwae_fast.{op_name}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not implemented by "
        f"the fused {backend!r} backend; use backend='reference' (plain PyTorch, forward mode included) or "
        "reverse mode (backward / torch.func.grad / vjp)"
    )
