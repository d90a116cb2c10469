"""One MMD entry point for several kernels: :func:`mmd2` and :class:`MMDLoss`.

``kernel="imq"`` is :func:`gmwae_fast.fast_imq_mmd` (fused kernels, every backend). ``kernel="gaussian"``,
``k(a, b) = sum_s exp(-|a - b|^2 / C_s)``, runs today on a tiled PyTorch path (``backend="tiled"``): tiles of at
most ``2^22`` pair-coordinates in the forward and again in a hand-written backward, so neither holds an ``n x m``
matrix (memory ``O((n + m) d)`` plus one tile), sums in float64 in complement form (``1 - k = -expm1(-D / C)``: the
self terms do not cancel at large bandwidths), gradients of points, weights and bandwidths (first order). Fused Gaussian
kernels (cpu, triton, cuda) are the next step; they will be checked against this.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._common import _REDUCTIONS, _check_pair, _check_weights, _resolve_bandwidths, cross_group_mass
from .mmd import WAE_SCALES, _validate_values, fast_imq_mmd
from .ops._autograd import first_order_only

__all__ = ["KERNELS", "ESTIMATORS", "mmd2", "MMDLoss"]

#: The kernels :func:`mmd2` serves.
KERNELS = ("imq", "gaussian")

_TILE = 1 << 22  # pair-coordinates per tile (float64: 32 MiB of differences)


def _tiles(n: int, m: int, width: int):
    """Row and column slices of tiles of at most ``_TILE`` entries of ``(rows, cols, width)``, ``width = max(d, S)``."""
    width = max(1, width)
    rows = max(1, min(n, int((_TILE // width) ** 0.5)))
    cols = max(1, min(m, _TILE // (width * rows)))
    for i0 in range(0, n, rows):
        for j0 in range(0, m, cols):
            yield slice(i0, i0 + rows), slice(j0, j0 + cols)


def _tile_parts(a, ga, wa, b, gb, wb, bws, self_term):
    """One tile's differences ``(I, J, d)``, distances, pair weights (same-group pairs of a self term zeroed) and
    ``exp(-D / C_s)`` ``(I, J, S)``, float64."""
    diff = a[:, None, :] - b[None, :, :]
    dist = diff.pow(2).sum(-1)
    pw = wa[:, None] * wb[None, :]
    if self_term:
        pw = pw * (ga[:, None] != gb[None, :])
    return diff, dist, pw


class _TiledComplement(torch.autograd.Function):
    """``(S,)`` ``sum_ij wa_i wb_j (1 - exp(-|a_i - b_j|^2 / C_s))`` over tiles, with a tiled backward (nothing of
    size ``n x m`` is kept). ``1 - k = -expm1(-D / C)``: no cancellation."""

    @staticmethod
    def forward(ctx, a, ga, wa, b, gb, wb, bws, self_term):
        total = torch.zeros_like(bws)
        for I, J in _tiles(a.shape[0], b.shape[0], max(a.shape[1], bws.numel())):
            _, dist, pw = _tile_parts(a[I], ga[I], wa[I], b[J], gb[J], wb[J], bws, self_term)
            total += (pw[..., None] * -torch.expm1(-dist[..., None] / bws)).sum((0, 1))
        ctx.save_for_backward(a, ga, wa, b, gb, wb, bws)
        ctx.self_term = self_term
        return total

    @staticmethod
    def backward(ctx, g):
        a, ga, wa, b, gb, wb, bws = ctx.saved_tensors
        da, dwa, db, dwb = torch.zeros_like(a), torch.zeros_like(wa), torch.zeros_like(b), torch.zeros_like(wb)
        dbw = torch.zeros_like(bws)
        for I, J in _tiles(a.shape[0], b.shape[0], max(a.shape[1], bws.numel())):
            diff, dist, pw = _tile_parts(a[I], ga[I], wa[I], b[J], gb[J], wb[J], bws, ctx.self_term)
            keep = (ga[I][:, None] != gb[J][None, :]) if ctx.self_term else torch.ones_like(dist)
            e = torch.exp(-dist[..., None] / bws)
            phi = ((-torch.expm1(-dist[..., None] / bws)) * g).sum(-1)  # sum_s g_s (1 - k_s)
            psi = (e * (g / bws)).sum(-1)  # d phi / dD
            pull = (2.0 * pw * psi)[..., None] * diff  # d/da_i of pw phi(D) = 2 pw psi (a_i - b_j)
            da[I] += pull.sum(1)
            db[J] -= pull.sum(0)
            dwa[I] += (keep * wb[J][None, :] * phi).sum(1)
            dwb[J] += (keep * wa[I][:, None] * phi).sum(0)
            if ctx.needs_input_grad[6]:  # d(1 - k_s)/dC_s = -(D / C_s) exp(-D / C_s) / C_s (no C_s^2: underflow)
                dbw -= g * (pw[..., None] * e * (dist[..., None] / bws)).sum((0, 1)) / bws
        grads = first_order_only("mmd2(kernel='gaussian')", (da, dwa, db, dwb, dbw), (g, a, wa, b, wb, bws))
        return grads[0], None, grads[1], grads[2], None, grads[3], grads[4], None


def _tiled(a, ga, wa, b, gb, wb, bws, self_term):
    return _TiledComplement.apply(a, ga, wa, b, gb, wb, bws, self_term)


def _side(t: Tensor, w: Optional[Tensor], unbiased: bool):
    group = 1 if t.dim() == 2 else t.shape[1]
    pts = t.reshape(-1, t.shape[-1]).to(torch.float64)
    ids = torch.arange(pts.shape[0], device=t.device) // group
    if w is None:
        w = torch.ones(pts.shape[0], dtype=torch.float64, device=t.device)
    w = w.reshape(-1).to(torch.float64)
    w = w / w.sum()
    den = cross_group_mass(w.view(-1, group).sum(1)) if unbiased else torch.ones((), dtype=torch.float64)
    return pts, ids, w, den


def _gaussian(x, y, xw, yw, bws: Tensor, unbiased: bool) -> Tensor:
    """``(S,)`` Gaussian MMD² in complement form: ``2 U_xy - U_xx / den_x - U_yy / den_y``."""
    a, ga, wa, dx = _side(x, xw, unbiased)
    b, gb, wb, dy = _side(y, yw, unbiased)
    uxx = _tiled(a, ga, wa, a, ga, wa, bws, unbiased)
    uyy = _tiled(b, gb, wb, b, gb, wb, bws, unbiased)
    uxy = _tiled(a, ga, wa, b, gb, wb, bws, False)
    return 2.0 * uxy - uxx / dx - uyy / dy


def _kernel_values(kernel: str, p: Tensor, q: Tensor, bws: Tensor) -> Tensor:
    """``(rows, S)`` ``k_s(p_i, q_i)`` of matched rows, float64, differences formed directly."""
    dist = (p - q).pow(2).sum(-1, keepdim=True)
    return bws / (bws + dist) if kernel == "imq" else torch.exp(-dist / bws)


def _linear(kernel: str, x: Tensor, y: Tensor, bws: Tensor, estimator: str) -> Tensor:
    """``(S,)`` linear-time estimates from ``h = k(x, x') + k(y, y') - k(x, y') - k(x', y)``:
    ``"linear"`` over the disjoint pairs ``(2i, 2i + 1)`` (Gretton et al. 2012, Lemma 14), ``"linear-cyclic"`` over
    ``(i, i + 1 mod n)`` (DAN's ``mmd_rbf_accelerate``)."""
    if estimator == "linear":
        h = x.shape[0] // 2
        x1, x2, y1, y2 = x[0 : 2 * h : 2], x[1 : 2 * h : 2], y[0 : 2 * h : 2], y[1 : 2 * h : 2]
    else:
        x1, x2, y1, y2 = x, x.roll(-1, 0), y, y.roll(-1, 0)
    k = lambda p, q: _kernel_values(kernel, p, q, bws)  # noqa: E731
    return (k(x1, x2) + k(y1, y2) - k(x1, y2) - k(x2, y1)).mean(0)


def _bandwidth_tensor(bandwidths, d: int, scales, sigma2, device) -> Tensor:
    """The ``C_s`` as a float64 tensor; a tensor given by the caller keeps its autograd graph (learnable)."""
    if isinstance(bandwidths, Tensor):
        if bandwidths.dim() != 1 or bandwidths.numel() == 0 or not bandwidths.is_floating_point():
            raise ValueError(
                f"bandwidths as a tensor must be a non-empty 1-D float tensor, got {tuple(bandwidths.shape)}"
            )
        bw = bandwidths.to(device=device, dtype=torch.float64)
        _resolve_bandwidths(d, scales, sigma2, bw.detach().cpu().tolist(), torch.float64)  # the list path's checks
        return bw
    bws = _resolve_bandwidths(d, scales, sigma2, bandwidths, torch.float64)
    return torch.tensor(bws, dtype=torch.float64, device=device)


#: The estimators :func:`mmd2` offers besides the default (U- or V-statistic by ``unbiased``).
ESTIMATORS = ("linear", "linear-cyclic")


def mmd2(
    x: Tensor,
    y: Tensor,
    x_weights: Optional[Tensor] = None,
    y_weights: Optional[Tensor] = None,
    *,
    kernel: str = "imq",
    bandwidths: Optional[Union[Sequence[float], Tensor]] = None,
    scales: Sequence[float] = WAE_SCALES,
    sigma2: float = 1.0,
    unbiased: bool = True,
    estimator: Optional[str] = None,
    reduction: str = "sum",
    backend: str = "auto",
    **imq_options,
) -> Tensor:
    r"""Multi-bandwidth MMD² between two weighted samples without an ``n x m`` matrix, for several kernels:

    .. math::

        \text{imq: } k_s(a, b) = \frac{C_s}{C_s + \lVert a - b\rVert^2}, \qquad
        \text{gaussian: } k_s(a, b) = \exp\!\left(-\frac{\lVert a - b\rVert^2}{C_s}\right),

    with the estimator, weights and groups of :func:`gmwae_fast.fast_imq_mmd` (unbiased self terms over pairs of
    different groups divided by ``1 - sum_g W_g^2``; ``unbiased=False`` keeps every pair).

    Args:
        x, y: ``(n, d)`` / ``(m, d)`` points, or grouped ``(B, K, d)``.
        x_weights, y_weights: non-negative relative masses, ``(n,)`` / ``(B, K)`` (default uniform).
        kernel: ``"imq"`` (the fused :func:`gmwae_fast.fast_imq_mmd`; other keyword options pass through to it) or
            ``"gaussian"`` (options: ``validate=True`` runs the checks of :func:`gmwae_fast.fast_imq_mmd`: finite
            inputs, weights non-negative, not all zero, two groups with mass; without it such inputs give NaN).
        bandwidths: the ``C_s`` directly (DAN's ``bandwidth_list``; torch-two-sample's ``1 / alpha``; MMD-VAE's
            ``d^2``; :func:`gmwae_fast.dan_bandwidths`). Default: ``C_s = 2 d sigma2 s`` for ``s`` in ``scales``, for
            either kernel.
        scales, sigma2: the default bandwidths' scales and constant.
        unbiased, reduction: as in :func:`gmwae_fast.fast_imq_mmd` (``"sum"`` over bandwidths or ``"none"``).
        estimator: None (the U-statistic, or the V-statistic with ``unbiased=False``), ``"linear"`` (Gretton et
            al. 2012: the mean of ``h = k(x, x') + k(y, y') - k(x, y') - k(x', y)`` over the disjoint pairs
            ``(2i, 2i + 1)``; ``n = m``, unweighted ``(n, d)`` inputs, ``O(n d)``) or ``"linear-cyclic"`` (the same
            ``h`` over ``(i, i + 1 mod n)``: DAN's ``mmd_rbf_accelerate``). Either kernel; plain PyTorch.
        bandwidths (Gaussian): also a 1-D tensor, which may require grad: its exact gradient flows (learnable
            bandwidths; one host read checks that the values are positive).
        backend: ``kernel="imq"``: any backend of :func:`gmwae_fast.fast_imq_mmd`; ``"gaussian"``: ``"auto"`` or
            ``"tiled"`` (PyTorch on the inputs' device, module docstring).

    Returns:
        A scalar (or ``(S,)``) in float64 for float64 inputs, else float32.

    Example (DAN's multi-kernel MMD without its ``(2B, 2B, d)`` tensor)::

        >>> loss = gmwae_fast.mmd2(source, target, kernel="gaussian",
        ...                        bandwidths=gmwae_fast.dan_bandwidths(source, target), unbiased=False)
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {_REDUCTIONS}")
    if estimator is not None and estimator not in ("linear", "linear-cyclic"):
        raise ValueError(f"unknown estimator {estimator!r}; expected None, 'linear' or 'linear-cyclic'")
    if estimator is not None:
        return _linear_call(x, y, x_weights, y_weights, kernel, bandwidths, scales, sigma2, estimator, reduction,
                            backend, imq_options)  # fmt: skip
    if kernel == "imq":
        return fast_imq_mmd(x, y, x_weights, y_weights, scales=scales, sigma2=sigma2, bandwidths=bandwidths,
                            unbiased=unbiased, reduction=reduction, backend=backend, **imq_options)  # fmt: skip
    validate = bool(imq_options.pop("validate", False))
    if imq_options:
        raise ValueError(f"kernel='gaussian' takes no {sorted(imq_options)} (options of the IMQ kernel)")
    if backend not in ("auto", "tiled"):
        raise ValueError(f"kernel='gaussian' runs on backend 'tiled' (or 'auto'), got {backend!r}")
    x, y = _check_pair(x, y)
    xw = _check_weights("x_weights", x_weights, x, "x")
    yw = _check_weights("y_weights", y_weights, y, "y")
    if validate:
        _validate_values(x, y, xw, yw, unbiased, torch.float64)
    if unbiased:
        for name, t in (("x", x), ("y", y)):
            if t.shape[0] < 2:
                raise ValueError(
                    f"the unbiased estimate needs at least 2 groups of points in {name}; use unbiased=False"
                )
    bw = _bandwidth_tensor(bandwidths, x.shape[-1], scales, sigma2, x.device)
    out = _gaussian(x, y, xw, yw, bw, unbiased)
    out = out.sum() if reduction == "sum" else out
    return out.to(torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32)


def _linear_call(x, y, xw, yw, kernel, bandwidths, scales, sigma2, estimator, reduction, backend, imq_options):
    if imq_options or backend not in ("auto", "tiled"):
        raise ValueError(f"estimator={estimator!r} runs in plain PyTorch: no backend or {sorted(imq_options)} options")
    x, y = _check_pair(x, y)
    if x.dim() != 2 or y.dim() != 2 or xw is not None or yw is not None:
        raise ValueError(f"estimator={estimator!r} takes unweighted (n, d) samples")
    if x.shape != y.shape or x.shape[0] < 2:
        raise ValueError(f"estimator={estimator!r} needs n = m >= 2 points of the same d, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")  # fmt: skip
    bw = _bandwidth_tensor(bandwidths, x.shape[-1], scales, sigma2, x.device)
    out = _linear(kernel, x.to(torch.float64), y.to(torch.float64), bw, estimator)
    out = out.sum() if reduction == "sum" else out
    return out.to(torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32)


class MMDLoss(nn.Module):
    """:func:`mmd2` as a module; the keyword options are fixed at construction.

    Example::

        >>> loss_fn = gmwae_fast.MMDLoss(kernel="gaussian", bandwidths=[0.5, 1.0, 2.0, 4.0, 8.0])
        >>> penalty = loss_fn(source_features, target_features)
        >>> learnable = gmwae_fast.MMDLoss(kernel="gaussian", bandwidths=nn.Parameter(torch.tensor([1.0, 4.0])))
        >>> list(learnable.parameters())                           # the bandwidths, for the optimiser
    """

    def __init__(self, *, kernel: str = "imq", **options) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
        self.kernel = kernel
        self.options = dict(options)
        bw = self.options.pop("bandwidths", None)
        if isinstance(bw, nn.Parameter):
            self.bandwidths = bw  # registered: parameters(), state_dict() and optimisers see it
        elif isinstance(bw, Tensor):
            self.register_buffer("bandwidths", bw)
        else:
            self.bandwidths = bw

    def forward(
        self, x: Tensor, y: Tensor, x_weights: Optional[Tensor] = None, y_weights: Optional[Tensor] = None
    ) -> Tensor:
        return mmd2(x, y, x_weights, y_weights, kernel=self.kernel, bandwidths=self.bandwidths, **self.options)

    def extra_repr(self) -> str:
        opts = dict(self.options, bandwidths=self.bandwidths)
        return f"kernel={self.kernel!r}, " + ", ".join(f"{k}={v!r}" for k, v in opts.items())
