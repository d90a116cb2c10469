"""Permutation two-sample test on the IMQ MMD: :func:`mmd_test`.

Never an ``N x N`` kernel matrix (``N = n + m``), so the test runs at sizes where the kernel-matrix tests of
torch-two-sample or alibi-detect run out of memory. Two methods give the same statistics:

* ``"shared"`` (default): one pass over the pairs for all ``P`` permutations. Write ``U_ij = sum_s (1 - k_s(z_i,
  z_j))`` (the complement matrix, ``U_ii = 0``) and ``a`` the 0/1 indicator of the relabelled ``x``; the constant
  parts of the kernel cancel exactly, and with ``b = 1 - a``:

      unbiased: MMD^2 = -a^T U a / (n (n-1)) - b^T U b / (m (m-1)) + 2 a^T U b / (n m)
      biased:   the same with n^2, m^2 in the first two denominators

  (each quadratic form a sum of non-negative terms; ``U b = U 1 - U a`` costs ``~2^-53 N / m`` relative, in place
  of a second matrix product),

  so each tile ``U_IJ`` (float64, differences formed directly) is computed once and multiplied against the ``P``
  label columns of its rows (a matrix product per tile): ``O(N^2 (S d + P))`` work, ``O(N P + B^2 d)`` memory for
  tiles of ``B`` rows.
* ``"separate"``: one fused :func:`gmwae_fast.fast_imq_mmd` pass per permutation (any backend, ``O(N d)`` memory,
  ``P + 1`` passes).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from ._common import _check_pair, kernel_bandwidths
from .backends import check_backend_name
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


def _complement_tile(a: Tensor, b: Tensor, bws: Tensor, chunk: int, kernel: str) -> Tensor:
    """``U_ij = sum_s (1 - k_s(D_ij))`` (float64) with ``D_ij = sum_k (a_ik - b_jk)^2`` formed from the differences,
    ``chunk`` columns of ``b`` at a time (an ``(rows, chunk, d)`` difference block). IMQ: ``1 - k = D / (C + D)``;
    Gaussian: ``1 - k = -expm1(-D / C)``; both without cancellation."""
    out = []
    for j0 in range(0, b.shape[0], chunk):
        dist = (a[:, None, :] - b[None, j0 : j0 + chunk, :]).pow(2).sum(-1)[..., None]
        comp = dist / (bws + dist) if kernel == "imq" else -torch.expm1(-dist / bws)
        out.append(comp.sum(-1))
    return torch.cat(out, 1)


def _shared_pass(z: Tensor, n: int, perms: Tensor, bws: Tensor, unbiased: bool, block: int, kernel: str) -> Tensor:
    """The statistic of the identity split and of every permutation, from one pass over the tiles of ``U``."""
    N, m = z.shape[0], z.shape[0] - n
    labels = torch.zeros(perms.shape[0] + 1, N, dtype=torch.float64, device=z.device)
    labels[0, :n] = 1.0  # column 0: the observed split
    labels[1:].scatter_(1, perms[:, :n].to(z.device), 1.0)
    A = labels.t().contiguous()  # (N, P + 1)
    qa, qb, qab = (torch.zeros(A.shape[1], dtype=torch.float64, device=z.device) for _ in range(3))
    width = max(z.shape[1], bws.numel())
    block = max(1, min(block, (1 << 22) // width))  # (block, chunk, d or S) float64 blocks: <= 32 MiB
    chunk = max(1, min(N, (1 << 22) // (block * width)))
    for i0 in range(0, N, block):
        tile = _complement_tile(z[i0 : i0 + block], z, bws, chunk, kernel)  # (B, N): U is symmetric: rows suffice
        a_rows = A[i0 : i0 + block]
        ua = tile @ A  # (U a)_i for the tile's rows, every column
        ub = tile.sum(1, keepdim=True) - ua  # (U b)_i, b = 1 - a
        # a^T U a, b^T U b, a^T U b as sums of non-negative terms (U b = U 1 - U a: ~2^-53 N / m relative)
        qa += (a_rows * ua).sum(0)
        qb += ((1.0 - a_rows) * ub).sum(0)
        qab += (a_rows * ub).sum(0)
    dx, dy = (n * (n - 1), m * (m - 1)) if unbiased else (n * n, m * m)
    return -qa / dx - qb / dy + 2.0 * qab / (n * m)


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
    method: str = "shared",
    block: int = 1024,
    kernel: str = "imq",
) -> MMDTestResult:
    r"""Permutation test of ``H0: x and y come from the same distribution`` with a multi-bandwidth MMD² (IMQ or
    Gaussian kernels).

    The statistic is ``T(x, y) = sum_s MMD²_s`` (:func:`gmwae_fast.fast_imq_mmd` with the same options, float64
    sums). Under ``H0`` the pooled sample ``z = [x; y]`` is exchangeable, so for ``P`` index permutations ``pi_p``
    of ``z`` the statistics ``T(z[pi_p[:n]], z[pi_p[n:]])`` are draws of its null distribution, and

    .. math::

        p = \frac{1 + \#\{p : T_p \ge T(x, y)\}}{P + 1}

    is a valid p-value (``P(p <= alpha) <= alpha`` under ``H0`` for every ``P``). No ``N x N`` kernel matrix
    (``N = n + m``): ``method="shared"`` computes the complement kernel tile by tile (float64) once for all the
    permutations (``O(N P + block^2 d)`` memory, ``O(N^2 (S d + P))`` work; module docstring),
    ``method="separate"`` runs one fused pass per permutation (``O(N d)`` memory, ``P + 1`` passes).

    Args:
        x: ``(n, d)`` sample, ``n >= 2`` when ``unbiased``.
        y: ``(m, d)`` sample on the same device, same ``d``.
        permutations: how many random relabellings (an int >= 1; uniform permutations from ``seed``), or an int64
            ``(P, n + m)`` tensor of index permutations of ``[x; y]`` to use (to reproduce or compare results).
        seed: seed of the random permutations (None: drawn from torch's global generator, and recorded in the
            returned ``permutations``).
        scales, sigma2, bandwidths, unbiased: as in :func:`gmwae_fast.fast_imq_mmd`.
        backend: the backend of ``method="separate"`` (as in :func:`gmwae_fast.fast_imq_mmd`); ``"shared"`` runs
            plain PyTorch on the inputs' device.
        method: ``"shared"`` (default) or ``"separate"``; the same statistics (to float64 rounding).
        block: rows per tile of ``"shared"``.
        kernel: ``"imq"`` (``C_s / (C_s + D)``, the options above) or ``"gaussian"`` (``exp(-D / C_s)``, with the
            ``C_s`` given as ``bandwidths=``, e.g. :func:`gmwae_fast.dan_bandwidths`; torch-two-sample's
            ``MMDStatistic`` with ``alphas`` is ``bandwidths=[1 / a for a in alphas]``; ``method="shared"`` only).

    Returns:
        :class:`MMDTestResult` ``(statistic, p_value, null_statistics, permutations)``.

    Example (drift: is this batch of production features distributed like the reference window?)::

        >>> res = gmwae_fast.mmd_test(reference_window, batch, permutations=500, seed=0)
        >>> drifted = res.p_value < 0.01
    """
    x, y = _check_pair(x, y)
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"mmd_test takes (n, d) and (m, d) samples, got {tuple(x.shape)} and {tuple(y.shape)}")
    if method not in ("shared", "separate"):
        raise ValueError(f"method must be 'shared' or 'separate', got {method!r}")
    if kernel not in ("imq", "gaussian"):
        raise ValueError(f"kernel must be 'imq' or 'gaussian', got {kernel!r}")
    if kernel == "gaussian" and bandwidths is None:
        raise ValueError("kernel='gaussian' needs bandwidths= (the C_s of exp(-|a - b|^2 / C_s)), e.g. dan_bandwidths")
    if kernel == "gaussian" and method == "separate":
        raise ValueError("method='separate' runs the fused IMQ kernels: use method='shared' for kernel='gaussian'")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an int >= 1, got {block!r}")
    n = x.shape[0]
    if unbiased and (n < 2 or y.shape[0] < 2):
        raise ValueError(f"the unbiased statistic needs at least 2 points per sample, got {n} and {y.shape[0]}")
    if isinstance(permutations, Tensor) and seed is not None:
        raise ValueError("seed draws random permutations: give either permutations as a tensor or a seed, not both")
    check_backend_name(backend)
    dtype = torch.promote_types(x.dtype, y.dtype)
    z = torch.cat([x.to(dtype), y.to(dtype)]).detach()
    if not bool(torch.isfinite(z).all()):  # a NaN statistic would compare False with every null: p = 1 / (P + 1)
        raise ValueError("x or y contains NaN or Inf values")
    perms = _permutations(permutations, z.shape[0], seed)
    opts = dict(scales=scales, sigma2=sigma2, bandwidths=bandwidths, unbiased=unbiased, backend=backend)

    def stat(a: Tensor, b: Tensor) -> Tensor:
        return imq_mmd_terms(a, b, **opts).mmd().sum()

    with torch.no_grad():
        if method == "separate":
            observed = stat(z[:n], z[n:])
            idx = perms.to(z.device)
            null = torch.stack([stat(z[row[:n]], z[row[n:]]) for row in idx]).cpu()
        else:
            bws, _ = kernel_bandwidths(z.shape[1], scales, sigma2, bandwidths, 0.0, torch.float64)
            bw = torch.tensor(bws, dtype=torch.float64, device=z.device)
            allstats = _shared_pass(z.double(), n, perms, bw, unbiased, block, kernel)
            observed, null = allstats[0], allstats[1:].cpu()
    p_value = (1.0 + float((null >= observed.cpu()).sum())) / (perms.shape[0] + 1.0)
    return MMDTestResult(observed, p_value, null, perms)
