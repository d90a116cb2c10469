"""Data-dependent bandwidths without the ``O(N²)`` pairwise matrix.

:func:`mean_sq_distance` is the mean squared distance over the ordered pairs ``i != j`` of a (pooled) sample,
the base of most data-dependent Gaussian bandwidths (DAN's multi-kernel MMD, many MMD-VAE codes), in ``O(N d)``
time and memory instead of the ``N x N`` (or ``N x N x d``) matrix those codes build for it. :func:`dan_bandwidths`
is DAN's convention on top of it (Long et al., 2015: ``kernel_mul``, ``kernel_num``).

Exact, not an estimate: with ``mu`` the mean of the sample,

    sum_{i != j} |z_i - z_j|^2 = sum_{i, j} |z_i - z_j|^2 = 2 N sum_i |z_i - mu|^2,

so the mean over the ``N (N - 1)`` ordered pairs is ``2 sum_i |z_i - mu|^2 / (N - 1)``, computed in float64 with the
mean subtracted first (two passes: a common offset costs no precision, unlike ``|a|^2 + |b|^2 - 2 a.b``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._common import _check_pair, _check_points

__all__ = ["mean_sq_distance", "dan_bandwidths"]


def _pooled(x: Tensor, y: Optional[Tensor]) -> Tensor:
    if y is None:
        parts = [_check_points("x", x)]
    else:
        parts = list(_check_pair(x, y))
    parts = [p.reshape(-1, p.shape[-1]) for p in parts]
    z = torch.cat([p.to(torch.float64) for p in parts])
    if z.shape[0] < 2:
        raise ValueError(f"the pooled sample needs at least 2 points for a pair, got {z.shape[0]}")
    return z


def mean_sq_distance(x: Tensor, y: Optional[Tensor] = None) -> Tensor:
    r"""Mean squared Euclidean distance over the ordered pairs ``i != j`` of the pooled sample ``[x; y]``, in
    ``O(N d)`` (``N`` points in all), exact:

    .. math::

        \frac{1}{N (N - 1)} \sum_{i \ne j} \lVert z_i - z_j \rVert^2 = \frac{2}{N - 1} \sum_i \lVert z_i - \mu \rVert^2

    Args:
        x: ``(n, d)`` or ``(B, K, d)`` points (any floating dtype; a group structure is ignored: every point counts).
        y: optional second sample ``(m, d)`` or ``(B', K', d)``, pooled with ``x`` (DAN's source and target).

    Returns:
        A float64 0-d tensor, differentiable with respect to ``x`` and ``y`` (detach it for a bandwidth that is a
        constant of the loss, as DAN's ``L2_distance.data`` is).

    Example::

        >>> base = gmwae_fast.mean_sq_distance(source, target)      # what DAN sums from its (N, N) matrix
        >>> loss = gmwae_fast.fast_imq_mmd(z, prior, bandwidths=[float(base)])
    """
    z = _pooled(x, y)
    centred = z - z.mean(0, keepdim=True)
    return 2.0 * centred.pow(2).sum() / (z.shape[0] - 1)


def dan_bandwidths(
    source: Tensor, target: Tensor, kernel_mul: float = 2.0, kernel_num: int = 5, fix_sigma: Optional[float] = None
) -> tuple[float, ...]:
    r"""DAN's multi-kernel bandwidths: ``base = fix_sigma`` or :func:`mean_sq_distance` of the pooled sample, then
    ``base / kernel_mul ** (kernel_num // 2) * kernel_mul ** i`` for ``i = 0 .. kernel_num - 1`` (the ``C_s`` of
    ``exp(-|a - b|^2 / C_s)``; as in DAN's ``guassian_kernel``, no gradient flows through them).

    Args:
        source, target: ``(n, d)`` and ``(m, d)`` samples (or grouped ``(B, K, d)``).
        kernel_mul: ratio of consecutive bandwidths (> 0).
        kernel_num: number of bandwidths (>= 1).
        fix_sigma: a fixed base instead of the data's mean squared distance (> 0).

    Returns:
        ``kernel_num`` Python floats, smallest first (one host read of the base).

    Example::

        >>> bws = gmwae_fast.dan_bandwidths(source, target)        # DAN's defaults: kernel_mul=2, kernel_num=5
    """

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    if not (isinstance(kernel_num, int) and not isinstance(kernel_num, bool) and kernel_num >= 1):
        raise ValueError(f"kernel_num must be an int >= 1, got {kernel_num!r}")
    if not number(kernel_mul):
        raise ValueError(f"kernel_mul must be a finite number > 0, got {kernel_mul!r}")
    if fix_sigma is not None:
        if not number(fix_sigma):
            raise ValueError(f"fix_sigma must be None or a finite number > 0, got {fix_sigma!r}")
        base = float(fix_sigma)
    else:
        with torch.no_grad():
            base = float(mean_sq_distance(source, target))
        if not math.isfinite(base):
            raise ValueError("the pooled sample contains NaN or Inf values")
        if not base > 0:
            raise ValueError(f"the pooled sample's mean squared distance is {base!r}: every point is the same")
    try:
        out = tuple(base * float(kernel_mul) ** (i - kernel_num // 2) for i in range(kernel_num))
    except OverflowError:
        out = (math.inf,)
    if not all(math.isfinite(c) and c > 0 for c in out):
        raise ValueError(
            f"kernel_mul={kernel_mul!r} ** (up to {kernel_num}) puts bandwidths outside float64 (base {base:.3g})"
        )
    return out
