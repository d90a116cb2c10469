"""Permutation two-sample test on the fused IMQ MMD: :func:`mmd_test`.

The statistic of every relabelling is one fused call (``O((n + m) d)`` memory, never an ``N x N`` kernel matrix, so
the test runs at sizes where the kernel-matrix tests of torch-two-sample or alibi-detect run out of memory). Each
relabelling costs a full pass over the pairs; a kernel that shares one pass among all the permutations is the next
step (its statistics would be these, bit for bit up to summation order).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from ._common import _check_points
from .mmd import WAE_SCALES, imq_mmd_terms

__all__ = ["MMDTestResult", "mmd_test"]


class MMDTestResult(NamedTuple):
    """What :func:`mmd_test` returns."""

    #: MMD² of the observed split, summed over the bandwidths (float64 0-d tensor).
    statistic: Tensor
    #: ``(1 + #{null >= statistic}) / (P + 1)``: a valid p-value for any ``P`` (the observed split counts as one).
    p_value: float
    #: ``(P,)`` float64: the statistic of each relabelling, in the order of ``permutations``.
    null_statistics: Tensor
    #: ``(P, n + m)`` int64: the index permutations of the pooled sample ``[x; y]`` that were used (row ``p``: the
    #: first ``n`` indices form the relabelled ``x``); pass it back as ``permutations=`` to reproduce a result.
    permutations: Tensor


def _permutations(permutations: Union[int, Tensor], n_total: int, seed: Optional[int]) -> Tensor:
    if isinstance(permutations, Tensor):
        if permutations.dtype != torch.int64 or permutations.dim() != 2 or permutations.shape[1] != n_total:
            raise ValueError(
                f"permutations must be an int or an int64 tensor of shape (P, n + m) = (P, {n_total}), got "
                f"{permutations.dtype} {tuple(permutations.shape)}"
            )
        if permutations.shape[0] < 1:
            raise ValueError("permutations has no rows: give at least one permutation")
        if not bool((permutations.sort(1).values == torch.arange(n_total, device=permutations.device)).all()):
            raise ValueError("every row of permutations must be a permutation of 0 .. n + m - 1")
        return permutations.cpu()
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise ValueError(f"permutations must be an int >= 1 or an int64 tensor, got {permutations!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return torch.stack([torch.randperm(n_total, generator=g) for _ in range(permutations)])


def mmd_test(
    x: Tensor,
    y: Tensor,
    *,
    permutations: Union[int, Tensor] = 1000,
    seed: Optional[int] = None,
    scales: Sequence[float] = WAE_SCALES,
    sigma2: float = 1.0,
    bandwidths: Optional[Sequence[float]] = None,
    unbiased: bool = True,
    backend: str = "auto",
) -> MMDTestResult:
    r"""Permutation test of ``H0: x and y come from the same distribution`` with the multi-bandwidth IMQ MMD².

    The statistic is ``T(x, y) = sum_s MMD²_s`` (:func:`gmwae_fast.fast_imq_mmd` with the same options, float64
    sums). Under ``H0`` the pooled sample ``z = [x; y]`` is exchangeable, so for ``P`` index permutations ``pi_p``
    of ``z`` the statistics ``T(z[pi_p[:n]], z[pi_p[n:]])`` are draws of its null distribution, and

    .. math::

        p = \frac{1 + \#\{p : T_p \ge T(x, y)\}}{P + 1}

    is a valid p-value (``P(p <= alpha) <= alpha`` under ``H0`` for every ``P``). Memory ``O((n + m) d)``: no kernel
    matrix; time: ``P + 1`` fused passes over the ``(n + m)^2 / 2`` pairs.

    Args:
        x: ``(n, d)`` sample, ``n >= 2`` when ``unbiased``.
        y: ``(m, d)`` sample on the same device, same ``d``.
        permutations: how many random relabellings (an int >= 1; uniform permutations from ``seed``), or an int64
            ``(P, n + m)`` tensor of index permutations of ``[x; y]`` to use (to reproduce or compare results).
        seed: seed of the random permutations (None: drawn from torch's global generator, and recorded in the
            returned ``permutations``).
        scales, sigma2, bandwidths, unbiased, backend: as in :func:`gmwae_fast.fast_imq_mmd`.

    Returns:
        :class:`MMDTestResult` ``(statistic, p_value, null_statistics, permutations)``.

    Example (drift: is this batch of production features distributed like the reference window?)::

        >>> res = gmwae_fast.mmd_test(reference_window, batch, permutations=500, seed=0)
        >>> drifted = res.p_value < 0.01
    """
    x, y = _check_points("x", x), _check_points("y", y)
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"mmd_test takes (n, d) and (m, d) samples, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same feature dimension d, got {x.shape[1]} and {y.shape[1]}")
    if x.device != y.device:
        raise ValueError(f"x is on {x.device} but y is on {y.device}; put both on one device")
    n = x.shape[0]
    z = torch.cat([x, y.to(x.dtype) if y.dtype != x.dtype else y]).detach()
    perms = _permutations(permutations, z.shape[0], seed)
    opts = dict(scales=scales, sigma2=sigma2, bandwidths=bandwidths, unbiased=unbiased, backend=backend)

    def stat(a: Tensor, b: Tensor) -> Tensor:
        return imq_mmd_terms(a, b, **opts).mmd().sum()

    with torch.no_grad():
        observed = stat(z[:n], z[n:])
        idx = perms.to(z.device)
        null = torch.stack([stat(z[row[:n]], z[row[n:]]) for row in idx]).cpu()
    p_value = (1.0 + float((null >= observed.cpu()).sum())) / (perms.shape[0] + 1.0)
    return MMDTestResult(observed, p_value, null, perms)
