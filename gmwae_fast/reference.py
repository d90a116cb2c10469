"""Float64 reference of the multi-bandwidth IMQ MMD, and the materialised formulas users run today.

Everything here is plain PyTorch with autograd by PyTorch. It is the oracle of the tests and the baseline of the
benchmarks, which both import it (never copy these formulas).

* :func:`imq_mmd_reference` is the ``backend="reference"`` implementation of :func:`gmwae_fast.fast_imq_mmd`:
  float64, any weights and groups, evaluated in row chunks (each chunk is recomputed in the backward through
  activation checkpointing), so its memory is ``O(chunk * m)`` rather than ``O(n * m)`` and it still runs at
  n = 16k on a CPU.
* :func:`mmd_per_bandwidth` is the penalty as the original WAE code and popular PyTorch WAE libraries write it:
  one materialised ``n x m`` kernel matrix per bandwidth.
* :func:`mmd_vectorised` broadcasts all bandwidths over one ``n x m`` distance matrix (``n x m x S`` memory); the
  "best eager" formulation, and the one :func:`torch.compile` is benchmarked on.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ._common import IMQMMDTerms, bandwidths_for, cross_group_mass, difference_safe, pow2_normalised

__all__ = [
    "bandwidths_for",
    "imq_mmd_reference",
    "imq_terms_reference",
    "reference_terms",
    "mmd_per_bandwidth",
    "mmd_vectorised",
]


#: Elements of the ``(rows, m, d)`` difference tensor one chunk of :func:`reference_terms` may hold (128 MiB float64).
_CHUNK_ELEMENTS = 1 << 24


def _sqdist(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise squared distances from direct differences, ``sum_k (a_ik - b_jk)^2``: no cancellation, so even the
    distances among far outliers (where ``|a|^2 + |b|^2 - 2 a.b`` loses everything) carry one rounding per term."""
    diff = a[:, None, :] - b[None, :, :]
    return (diff * diff).sum(-1)


def _chunk_terms(
    a: Tensor,
    wa: Tensor,
    row0: Tensor,
    b: Tensor,
    wb: Tensor,
    bw: Tensor,
    group_a: int,
    group_b: int,
    exclude_same_group: bool,
) -> Tensor:
    # a: (c, d) chunk starting at global row index row0 (0-d tensor, so checkpoint can pass it).
    d2 = _sqdist(a, b)
    if exclude_same_group:
        gi = (torch.arange(a.shape[0], device=a.device) + row0) // group_a
        gj = torch.arange(b.shape[0], device=a.device) // group_b
        keep = (gi[:, None] != gj[None, :]).to(a.dtype)
    out = []
    for s in range(bw.shape[0]):
        k = bw[s] / (bw[s] + d2)
        if exclude_same_group:
            k = k * keep
        out.append(wa @ (k @ wb))
    return torch.stack(out)


def reference_terms(
    a: Tensor,
    wa: Tensor,
    b: Tensor,
    wb: Tensor,
    bw: Tensor,
    *,
    group_a: int = 1,
    group_b: int = 1,
    exclude_same_group: bool = False,
    chunk: Optional[int] = None,
) -> Tensor:
    """``(S,)`` sums ``sum_{i,j} wa_i wb_j C_s / (C_s + |a_i - b_j|^2)`` in float64, evaluated in row chunks.

    With ``exclude_same_group`` the pairs with ``i // group_a == j // group_b`` are left out (the unbiased self
    term when ``b is a``). Differentiable in every tensor argument; memory ``O(chunk * m * d)`` in both passes
    (``chunk`` default: as many rows as keep the chunk's differences within 2^24 elements).
    """
    a, wa, b, wb, bw = (t.to(torch.float64) for t in (a, wa, b, wb, bw))
    if chunk is None:
        chunk = max(1, _CHUNK_ELEMENTS // max(1, b.shape[0] * a.shape[1]))
    total = a.new_zeros(bw.shape[0])
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (a, wa, b, wb, bw))
    for r0 in range(0, a.shape[0], chunk):
        r1 = min(r0 + chunk, a.shape[0])
        args = (a[r0:r1], wa[r0:r1], torch.tensor(r0, device=a.device), b, wb, bw, group_a, group_b, exclude_same_group)
        if needs_grad:
            part = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            part = _chunk_terms(*args)
        total = total + part
    return total


def _flatten(x: Tensor, w: Optional[Tensor]) -> tuple[Tensor, Tensor, int]:
    group = 1 if x.dim() == 2 else x.shape[1]
    pts = difference_safe(x.reshape(-1, x.shape[-1]))
    if w is None:
        w = torch.ones(pts.shape[0], dtype=torch.float64, device=x.device)
    w = pow2_normalised(w.reshape(-1).to(torch.float64))
    return pts, w / w.sum(), group


