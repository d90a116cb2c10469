"""Multi-bandwidth inverse-multiquadratic MMD: the public functional :func:`fast_imq_mmd` and :class:`IMQMMDLoss`."""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import backends, reference
from ._common import (
    _REDUCTIONS,
    IMQMMDTerms,
    _check_pair,
    _check_weights,
    _real,
    _real_sequence,
    _resolve_bandwidths,
    cross_group_mass,
    difference_safe,
    kernel_bandwidths,
    pow2_normalised,
)
from .ops import imq_mmd as ops  # registers the ops (fake + autograd) at import: torch.compile works first
from .ops._autograd import first_order_only, refuse_forward_ad

__all__ = [
    "GAUJAC2019_SCALES",
    "PAPER_SCALES",
    "WAE_SCALES",
    "bandwidths_for",
    "fast_imq_mmd",
    "imq_mmd_terms",
    "IMQMMDTerms",
    "IMQMMDLoss",
]

#: The 7 scales of the original WAE code (Tolstikhin et al., 2018), which every WAE port we found uses: the default.
WAE_SCALES: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
#: The 15 scales ``{1, 2, 5} x 10^j``, ``j = -2..2`` of Gaujac, Feige and Barber (ACML 2019), ascending: the GM-WAE
#: trainer's set.
GAUJAC2019_SCALES: tuple[float, ...] = tuple(float(f"{m}e{j}") for j in range(-2, 3) for m in (1, 2, 5))
#: Alias of :data:`GAUJAC2019_SCALES` (the name before version 0.2).
PAPER_SCALES = GAUJAC2019_SCALES


def _num_groups(t: Tensor) -> int:
    return t.shape[0]


def _validate_values(
    x: Tensor, y: Tensor, xw: Optional[Tensor], yw: Optional[Tensor], unbiased: bool, compute: torch.dtype
) -> None:
    """Checks that need a device sync (``validate=True`` only). ``compute``: the dtype the kernels see the weights
    in (scaled so the largest is in [0.5, 1)); float64 for the reference backend."""
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
            seen = pow2_normalised(w.detach().reshape(-1).double()).to(compute).double()
            wg = seen.reshape(pts.shape[0], -1).sum(1)
            pairs = float(cross_group_mass(wg))
            if pairs <= 0.0:
                exact_pairs = float(cross_group_mass(w.detach().reshape(pts.shape[0], -1).sum(1).double()))
                rounded = (
                    ""
                    if exact_pairs <= 0
                    else (
                        f" once rounded to {compute} relative to the largest weight (every other group is below "
                        "2^-149 of it; use float64 inputs)"
                    )
                )
                raise ValueError(
                    f"{name} put all the mass in one group{rounded}: the unbiased self term is undefined (use "
                    "unbiased=False)"
                )
            _warn_ill_conditioned(name, pairs / float(wg.sum()) ** 2, compute)


def _warn_ill_conditioned(name: str, den: float, dtype: torch.dtype) -> None:
    """The unbiased self term divides by ``den = sum_{g != h} W_g W_h``; its weight gradient is a cancellation of
    parts of size ``2 / den``, so the compute dtype's rounding ``u`` costs ``~2 u / den`` of it: warn when that
    exceeds 1e-5 (float32: den < 0.012; e.g. one group holding all but 1e-6 of the mass: den ~ 2e-6)."""
    u = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps / 2
    if 2.0 * u / den > 1e-5:
        warnings.warn(
            f"gmwae_fast.fast_imq_mmd: {name} put nearly all the mass in one group (unbiased denominator "
            f"sum_(g != h) W_g W_h = {den:.2g}): the value stays accurate, but the weight gradient of the self term is "
            f"a cancellation of parts ~{2 / den:.2g} and may be off by ~{2 * u / den:.1g} in {dtype} "
            f"({'' if dtype == torch.float64 else 'use float64 inputs, or '}unbiased=False avoids it)",
            RuntimeWarning,
            stacklevel=4,
        )


#: The accuracy contract's constant: ``|error| <= 1e-5 |MMD2| + ACCURACY_C (u U + 2^-53 T)`` on every backend
#: (``docs/ARCHITECTURE.md``; the largest ratio measured is ~5, Triton on a tight cluster).
ACCURACY_C = 8.0


