"""Multi-bandwidth inverse-multiquadratic MMD: the public functional :func:`fast_imq_mmd` and :class:`IMQMMDLoss`."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import backends, reference

__all__ = ["PAPER_SCALES", "WAE_SCALES", "fast_imq_mmd", "IMQMMDLoss"]

#: The 15 scales ``{1, 2, 5} x 10^j``, ``j = -2..2`` of Gaujac et al. (2019), ascending.
PAPER_SCALES: tuple[float, ...] = tuple(float(f"{m}e{j}") for j in range(-2, 3) for m in (1, 2, 5))
#: The 7 scales of the original WAE code (Tolstikhin et al., 2018).
WAE_SCALES: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

_REDUCTIONS = ("sum", "none")


def _check_points(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape (n, d) or (B, K, d), got {tuple(t.shape)} ({t.dim()} dims)")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    return t


def _check_weights(name: str, w: object, pts: Tensor, pts_name: str) -> Optional[Tensor]:
    if w is None:
        return None
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {w.dtype}")
    if tuple(w.shape) != tuple(pts.shape[:-1]):
        raise ValueError(f"{name} must have the leading shape of {pts_name}, {tuple(pts.shape[:-1])}, "
                         f"got {tuple(w.shape)}")
    if w.device != pts.device:
        raise ValueError(f"{name} is on {w.device} but {pts_name} is on {pts.device}")
    return w


def _resolve_bandwidths(d: int, scales: Sequence[float], sigma2: float,
                        bandwidths: Optional[Sequence[float]]) -> tuple[float, ...]:
    if bandwidths is not None:
        if isinstance(bandwidths, Tensor):
            bandwidths = bandwidths.detach().reshape(-1).tolist()
        vals = tuple(float(c) for c in bandwidths)
        if not vals:
            raise ValueError("bandwidths is empty: give at least one bandwidth C_s > 0")
        bad = [c for c in vals if not (c > 0 and c != float("inf"))]
        if bad:
            raise ValueError(f"every bandwidth must be positive and finite, got {bad}")
        return vals
    if isinstance(scales, Tensor):
        scales = scales.detach().reshape(-1).tolist()
    scales = tuple(float(s) for s in scales)
    if not scales:
        raise ValueError("scales is empty: give at least one scale (e.g. gmwae_fast.PAPER_SCALES)")
    bad = [s for s in scales if not (s > 0 and s != float("inf"))]
    if bad:
        raise ValueError(f"every scale must be positive and finite, got {bad}")
    if not isinstance(sigma2, numbers.Real) or not (sigma2 > 0 and sigma2 != float("inf")):
        raise ValueError(f"sigma2 must be a positive finite number, got {sigma2!r}")
    return tuple(reference.bandwidths_for(d, scales, float(sigma2)))


def _num_groups(t: Tensor) -> int:
    return t.shape[0]


def _validate_values(x: Tensor, y: Tensor, xw: Optional[Tensor], yw: Optional[Tensor], unbiased: bool) -> None:
    """Checks that need a device sync (``validate=True`` only)."""
    for name, t in (("x", x), ("y", y)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf values")
    for name, w, pts in (("x_weights", xw, x), ("y_weights", yw, y)):
        if w is None:
            continue
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{name} contains NaN or Inf values")
        if bool((w < 0).any()):
            raise ValueError(f"{name} has negative entries; weights are relative masses and must be >= 0")
        if not bool((w > 0).any()):
            raise ValueError(f"{name} are all zero; at least one point needs positive mass")
        if unbiased:
            wg = w.reshape(pts.shape[0], -1).sum(1).double()
            if float(((wg / wg.sum()) ** 2).sum()) >= 1.0:
                raise ValueError(f"{name} put all the mass in one group: the unbiased self term is undefined "
                                 "(use unbiased=False)")


def fast_imq_mmd(x: Tensor, y: Tensor, x_weights: Optional[Tensor] = None, y_weights: Optional[Tensor] = None, *,
                 scales: Sequence[float] = PAPER_SCALES, sigma2: float = 1.0,
                 bandwidths: Optional[Sequence[float]] = None, unbiased: bool = True, reduction: str = "sum",
                 backend: str = "auto", validate: bool = False) -> Tensor:
    r"""Multi-bandwidth inverse-multiquadratic MMD² between two weighted samples, fused (no ``n x m`` matrix).

    .. math::

        k(a, b) = \sum_s \frac{C_s}{C_s + \lVert a - b\rVert^2}, \qquad C_s = 2\,d\,\sigma^2 s,

        \mathrm{MMD}^2_s = \frac{\sum_{a \not\sim a'} w_a w_{a'} k_s(a, a')}{1 - \sum_g W_g^2}
                         + \frac{\sum_{b \not\sim b'} v_b v_{b'} k_s(b, b')}{1 - \sum_h V_h^2}
                         - 2 \sum_{a, b} w_a v_b k_s(a, b)

    where ``a ~ a'`` means "same group" (unbiased estimate; ``unbiased=False`` sums over all pairs, ``a = a'``
    included, without the division) and the weights are normalised to sum to 1. With ``(n, d)`` inputs and no
    weights this is exactly the penalty of the original WAE code (U-statistic self terms over ``n (n - 1)``
    pairs, cross term over ``n m``).

    Args:
        x: ``(n, d)`` points, or ``(B, K, d)``: ``B`` groups of ``K`` points (e.g. the ``K`` per-mode encodings of
            one image; pairs inside a group are left out of the unbiased self term).
        y: ``(m, d)`` or ``(B', K', d)``, likewise (e.g. prior samples).
        x_weights: ``(n,)`` or ``(B, K)`` non-negative relative masses (default uniform); gradients flow to them.
        y_weights: likewise for ``y``.
        scales: bandwidth scales ``s`` (default :data:`PAPER_SCALES`, 15 values).
        sigma2: prior variance ``sigma^2`` in ``C_s = 2 d sigma^2 s``.
        bandwidths: absolute ``C_s``; overrides ``scales`` and ``sigma2``.
        unbiased: U-statistic self terms (default) or the biased V-statistic.
        reduction: ``"sum"`` over bandwidths (a scalar, the WAE convention) or ``"none"`` (an ``(S,)`` vector).
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``
            (see :func:`gmwae_fast.available_backends`).
        validate: also run the checks that need a device sync (finite inputs, weights non-negative and not all
            zero). Without it a NaN input gives a NaN result.

    Returns:
        A float32 scalar (or ``(S,)`` vector) for float32/float16/bfloat16 inputs, float64 for float64 inputs.
        Sums are accumulated in float64 inside the kernels, so float32 inputs are accurate to ~1e-6 relative
        even when MMD² is near zero.

    Example::

        >>> z = encoder(images)                      # (n, d) codes, requires grad
        >>> prior = torch.randn_like(z)
        >>> loss = recon + lam * gmwae_fast.fast_imq_mmd(z, prior)
        >>> # GM-WAE: K modes per image weighted by q(k|x)
        >>> z, pi = gmwae_fast.gm_reparameterize(mu, sigma_raw, logits)    # (B, K, d), (B, K)
        >>> mmd = gmwae_fast.fast_imq_mmd(z, prior_samples, x_weights=pi)
    """
    x = _check_points("x", x)
    y = _check_points("y", y)
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x and y must have the same feature dimension d, got {x.shape[-1]} and {y.shape[-1]}")
    if x.device != y.device:
        raise ValueError(f"x is on {x.device} but y is on {y.device}; put both on one device")
    x_weights = _check_weights("x_weights", x_weights, x, "x")
    y_weights = _check_weights("y_weights", y_weights, y, "y")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {_REDUCTIONS}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if unbiased:
        for name, t in (("x", x), ("y", y)):
            if _num_groups(t) < 2:
                raise ValueError(f"the unbiased estimate needs at least 2 groups of points in {name}, got "
                                 f"{_num_groups(t)} (shape {tuple(t.shape)}); use unbiased=False")
    d = x.shape[-1]
    bws = _resolve_bandwidths(d, scales, sigma2, bandwidths)
    name = backends.resolve_backend(backend, x.device)
    if validate:
        _validate_values(x, y, x_weights, y_weights, unbiased)

    out_dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    if name == "reference":
        return reference.imq_mmd_reference(x, y, x_weights, y_weights, bandwidths=bws, unbiased=unbiased,
                                           reduction=reduction).to(out_dtype)
    return _fused(x, y, x_weights, y_weights, bws, unbiased, reduction, name, out_dtype)


def _flatten(t: Tensor, w: Optional[Tensor], pts_dtype: torch.dtype, w_dtype: torch.dtype):
    group = 1 if t.dim() == 2 else t.shape[1]
    pts = t.reshape(-1, t.shape[-1]).to(pts_dtype).contiguous()
    if w is None:
        flat = torch.full((pts.shape[0],), 1.0 / pts.shape[0], dtype=w_dtype, device=t.device)
    else:
        flat = w.reshape(-1).to(w_dtype)
        flat = (flat / flat.sum()).contiguous()
    return pts, flat, group


def _den(w: Tensor, group: int, unbiased: bool) -> Union[Tensor, float]:
    if not unbiased:
        return 1.0
    return 1.0 - (w.to(torch.float64).view(-1, group).sum(1) ** 2).sum()


def _fused(x, y, xw, yw, bws, unbiased, reduction, name, out_dtype) -> Tensor:
    from .ops import imq_mmd as ops

    pts_dtype = torch.promote_types(x.dtype, y.dtype)  # float16 with bfloat16 promotes to float32
    w_dtype = torch.float64 if pts_dtype == torch.float64 else torch.float32
    a, wa, ga = _flatten(x, xw, pts_dtype, w_dtype)
    b, wb, gb = _flatten(y, yw, pts_dtype, w_dtype)
    bw = torch.tensor(bws, dtype=torch.float64, device=x.device)

    op = ops.op_set(name)
    grad_on = torch.is_grad_enabled()
    x_grad = grad_on and any(t is not None and t.requires_grad for t in (x, xw))
    y_grad = grad_on and any(t is not None and t.requires_grad for t in (y, yw))
    if reduction == "sum" and (x_grad or y_grad):
        # One fused pass per term computes the value and the gradient of the sum over bandwidths.  A side that
        # needs no gradient (the prior samples of a WAE) gets the cheaper values-only self pass.
        sxx = ops.imq_self_total(a, wa, bw, ga, unbiased, name)[0] if x_grad else \
            op.self_values(a, wa, bw, ga, unbiased).sum()
        syy = ops.imq_self_total(b, wb, bw, gb, unbiased, name)[0] if y_grad else \
            op.self_values(b, wb, bw, gb, unbiased).sum()
        if x_grad:
            sxy = ops.imq_cross_total(a, wa, b, wb, bw, name, y_grad)[0]
        else:  # cross is symmetric: put the side that needs a gradient in the rows
            sxy = ops.imq_cross_total(b, wb, a, wa, bw, name, False)[0]
    else:
        sxx = op.self_values(a, wa, bw, ga, unbiased)
        syy = op.self_values(b, wb, bw, gb, unbiased)
        sxy = op.cross_values(a, wa, b, wb, bw)
    mmd = sxx / _den(wa, ga, unbiased) + syy / _den(wb, gb, unbiased) - 2.0 * sxy
    if reduction == "sum" and mmd.dim() > 0:
        mmd = mmd.sum()
    return mmd.to(out_dtype)


class IMQMMDLoss(nn.Module):
    """:func:`fast_imq_mmd` as a module; the keyword options are fixed at construction.

    Example::

        >>> loss_fn = gmwae_fast.IMQMMDLoss(scales=gmwae_fast.WAE_SCALES, sigma2=1.0)
        >>> penalty = loss_fn(z, prior_samples)                 # (n, d), (m, d) -> scalar
        >>> penalty = loss_fn(z_modes, prior_samples, pi)       # (B, K, d) with weights (B, K)
    """

    def __init__(self, *, scales: Sequence[float] = PAPER_SCALES, sigma2: float = 1.0,
                 bandwidths: Optional[Sequence[float]] = None, unbiased: bool = True, reduction: str = "sum",
                 backend: str = "auto", validate: bool = False) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected one of {_REDUCTIONS}")
        self.scales = tuple(float(s) for s in scales)
        self.sigma2 = sigma2
        self.bandwidths = None if bandwidths is None else tuple(float(c) for c in bandwidths)
        self.unbiased = unbiased
        self.reduction = reduction
        self.backend = backend
        self.validate = validate

    def forward(self, x: Tensor, y: Tensor, x_weights: Optional[Tensor] = None,
                y_weights: Optional[Tensor] = None) -> Tensor:
        return fast_imq_mmd(x, y, x_weights, y_weights, scales=self.scales, sigma2=self.sigma2,
                            bandwidths=self.bandwidths, unbiased=self.unbiased, reduction=self.reduction,
                            backend=self.backend, validate=self.validate)

    def extra_repr(self) -> str:
        bw = f"bandwidths={self.bandwidths}" if self.bandwidths else f"scales={len(self.scales)}, sigma2={self.sigma2}"
        return f"{bw}, unbiased={self.unbiased}, reduction={self.reduction!r}, backend={self.backend!r}"