def imq_terms_reference(
    x: Tensor,
    y: Tensor,
    x_weights: Optional[Tensor] = None,
    y_weights: Optional[Tensor] = None,
    *,
    bandwidths: Sequence[float],
    unbiased: bool = True,
    chunk: int = 1024,
):
    """Float64 :class:`gmwae_fast.mmd.IMQMMDTerms` ``(self_x, self_y, cross, den_x, den_y)``, each ``(S,)``, with
    the contract of :func:`gmwae_fast.imq_mmd_terms` (weights normalised here, in float64)."""
    a, wa, ga = _flatten(x, x_weights)
    b, wb, gb = _flatten(y, y_weights)
    bw = torch.as_tensor(list(bandwidths), dtype=torch.float64, device=x.device)

    def self_term(p: Tensor, w: Tensor, g: int) -> Tensor:
        return reference_terms(p, w, p, w, bw, group_a=g, group_b=g, exclude_same_group=unbiased, chunk=chunk)

    def den(w: Tensor, g: int) -> Tensor:
        return cross_group_mass(w.view(-1, g).sum(1)) if unbiased else w.new_ones(())

    return IMQMMDTerms(
        self_term(a, wa, ga),
        self_term(b, wb, gb),
        reference_terms(a, wa, b, wb, bw, chunk=chunk),
        den(wa, ga),
        den(wb, gb),
    )


def imq_mmd_reference(
    x: Tensor,
    y: Tensor,
    x_weights: Optional[Tensor] = None,
    y_weights: Optional[Tensor] = None,
    *,
    bandwidths: Sequence[float],
    unbiased: bool = True,
    reduction: str = "sum",
    chunk: int = 1024,
) -> Tensor:
    """Float64 multi-bandwidth IMQ MMD² with the exact contract of :func:`gmwae_fast.fast_imq_mmd`.

    ``x`` ``(n, d)`` or ``(B, K, d)``, ``y`` likewise, weights of the points' leading shape (normalised here),
    ``bandwidths`` absolute ``C_s``. Returns a float64 scalar (``reduction="sum"``) or ``(S,)`` vector.
    No input checking: :func:`gmwae_fast.fast_imq_mmd` validates before calling this.
    """
    mmd = imq_terms_reference(x, y, x_weights, y_weights, bandwidths=bandwidths, unbiased=unbiased, chunk=chunk).mmd()
    return mmd.sum() if reduction == "sum" else mmd


# --------------------------------------------------------------------------------------------------------------
# What users run today (benchmarks' baselines and the tests' drop-in checks).
# --------------------------------------------------------------------------------------------------------------


def mmd_per_bandwidth(x: Tensor, y: Tensor, scales: Sequence[float], sigma2: float = 1.0) -> Tensor:
    """The unbiased IMQ penalty as the original WAE code writes it: one ``n x m`` matrix per bandwidth.

    ``x`` ``(n, d)``, ``y`` ``(m, d)``, uniform weights; self terms over ``n (n - 1)`` ordered pairs, cross term
    over ``n m``. Returns the sum over bandwidths (a scalar in the input dtype).
    """
    n, d = x.shape
    m = y.shape[0]
    norms_x = x.pow(2).sum(1, keepdim=True)
    norms_y = y.pow(2).sum(1, keepdim=True)
    dist_x = norms_x + norms_x.T - 2.0 * x @ x.T
    dist_y = norms_y + norms_y.T - 2.0 * y @ y.T
    dist_xy = norms_x + norms_y.T - 2.0 * x @ y.T
    off_x = 1.0 - torch.eye(n, dtype=x.dtype, device=x.device)
    off_y = 1.0 - torch.eye(m, dtype=x.dtype, device=x.device)
    stat = x.new_zeros(())
    for s in scales:
        c = 2.0 * d * sigma2 * s
        res1 = (c / (c + dist_x) * off_x).sum() / (n * (n - 1)) + (c / (c + dist_y) * off_y).sum() / (m * (m - 1))
        res2 = (c / (c + dist_xy)).sum() * 2.0 / (n * m)
        stat = stat + res1 - res2
    return stat


def mmd_vectorised(x: Tensor, y: Tensor, bandwidths: Tensor) -> Tensor:
    """All bandwidths broadcast over one distance matrix (``n x m x S`` memory); unbiased, uniform weights.

    ``bandwidths`` is an ``(S,)`` tensor of absolute ``C_s``. Returns the sum over bandwidths.
    """
    n, m = x.shape[0], y.shape[0]

    def ksum(p: Tensor, q: Tensor) -> Tensor:
        d2 = torch.cdist(p, q).pow(2)
        return (bandwidths / (bandwidths + d2[..., None])).sum(-1)

    s = bandwidths.shape[0]
    kxx = ksum(x, x).sum() - n * s  # remove the diagonal analytically: k(0) = 1 per bandwidth
    kyy = ksum(y, y).sum() - m * s
    kxy = ksum(x, y).sum()
    return kxx / (n * (n - 1)) + kyy / (m * (m - 1)) - 2.0 * kxy / (n * m)
