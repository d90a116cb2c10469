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

__all__ = ["first_order_only"]


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