def accuracy_scales(terms: IMQMMDTerms, factors: Optional[Tensor] = None) -> tuple[float, float, float]:
    """``(MMD2, U, T)`` of the accuracy contract from a call's float64 terms: ``U = sum_s (U_xs + U_ys + 2 U_xys)``
    the normalised complement sums ``sum w w (1 - k_s)`` (each term is ``1 -`` its complement), ``T = sum_s
    (|self_x / den_x| + |self_y / den_y| + 2 |cross|)`` the terms the final float64 combination cancels."""
    sx, sy, cr = terms.self_x / terms.den_x, terms.self_y / terms.den_y, terms.cross
    f = torch.ones_like(sx) if factors is None else factors
    u = f * ((1.0 - sx).abs() + (1.0 - sy).abs() + 2.0 * (1.0 - cr).abs())
    t = f * (sx.abs() + sy.abs() + 2.0 * cr.abs())
    return float((f * (sx + sy - 2.0 * cr)).sum()), float(u.sum()), float(t.sum())


def _warn_outside_regime(c: "_Call") -> None:
    """``validate=True``: warn (:class:`RuntimeWarning`) when this input's MMD² is not within 1e-5 relative. The
    contract's absolute part ``8 u U`` is a worst case (correlated roundings); on most inputs the rounding errors
    of the pairs average out, so a float32 call is checked by measuring: the same values pass again on the inputs
    widened to float64 (exact), plus the float64 combination's own bound ``8 2^-53 T``."""
    with torch.no_grad():
        terms = _terms(c._replace(factors=None))
        f = None if c.factors is None else torch.tensor(c.factors, dtype=torch.float64, device=terms.self_x.device)
        mmd2, u_sum, t_sum = accuracy_scales(terms, f)
        error = ACCURACY_C * 2.0**-53 * (u_sum + t_sum)
        if torch.float64 not in (c.x.dtype, c.y.dtype):
            wide = c._replace(x=c.x.double(), y=c.y.double(), factors=None)
            mmd64 = accuracy_scales(_terms(wide), f)[0]
            error += abs(mmd2 - mmd64)
    if error > 1e-5 * abs(mmd2):
        cure = (
            "its bandwidths are so large against the data's spread that the float64 terms cancel: use smaller ones"
            if ACCURACY_C * 2.0**-53 * t_sum >= 1e-5 * abs(mmd2)
            else "MMD² is a small fraction of the complement sums U: float64 inputs are exact to ~1e-13 of U"
        )
        warnings.warn(
            f"gmwae_fast.fast_imq_mmd: MMD² = {mmd2:.3g} is not within 1e-5 relative on this input (error about "
            f"{error:.2g}; complement sums U = {u_sum:.3g}, terms T = {t_sum:.3g}; the contract is 1e-5 |MMD²| + "
            f"8 (u U + 2^-53 T)): {cure}",
            RuntimeWarning,
            stacklevel=3,
        )


class _Call(NamedTuple):
    """A checked call: inputs, the bandwidths the kernels see and the factor of each (``eps``), the backend."""

    x: Tensor
    y: Tensor
    xw: Optional[Tensor]
    yw: Optional[Tensor]
    bws: tuple[float, ...]
    factors: Optional[tuple[float, ...]]
    unbiased: bool
    backend: str
    out_dtype: torch.dtype


def _prepare(x, y, x_weights, y_weights, scales, sigma2, bandwidths, unbiased, backend, validate, eps) -> _Call:
    x, y = _check_pair(x, y)
    x_weights = _check_weights("x_weights", x_weights, x, "x")
    y_weights = _check_weights("y_weights", y_weights, y, "y")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if unbiased:
        for name, t in (("x", x), ("y", y)):
            if _num_groups(t) < 2:
                raise ValueError(
                    f"the unbiased estimate needs at least 2 groups of points in {name}, got "
                    f"{_num_groups(t)} (shape {tuple(t.shape)}); use unbiased=False"
                )
    out_dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    bws, factors = kernel_bandwidths(x.shape[-1], scales, sigma2, bandwidths, eps, compute)
    name = backends.select_backend(backend, x.device, "imq_mmd")
    if name != "reference":
        refuse_forward_ad("fast_imq_mmd", name, (x, y, x_weights, y_weights))
    if validate:
        _validate_values(x, y, x_weights, y_weights, unbiased, torch.float64 if name == "reference" else compute)
    return _Call(x, y, x_weights, y_weights, bws, factors, unbiased, name, out_dtype)


def fast_imq_mmd(
    x: Tensor,
    y: Tensor,
    x_weights: Optional[Tensor] = None,
    y_weights: Optional[Tensor] = None,
    *,
    scales: Sequence[float] = WAE_SCALES,
    sigma2: Union[float, Tensor] = 1.0,
    bandwidths: Optional[Sequence[float]] = None,
    unbiased: bool = True,
    reduction: str = "sum",
    eps: float = 0.0,
    backend: str = "auto",
    validate: bool = False,
    process_group: Optional["torch.distributed.ProcessGroup"] = None,
) -> Tensor:
    r"""Multi-bandwidth inverse-multiquadratic MMD² between two weighted samples, fused (no ``n x m`` matrix).

    .. math::

        k_s(a, b) = \frac{C_s}{C_s + \lVert a - b\rVert^2 + \varepsilon}, \qquad C_s = 2\,d\,\sigma^2 s,

        \mathrm{MMD}^2_s = \frac{\sum_{a \not\sim a'} W_a W_{a'} k_s(a, a')}{1 - \sum_g W_g^2}
                         + \frac{\sum_{b \not\sim b'} V_b V_{b'} k_s(b, b')}{1 - \sum_h V_h^2}
                         - 2 \sum_{a, b} W_a V_b k_s(a, b)

    where ``a ~ a'`` means "same group" (unbiased estimate; ``unbiased=False`` sums over all pairs, ``a = a'``
    included, without the division) and ``W``, ``V`` are the weights normalised to sum to 1 (in float64, so a weight
    vector of any scale is exact; in float32 a weight below 2^-126 of the largest loses bits, see Returns). With
    ``(n, d)`` inputs, no weights and ``scales=WAE_SCALES`` this is exactly the penalty of the original WAE code
    (U-statistic self terms over ``n (n - 1)`` pairs, cross term over ``n m``); ``WAE_SCALES`` is the default
    (since 0.2; before, the 15 :data:`GAUJAC2019_SCALES`, which the GM-WAE trainer passes). ``docs/migrating.md``
    maps other WAE codes onto these options.

    Args:
        x: ``(n, d)`` points, or ``(B, K, d)``: ``B`` groups of ``K`` points (e.g. the ``K`` per-mode encodings of
            one image; pairs inside a group are left out of the unbiased self term).
        y: ``(m, d)`` or ``(B', K', d)``, likewise (e.g. prior samples).
        x_weights: ``(n,)`` or ``(B, K)`` non-negative relative masses (default uniform); gradients flow to them.
        y_weights: likewise for ``y``.
        scales: bandwidth scales ``s`` (default :data:`WAE_SCALES`, the 7 of the original WAE code; the paper's 15:
            :data:`GAUJAC2019_SCALES`): a sequence of numbers.
        sigma2: the kernel constant ``sigma^2`` in ``C_s = 2 d sigma^2 s`` (a number or a one-element tensor, read
            once on the host). For a standard normal prior the WAE codes use 1; it is a kernel parameter, not
            necessarily the prior's variance.
        bandwidths: absolute ``C_s``; overrides ``scales`` and ``sigma2``. Every ``C_s`` (and ``C_s + eps``) must be
            finite, positive and a normal number of the compute dtype, else :class:`ValueError`.
        unbiased: U-statistic self terms (default) or the biased V-statistic.
        reduction: ``"sum"`` over bandwidths (a scalar, the WAE convention) or ``"none"`` (an ``(S,)`` vector).
        eps: ``>= 0`` added to every kernel denominator (some WAE codes add ``1e-9``); exact on every backend.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``
            (see :func:`gmwae_fast.available_backends`).
        validate: also run the checks that need a device sync (finite inputs, weights non-negative and not all
            zero), and warn (:class:`RuntimeWarning`) when weights leave nearly all the mass in one group, where
            the unbiased self term's weight gradient loses accuracy in float32, and when the result is not within
            1e-5 relative (the contract ``|error| <= 1e-5 |MMD2| + 8 (u U + 2^-53 T)`` of ``docs/ARCHITECTURE.md``;
            for float32 inputs checked by two more values passes, one in float64). Without it a NaN input gives a
            NaN result.
        process_group: a ``torch.distributed`` process group (e.g. ``torch.distributed.group.WORLD``): ``x``, ``y``
            and the weights are then this rank's shards (``(n_r, d)`` or ``(B_r, K, d)``; sizes may differ, an
            empty ``(0, d)`` shard is allowed) and every rank gets the MMD² of the union of all shards in rank
            order, exactly the single-process value on the concatenation (weights normalised globally, groups
            never span ranks). The backward gives each rank the gradient with respect to its *local* points and
            weights (the matching slice of the single-process gradient) with no communication. Cost per rank:
            one all-gather of the points and weights, one all-reduce of ``3 S`` float64 values,
            ``O(n_r N S)`` pair work, ``O(N d)`` memory. Collective: every rank must call it.
            **Under DistributedDataParallel**, which averages parameter gradients over the ``R`` ranks, use
            ``loss_r = (n_r / N) * R * recon_r + lam * R * mmd`` (``recon_r`` the mean over the local batch; with
            equal shards ``recon_r + lam * R * mmd``): the averaged parameter gradients then equal those of
            ``recon + lam * mmd`` on the global batch in one process. See :mod:`gmwae_fast.distributed`.

    Returns:
        A float32 scalar (or ``(S,)`` vector) for float32/float16/bfloat16 inputs, float64 for float64 inputs.
        Sums are accumulated in float64 inside the kernels. Accuracy (every backend, ``docs/ARCHITECTURE.md``):
        ``|error| <= 1e-5 |MMD2| + 8 (u U + 2^-53 T)``, ``u`` the compute dtype's unit roundoff (2^-24 for float32
        inputs), ``U`` the normalised complement sums ``sum w w (1 - k)`` of the three terms, ``T`` (~4 per
        bandwidth) the terms the float64 combination cancels; so 1e-5 relative whenever MMD² is not a tiny
        fraction of ``U`` (tight clusters, bandwidths far above the data's spread). The fused kernels see the
        weights in the compute dtype, scaled so the largest is in [0.5, 1): in float32 a weight below 2^-126 of
        the largest loses bits (``validate=True`` reports when that changes the result). Gradients are first
        order: differentiating them again raises :class:`RuntimeError` on the fused backends (use
        ``backend="reference"`` for second derivatives).

    Example::

        >>> z = encoder(images)                      # (n, d) codes, requires grad
        >>> prior = torch.randn_like(z)
        >>> loss = recon + lam * gmwae_fast.fast_imq_mmd(z, prior)
        >>> # GM-WAE: K modes per image weighted by q(k|x)
        >>> z, pi = gmwae_fast.gm_reparameterize(mu, sigma_raw, logits)    # (B, K, d), (B, K)
        >>> mmd = gmwae_fast.fast_imq_mmd(z, prior_samples, x_weights=pi)
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {_REDUCTIONS}")
    if process_group is not None:
        from .distributed import distributed_imq_mmd

        return distributed_imq_mmd(
            x,
            y,
            x_weights,
            y_weights,
            process_group=process_group,
            scales=scales,
            sigma2=sigma2,
            bandwidths=bandwidths,
            unbiased=unbiased,
            reduction=reduction,
            eps=eps,
            backend=backend,
            validate=validate,
        )
    c = _prepare(x, y, x_weights, y_weights, scales, sigma2, bandwidths, unbiased, backend, validate, eps)
    if validate:
        _warn_outside_regime(c)
    grad_on = torch.is_grad_enabled()
    x_grad = grad_on and any(t is not None and t.requires_grad for t in (c.x, c.xw))
    y_grad = grad_on and any(t is not None and t.requires_grad for t in (c.y, c.yw))
    if c.backend != "reference" and reduction == "sum" and (x_grad or y_grad):
        if _one_node_ok(c):
            return _OneNodeTotal.apply(c.x, c.y, c, x_grad, y_grad)
        return _fused_total(c, x_grad, y_grad).to(c.out_dtype)
    mmd = _terms(c).mmd()
    return (mmd.sum() if reduction == "sum" else mmd).to(c.out_dtype)


def imq_mmd_terms(
    x: Tensor,
    y: Tensor,
    x_weights: Optional[Tensor] = None,
    y_weights: Optional[Tensor] = None,
    *,
    scales: Sequence[float] = WAE_SCALES,
    sigma2: Union[float, Tensor] = 1.0,
    bandwidths: Optional[Sequence[float]] = None,
    unbiased: bool = True,
    eps: float = 0.0,
    backend: str = "auto",
    validate: bool = False,
) -> IMQMMDTerms:
    r"""The pieces of :func:`fast_imq_mmd` per bandwidth, to rebuild other estimators from the same fused sums.

    Returns :class:`IMQMMDTerms` ``(self_x, self_y, cross, den_x, den_y)``, float64 and differentiable (points
    and weights): three ``(S,)`` sums and two 0-d denominators, with the weights normalised to sum to 1:
    ``self_x = sum_{a !~ a'} W_a W_a' k_s(a, a')`` (ordered pairs; all pairs when ``unbiased=False``),
    ``cross = sum_{a, b} W_a V_b k_s(a, b)``, ``den_x = 1 - sum_g W_g^2`` (1 when biased), and
    ``terms.mmd()`` equals ``fast_imq_mmd(..., reduction="none")``. Options as in :func:`fast_imq_mmd`.

    Example (an estimator whose cross term leaves out the pairs ``(x_i, y_i)``, as some WAE codes do)::

        >>> t = gmwae_fast.imq_mmd_terms(z, prior, scales=gmwae_fast.WAE_SCALES)      # (n, d), (n, d)
        >>> c = torch.tensor(gmwae_fast.bandwidths_for(z, gmwae_fast.WAE_SCALES), dtype=torch.float64)
        >>> diag = (c / (c + ((z - prior) ** 2).sum(1, keepdim=True).double())).sum(0)   # (S,), O(n d)
        >>> n = z.shape[0]
        >>> cross_offdiag = (t.cross * n * n - diag) / (n * (n - 1))
        >>> penalty = (t.self_x / t.den_x + t.self_y / t.den_y - 2 * cross_offdiag).sum()
    """
    c = _prepare(x, y, x_weights, y_weights, scales, sigma2, bandwidths, unbiased, backend, validate, eps)
    if validate:
        _warn_outside_regime(c)
    return _terms(c)


def bandwidths_for(x: Tensor, scales: Sequence[float] = WAE_SCALES, sigma2: float = 1.0) -> tuple[float, ...]:
    """The absolute bandwidths ``C_s = 2 d sigma2 s`` that :func:`fast_imq_mmd` uses for points ``x`` (``d`` is
    ``x.shape[-1]``)."""
    return _resolve_bandwidths(x.shape[-1], scales, sigma2, None)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation. Weights reach the kernels unnormalised (scaled by an exact power of two so the largest is in
# [0.5, 1)); the normalisation 1 / (sum w)^2 and the unbiased denominators are applied here in float64 to the
# same rounded weights the kernels used, so the result is the exact MMD of those weights.
# ---------------------------------------------------------------------------------------------------------------


class _Side(NamedTuple):
    pts: Tensor
    w: Tensor  # unnormalised weights in the compute dtype
    group: int
    total: Union[Tensor, float]  # sum of w (float64)
    pairs: Union[Tensor, float]  # what divides a raw self sum: sum_{g != h} w_g w_h (unbiased) or total^2 (float64)


def _side(t: Tensor, w: Optional[Tensor], pts_dtype: torch.dtype, w_dtype: torch.dtype, unbiased: bool) -> _Side:
    group = 1 if t.dim() == 2 else t.shape[1]
    pts = difference_safe(t.reshape(-1, t.shape[-1]).to(pts_dtype)).contiguous()
    n = pts.shape[0]
    if w is None:  # ones: the sums are exact integers
        pairs = float(n * n - n * group) if unbiased else float(n * n)
        return _Side(pts, torch.ones(n, dtype=w_dtype, device=t.device), group, float(n), pairs)
    flat = pow2_normalised(w.reshape(-1).to(torch.float64)).to(w_dtype).contiguous()
    w64 = flat.to(torch.float64)
    total = w64.sum()
    pairs = cross_group_mass(w64.view(-1, group).sum(1)) if unbiased else total * total
    return _Side(pts, flat, group, total, pairs)


def _consts(vals: tuple[float, ...], device: torch.device) -> Tensor:
    """A float64 tensor of ``vals`` on ``device``; cached per device for CUDA so that a call makes no host-to-device
    copy (a blocking copy from pageable memory) after the first one."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return torch.tensor(vals, dtype=torch.float64, device=device)
    return _cuda_consts(vals, str(device))


@functools.lru_cache(maxsize=256)
def _cuda_consts(vals: tuple[float, ...], device: str) -> Tensor:
    return torch.tensor(vals, dtype=torch.float64, device=device)


def _sides(c: _Call) -> tuple[_Side, _Side]:
    # float16/bfloat16 points are widened here: the math is float32 anyway, and the kernels then return float32
    # gradients, which autograd sums (self + cross terms) before one rounding to the input dtype.
    dtype = torch.float64 if torch.float64 in (c.x.dtype, c.y.dtype) else torch.float32
    return (_side(c.x, c.xw, dtype, dtype, c.unbiased), _side(c.y, c.yw, dtype, dtype, c.unbiased))


def _terms(c: _Call) -> IMQMMDTerms:
    if c.backend == "reference":
        terms = reference.imq_terms_reference(c.x, c.y, c.xw, c.yw, bandwidths=c.bws, unbiased=c.unbiased)
    else:
        op = ops.op_set(c.backend)
        a, b = _sides(c)
        bw = _consts(c.bws, c.x.device)
        one = torch.ones((), dtype=torch.float64, device=c.x.device)
        den = (lambda s: s.pairs / (s.total * s.total) * one) if c.unbiased else (lambda s: one)
        terms = IMQMMDTerms(
            op.self_values(a.pts, a.w, bw, a.group, c.unbiased) / (a.total * a.total),
            op.self_values(b.pts, b.w, bw, b.group, c.unbiased) / (b.total * b.total),
            op.cross_values(a.pts, a.w, b.pts, b.w, bw) / (a.total * b.total),
            den(a),
            den(b),
        )
    if c.factors is None:
        return terms
    f = _consts(c.factors, c.x.device)
    return terms._replace(self_x=terms.self_x * f, self_y=terms.self_y * f, cross=terms.cross * f)


def _fused_total(c: _Call, x_grad: bool, y_grad: bool) -> Tensor:
    """``reduction="sum"`` with a gradient: one fused value+gradient pass per term. A side that needs no gradient
    (the prior samples of a WAE) gets the cheaper values-only self pass."""
    op = ops.op_set(c.backend)
    a, b = _sides(c)
    bw = _consts(c.bws, c.x.device)
    h = _consts(c.factors or (1.0,) * len(c.bws), c.x.device)

    def self_sum(s: _Side, grad: bool) -> Tensor:
        if grad:
            return ops.self_total(h, s.pts, s.w, bw, s.group, c.unbiased, c.backend)
        return (h * op.self_values(s.pts, s.w, bw, s.group, c.unbiased)).sum()

    if x_grad:
        sxy = ops.cross_total(h, a.pts, a.w, b.pts, b.w, bw, c.backend, y_grad)
    else:  # cross is symmetric: put the side that needs a gradient in the rows
        sxy = ops.cross_total(h, b.pts, b.w, a.pts, a.w, bw, c.backend, False)
    return self_sum(a, x_grad) / a.pairs + self_sum(b, y_grad) / b.pairs - 2.0 * sxy / (a.total * b.total)


def _one_node_ok(c: _Call) -> bool:
    """Whether :class:`_OneNodeTotal` may run the call: eager mode (torch.compile traces the custom ops), outside
    torch.func transforms, and no weights: the folded factors ``h / pairs`` are then at most 1 (with weights, a
    subnormal pair mass made them overflow the float32 factors of the kernels; and a weight gradient needs the
    normalisation's own)."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return c.xw is None and c.yw is None


def _point_grad(g: Optional[Tensor], t: Tensor, pts_dtype: torch.dtype) -> Optional[Tensor]:
    """The kernels' gradient of the (flattened, widened, clamped) points as the gradient of ``t``: its shape and
    dtype, 0 on entries the clamp of :func:`difference_safe` changed (the clamp's own gradient)."""
    if g is None:
        return None
    g = g.view(t.shape).to(t.dtype)
    half = torch.finfo(pts_dtype).max / 2
    return torch.where(t.detach().abs() <= half, g, torch.zeros((), dtype=g.dtype, device=g.device))


class _OneNodeTotal(torch.autograd.Function):
    """``reduction="sum"`` of an eager unweighted call, as one autograd node: the same fused
    value+gradient passes as :func:`_fused_total`, with the normalisation folded into the per-bandwidth factors
    ``h`` of each pass, so that the backward is one scaling instead of ~10 nodes of scalar arithmetic, clamps and
    casts (which cost a small call more than its kernels: n = 64, d = 8 spent ~250 us in them)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, c: _Call, x_grad: bool, y_grad: bool) -> Tensor:
        op = ops.op_set(c.backend)
        a, b = _sides(c)
        bw = _consts(c.bws, c.x.device)
        h = _consts(c.factors or (1.0,) * len(c.bws), c.x.device)
        hx, hy, hxy = h / a.pairs, h / b.pairs, h * (-2.0 / (a.total * b.total))
        total, ga, gb = None, None, None
        for s, hs, grad in ((a, hx, x_grad), (b, hy, y_grad)):
            if grad:
                vals, g, _ = op.self_grad(hs, s.pts, s.w, bw, s.group, c.unbiased)
                ga, gb = (g, gb) if s is a else (ga, g)
            else:
                vals = op.self_values(s.pts, s.w, bw, s.group, c.unbiased)
            total = (hs * vals).sum() if total is None else total + (hs * vals).sum()
        if x_grad:
            vals, da, _, db, _ = op.cross_grad(hxy, a.pts, a.w, b.pts, b.w, bw, y_grad)
            ga, gb = ga + da, (gb + db if y_grad else None)
        else:  # cross is symmetric: put the side that needs a gradient in the rows
            vals, db, *_ = op.cross_grad(hxy, b.pts, b.w, a.pts, a.w, bw, False)
            gb = gb + db
        ctx.save_for_backward(*(g for g in (ga, gb) if g is not None), x, y)
        ctx.pts_dtype, ctx.x_grad, ctx.y_grad = a.pts.dtype, x_grad, y_grad
        return (total + (hxy * vals).sum()).to(c.out_dtype)

    @staticmethod
    def backward(ctx, g_total: Tensor):
        *gs, x, y = ctx.saved_tensors
        ga = gs.pop(0) if ctx.x_grad else None
        gb = gs.pop(0) if ctx.y_grad else None
        grads = tuple(None if g is None else g_total.to(g.dtype) * g for g in (ga, gb))
        grads = first_order_only("fast_imq_mmd", grads, (g_total, x, y))
        return _point_grad(grads[0], x, ctx.pts_dtype), _point_grad(grads[1], y, ctx.pts_dtype), None, None, None


class IMQMMDLoss(nn.Module):
    """:func:`fast_imq_mmd` as a module; the keyword options are fixed at construction.

    Example::

        >>> loss_fn = gmwae_fast.IMQMMDLoss(scales=gmwae_fast.WAE_SCALES, sigma2=1.0)
        >>> penalty = loss_fn(z, prior_samples)                 # (n, d), (m, d) -> scalar
        >>> penalty = loss_fn(z_modes, prior_samples, pi)       # (B, K, d) with weights (B, K)
        >>> global_fn = gmwae_fast.IMQMMDLoss(process_group=torch.distributed.group.WORLD)
        >>> penalty = global_fn(z_local, prior_local)           # MMD² of the union of every rank's shards
    """

    def __init__(
        self,
        *,
        scales: Sequence[float] = WAE_SCALES,
        sigma2: Union[float, Tensor] = 1.0,
        bandwidths: Optional[Sequence[float]] = None,
        unbiased: bool = True,
        reduction: str = "sum",
        eps: float = 0.0,
        backend: str = "auto",
        validate: bool = False,
        process_group: Optional["torch.distributed.ProcessGroup"] = None,
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected one of {_REDUCTIONS}")
        self.scales = _real_sequence("scales", scales)
        self.sigma2 = _real("sigma2", sigma2)
        self.bandwidths = None if bandwidths is None else _real_sequence("bandwidths", bandwidths)
        self.eps = _real("eps", eps)
        self.unbiased = unbiased
        self.reduction = reduction
        self.backend = backend
        self.validate = validate
        self.process_group = process_group

    def forward(
        self, x: Tensor, y: Tensor, x_weights: Optional[Tensor] = None, y_weights: Optional[Tensor] = None
    ) -> Tensor:
        return fast_imq_mmd(
            x,
            y,
            x_weights,
            y_weights,
            scales=self.scales,
            sigma2=self.sigma2,
            bandwidths=self.bandwidths,
            unbiased=self.unbiased,
            reduction=self.reduction,
            eps=self.eps,
            backend=self.backend,
            validate=self.validate,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        bw = f"bandwidths={self.bandwidths}" if self.bandwidths else f"scales={len(self.scales)}, sigma2={self.sigma2}"
        return f"{bw}, unbiased={self.unbiased}, reduction={self.reduction!r}, backend={self.backend!r}"
