"""Triton kernels and host launchers of the multi-bandwidth IMQ MMD (contract: ``docs/ARCHITECTURE.md``).

Four launchers, plain functions (no autograd; ``gmwae_fast/ops/imq_mmd.py`` wraps them as custom ops)::

    imq_self(a, wa, bw, group, unbiased)            -> values (S,) float64
    imq_cross(a, wa, b, wb, bw)                     -> values (S,) float64
    imq_self_grad(h, a, wa, bw, group, unbiased)    -> (values, da, dwa)
    imq_cross_grad(h, a, wa, b, wb, bw)             -> (values, da, dwa, db, dwb)

With ``k_s(D) = C_s / (C_s + D)`` and ``D = sum_k (a_ik - b_jk)^2``.

Work decomposition
------------------
A program owns ``BLOCK_I`` points ``i`` of ``a`` (one per thread: ``BLOCK_I = 32 * num_warps``) and walks a range of
points ``j`` of ``b`` in tiles of ``BLOCK_J`` (held by every thread). Tiles are ``[BLOCK_J, BLOCK_I]`` register
tensors: with Triton's default layout each thread then holds a full column ``j = 0 .. BLOCK_J-1`` for its own ``i``,
so sums over ``j`` (row sums of the pair matrix) never leave the thread, and per feature a thread loads one value of
``a`` (coalesced over the warp) and ``BLOCK_J`` contiguous values of ``b`` (vectorised broadcast loads). (A square
``64 x 64`` tile gets a layout with 32 rows per thread: 33 loads per feature and heavy register spills.) The host
passes transposed, zero-padded copies ``aT`` ``(d_pad, N_pad)`` in the compute dtype (padding points have weight 0),
so the inner loops need no masks. Nothing of size ``N x M`` is ever written.

* ``_imq_values_kernel``: grid (row blocks, column chunks); each program writes its ``S`` float64 values to a small
  ``(programs, S)`` buffer that the host sums in float64. Self terms visit only ``j >= i`` (column chunks below the
  diagonal exit at once, pairs ``j > i`` count twice, ``i == j`` once when biased); same-group exclusion (unbiased:
  allowed iff ``i // G != j // G``) and the triangle are masks on global indices, only on tiles near the diagonal.
* ``_imq_rowpass_kernel``: deterministic gradient pass, no atomics: the program accumulates, for its rows,
  ``sum_j v_j phi_ij`` (``dwa``) and, per feature ``g``, ``sum_j v_j psi_ij (b_jg - a_ig)`` (``da``), the
  difference taken per pair (a pair at distance 0, such as the diagonal ``i == j`` of a biased self term, whose
  ``psi`` is the largest of all, then adds exactly 0 instead of cancelling against the rest). The ``da`` sums are
  float64 slots of a per-program scratch (one per row and feature, runtime feature loop: no feature-sized register
  array, any ``d``, no register spills). Gradients of ``b`` (cross) are a second pass with the roles swapped. When
  there are too few row blocks to fill the GPU the columns are split over programs; each split writes partial
  ``da`` / ``dwa`` to a float64 workspace summed by the host in a fixed order (deterministic). The values come from
  the same pass.

No launcher reads a device value on the host (no synchronisation): every launch parameter is a shape, a
configuration value or a tensor.

Per-pair math (compute dtype: float32, float64 for float64 points)
-----------------------------------------------------------------
* Distances are built in registers feature by feature, ``D += (b_jk - a_ik)^2`` (loop over ``d`` in steps of the
  constexpr ``BLOCK_D``, unrolled) from the original coordinates (no shift: the difference of two compute-dtype
  numbers is rounded once); the ``|a|^2 + |b|^2 - 2ab`` expansion is never used.
* All bandwidths are evaluated on the same register tile (runtime loop over ``S``, ``ic = 1 / C_s`` loaded as a
  scalar), one reciprocal per pair and bandwidth: ``x = min(D ic, XMAX)``, ``k = 1 / (1 + x)`` and its complement
  ``u = 1 - k = x k``; the gradient pass reuses ``k`` for ``phi = sum_s h_s k_s`` and
  ``-psi = sum_s (h_s ic_s k_s) k_s``. Every quantity is a product of positive factors: accurate to a few ulp, and
  for a far pair ``k ~ C / D`` and ``psi ~ C / D^2`` decay (towards 0 in float32 beyond ``D ~ 1e19 C``) instead of
  overflowing as ``C / (C + D)^2`` would. ``XMAX`` (1e30 in float32) keeps ``1 + x`` finite when ``D`` is huge or
  infinite (``k`` is then at most 1e-30 too large, ``u = 1``); NaN propagates. On CUDA the float32 reciprocal is
  ``rcp.approx.ftz.f32`` refined by one Newton step (``csrc/imq_math.h`` does the same). Using ``ic`` amounts to the
  bandwidth ``C' = 1 / ic``, within 6e-8 of ``C_s``, the same in every term.
* Values (float64-grade sums of float32 pairs, as ``csrc/imq_math.h`` ``imq_pick_value``): per row and bandwidth
  both ``K = sum_j w_j k`` and ``U = sum_j w_j u`` are accumulated (products in the compute dtype, sums in float64:
  within a tile inside each thread, across tiles in a per-program scratch, across rows), and the exact float64 pair
  weight ``W``
  (``w_j`` times 0, 1 or 2: exact). Since ``K + U = W`` exactly, the value is ``W - U`` when ``U < K``, else ``K``:
  the smaller sum carries the smaller rounding error, so the bandwidths for which ``k ~ 1`` (large against the
  distances, where ``MMD2`` is a tiny difference of large sums) are as accurate as the small ones. Row weights
  ``wa_i`` multiply in float64 (an equal product ``wa_i wb_j`` rounded the same way for every pair would be a bias
  that does not average out). Nothing global (mean distance, common centre) enters: one far point cannot set the
  precision of the others, and no value has to be read back to the host.

Block sizes are module defaults (:data:`DEFAULTS`, chosen for a GPU such as an H100: ``python
benchmarks/triton_aot.py`` compiles every variant for sm_90 without a GPU and reports registers and spills from
``ptxas -v``; with triton 3.8, float32, S = 15, d = 10 and d = 64: no spills, see ``tests/test_triton_aot.py``; not
yet timed on a GPU) and can be overridden per call with the keyword-only ``block_i``, ``block_j``, ``num_warps``
and ``col_splits`` arguments of every launcher.

CPU tensors run through the Triton interpreter (``TRITON_INTERPRET=1`` set before Triton is imported).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["imq_self", "imq_cross", "imq_self_grad", "imq_cross_grad", "DEFAULTS"]

#: Default launch configuration (GPU oriented). ``*_block_i``: points of ``a`` per program (``32 * num_warps``:
#: one per thread); ``*_block_j``: points of ``b`` per tile (held by every thread); ``block_d``: features unrolled
#: per step of the distance loop; ``programs_per_sm`` and
#: ``min_tiles_per_program``: how far the column range of a row block is split over programs.
DEFAULTS = {
    "values_block_i": 128,
    "values_block_j": 16,
    "grad_block_i": 64,
    "grad_block_j": 16,
    "block_d": 16,
    "programs_per_sm": 4,
    "min_tiles_per_program": 4,
    # float64 points: doubles take two registers; smaller tiles keep the kernels from spilling as much
    "values_block_j_f64": 8,
    "grad_block_j_f64": 8,
    # register cap per thread on CUDA (ptx .maxnreg; ignored by the interpreter). Without it triton 3.6's ptxas
    # settles some variants at 96-128 registers and spills 8-16 B; with it neither 3.6 nor 3.8 spills.
    "values_maxnreg": 160,
    "grad_maxnreg": 168,
}

_POINT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _sq_dist(
    aT_ptr,
    rows,
    n_pad,
    bT_ptr,
    cols,
    m_pad,
    n_feat_pad,
    BLOCK_J: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CDT: tl.constexpr,
):
    """``D[j, i] = sum_k (b[j, k] - a[i, k])^2`` from the transposed, padded copies (no masks needed)."""
    dist = tl.zeros([BLOCK_J, BLOCK_I], dtype=CDT)
    a_p = aT_ptr + rows
    b_p = bT_ptr + cols
    for k0 in range(0, n_feat_pad, BLOCK_D):
        for kk in tl.static_range(BLOCK_D):
            av = tl.load(a_p)
            bv = tl.load(b_p)
            diff = bv[:, None] - av[None, :]
            dist += diff * diff
            a_p += n_pad
            b_p += m_pad
    return dist


@triton.jit
def _rcp(y, FAST_RCP: tl.constexpr):
    """``1 / y`` for ``y >= 1``. On CUDA (float32): one ``rcp.approx.ftz.f32`` (<= 1 ulp) refined by one Newton
    step (two FMAs), as ``csrc/imq_math.h`` does; else a division."""
    if FAST_RCP:
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [y], dtype=tl.float32, is_pure=True, pack=1)
        return tl.fma(r, tl.fma(-y, r, 1.0), r)
    else:
        return 1.0 / y


@triton.jit
def _k_u(dist, ic, XMAX: tl.constexpr, FAST_RCP: tl.constexpr):
    """``k = 1 / (1 + x)`` and its complement ``u = 1 - k = x k`` with ``x = min(D ic, XMAX)``, both products of
    positive factors (a few ulp each, no cancellation). The clamp keeps ``1 + x`` finite for any ``D`` (an
    infinite or huge distance gives ``k ~ 1 / XMAX``, ``u = 1``, never ``inf * 0``); NaN propagates."""
    x = tl.minimum(dist * ic, XMAX, propagate_nan=tl.PropagateNan.ALL)
    k = _rcp(x + 1.0, FAST_RCP)
    return k, x * k


@triton.jit
def _tile_weights(
    wb,
    rows,
    cols,
    group,
    row_hi,
    SELF_TRI: tl.constexpr,
    MASK_GROUPS: tl.constexpr,
    UNBIASED: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_I: tl.constexpr,
    CDT: tl.constexpr,
):
    """Column weights of a ``[BLOCK_J, BLOCK_I]`` tile (compute dtype; exact: ``wb_j`` times 0, 1 or 2).

    ``SELF_TRI``: symmetric self values, pairs ``j > i`` weigh ``2 wb_j``, ``j == i`` weighs ``wb_j`` (biased) and
    ``j < i`` nothing. ``MASK_GROUPS``: pairs of one group (``i // group == j // group``) weigh nothing. The masks
    are evaluated only on tiles that can contain such pairs (``row_hi`` = last row of the block)."""
    if SELF_TRI:
        scale = 2.0
    else:
        scale = 1.0
    wmat = tl.zeros([BLOCK_J, BLOCK_I], dtype=CDT) + (wb * scale)[:, None]
    if SELF_TRI or MASK_GROUPS:
        col_lo = tl.min(cols, axis=0)
        if UNBIASED:
            cut = (row_hi // group + 1) * group  # columns >= cut share no group with the block, and are > i
        else:
            cut = row_hi + 1
        if SELF_TRI:
            near = col_lo < cut
        else:
            near = (col_lo < cut) & (tl.max(cols, axis=0) >= (tl.min(rows, axis=0) // group) * group)
        if near:
            factor = tl.zeros([BLOCK_J, BLOCK_I], dtype=CDT) + 1.0
            if SELF_TRI:
                factor = tl.where(cols[:, None] > rows[None, :], 2.0, 0.0)
                if not UNBIASED:
                    factor = tl.where(cols[:, None] == rows[None, :], 1.0, factor)
            if MASK_GROUPS:
                factor = tl.where((cols // group)[:, None] == (rows // group)[None, :], 0.0, factor)
            wmat = factor * wb[:, None]
    return wmat


@triton.jit
def _add_k_u(k_p, u_p, k, u, wmat, rmask):
    """Row sums over the tile of ``wmat k`` and ``wmat u`` (products in the compute dtype, summed in float64 inside
    each thread: a compute-dtype tile sum measured 2.8e-5 relative error on a near-zero MMD2), added to the float64
    per-row accumulators at ``k_p`` / ``u_p`` (a scratch row owned by the program; ``rmask`` False: no-op)."""
    kt = tl.sum((wmat * k).to(tl.float64), axis=0)
    ut = tl.sum((wmat * u).to(tl.float64), axis=0)
    tl.store(k_p, tl.load(k_p, mask=rmask, other=0.0) + kt, mask=rmask)
    tl.store(u_p, tl.load(u_p, mask=rmask, other=0.0) + ut, mask=rmask)


@triton.jit
def _finish_values(k_rows, u_rows, row_stride, wrow, wa64, sidx, S):
    """Per bandwidth, float64: ``K = sum_i wa_i Krow_i``, ``U = sum_i wa_i Urow_i`` and the pair weight
    ``W = sum_i wa_i wrow_i``; the value is ``W - U`` when ``U < K`` else ``K`` (the smaller sum carries the
    smaller rounding error; ``csrc/imq_math.h`` ``imq_pick_value``)."""
    smask = (sidx < S)[:, None]
    kr = tl.load(k_rows[None, :] + sidx[:, None] * row_stride, mask=smask, other=0.0)
    ur = tl.load(u_rows[None, :] + sidx[:, None] * row_stride, mask=smask, other=0.0)
    kv = tl.sum(kr * wa64[None, :], axis=1)
    uv = tl.sum(ur * wa64[None, :], axis=1)
    w = tl.sum(wa64 * wrow, axis=0)
    return tl.where(uv < kv, w - uv, kv)


@triton.jit
def _imq_values_kernel(
    aT_ptr,
    wa_ptr,
    bT_ptr,
    wb_ptr,
    inv_ptr,
    part_ptr,
    scratch_ptr,
    n_pad,
    m_pad,
    m_cols,
    n_feat_pad,
    group,
    cols_per_prog,
    S,
    SELF: tl.constexpr,
    UNBIASED: tl.constexpr,
    FAST_RCP: tl.constexpr,
    XMAX: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    S_PAD: tl.constexpr,
):
    CDT: tl.constexpr = wa_ptr.dtype.element_ty
    pid_i = tl.program_id(0)
    pid_z = tl.program_id(1)
    num_z = tl.num_programs(1)
    row0 = pid_i * BLOCK_I
    rows = tl.max_contiguous(tl.multiple_of(row0 + tl.arange(0, BLOCK_I), BLOCK_I), BLOCK_I)
    row_hi = row0 + BLOCK_I - 1
    sidx = tl.arange(0, S_PAD)
    col_lo = pid_z * cols_per_prog
    col_hi = tl.minimum(col_lo + cols_per_prog, m_cols)
    if SELF:
        col_lo = tl.maximum(col_lo, (row0 // BLOCK_J) * BLOCK_J)  # upper triangle j >= i only
    wa64 = tl.load(wa_ptr + rows).to(tl.float64)
    # per bandwidth and row: float64 sums K (of w k) and U (of w (1 - k)) in a scratch owned by this program
    # (zeroed by the host): a register array indexed by a runtime bandwidth would cost a select per element, an
    # unrolled bandwidth loop spills; each thread only ever touches its own rows (no races, fixed order)
    k_rows = scratch_ptr + ((pid_i * num_z + pid_z) * 2 * S).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    u_rows = k_rows + S * BLOCK_I
    rtrue = rows >= 0
    wrow = tl.zeros([BLOCK_I], dtype=tl.float64)  # per row: sum_j w_j (exact weights, float64)
    for n0 in range(col_lo, col_hi, BLOCK_J):
        cols = tl.max_contiguous(tl.multiple_of(n0 + tl.arange(0, BLOCK_J), BLOCK_J), BLOCK_J)
        wb = tl.load(wb_ptr + cols)
        dist = _sq_dist(aT_ptr, rows, n_pad, bT_ptr, cols, m_pad, n_feat_pad, BLOCK_J, BLOCK_I, BLOCK_D, CDT)
        wmat = _tile_weights(wb, rows, cols, group, row_hi, SELF, UNBIASED, UNBIASED, BLOCK_J, BLOCK_I, CDT)
        wrow += tl.sum(wmat.to(tl.float64), axis=0)
        for s in range(S):
            k, u = _k_u(dist, tl.load(inv_ptr + s), XMAX, FAST_RCP)  # one reciprocal per pair and bandwidth
            _add_k_u(k_rows + s * BLOCK_I, u_rows + s * BLOCK_I, k, u, wmat, rtrue)
    vals = _finish_values(k_rows, u_rows, BLOCK_I, wrow, wa64, sidx, S)
    tl.store(part_ptr + (pid_i * num_z + pid_z) * S_PAD + sidx, vals)


@triton.jit
def _phi_psi(
    dist,
    inv_ptr,
    hc_ptr,
    k_rows,
    u_rows,
    row_stride,
    wmat,
    rmask,
    S,
    WITH_VALUES: tl.constexpr,
    XMAX: tl.constexpr,
    FAST_RCP: tl.constexpr,
):
    """``phi = sum_s h_s k_s`` and ``-psi = sum_s (h_s ic_s k_s) k_s`` on a tile (compute dtype; products of
    decaying factors: a far pair underflows towards 0, never overflows), and the value sums when asked."""
    phi = tl.zeros(dist.shape, dtype=dist.dtype)
    npsi = tl.zeros(dist.shape, dtype=dist.dtype)
    for s in range(S):
        ic = tl.load(inv_ptr + s)
        hs = tl.load(hc_ptr + s)  # h_s (compute dtype)
        k, u = _k_u(dist, ic, XMAX, FAST_RCP)  # the one reciprocal per pair and bandwidth, for k and k'
        phi += hs * k
        npsi += ((hs * ic) * k) * k
        if WITH_VALUES:
            _add_k_u(k_rows + s * row_stride, u_rows + s * row_stride, k, u, wmat, rmask)
    return phi, npsi


@triton.jit
def _add_da(acc_p, a_p, b_p, p, n_feat, n_pad, m_pad):
    """``acc[g, i] += sum_j p_ji (b_jg - a_ig)`` for every feature ``g`` (runtime loop; ``acc`` float64 in a
    scratch owned by the program, one slot per row and feature). Per pair, so a pair at distance 0 (``i == j``)
    adds exactly 0: no cancellation of a large diagonal ``psi`` against the rest, and no common offset."""
    for g in range(0, n_feat):
        diff = tl.load(b_p)[:, None] - tl.load(a_p)[None, :]
        tl.store(acc_p, tl.load(acc_p) + tl.sum(p * diff, axis=0).to(tl.float64))
        acc_p += n_pad
        a_p += n_pad
        b_p += m_pad


@triton.jit
def _imq_rowpass_kernel(
    aT_ptr,
    wa_ptr,
    bT_ptr,
    wb_ptr,
    inv_ptr,
    hc_ptr,
    part_ptr,
    scratch_ptr,
    acc_ptr,
    da_ptr,
    dwa_ptr,
    n_rows,
    n_feat,
    n_pad,
    m_pad,
    m_cols,
    n_feat_pad,
    group,
    dw_scale,
    da_scale,
    cols_per_prog,
    S,
    MASK_GROUPS: tl.constexpr,
    WITH_VALUES: tl.constexpr,
    FAST_RCP: tl.constexpr,
    XMAX: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    S_PAD: tl.constexpr,
):
    CDT: tl.constexpr = wa_ptr.dtype.element_ty
    pid_i = tl.program_id(0)
    pid_z = tl.program_id(1)
    num_z = tl.num_programs(1)
    row0 = pid_i * BLOCK_I
    rows = tl.max_contiguous(tl.multiple_of(row0 + tl.arange(0, BLOCK_I), BLOCK_I), BLOCK_I)
    row_hi = row0 + BLOCK_I - 1
    col_lo = pid_z * cols_per_prog
    col_hi = tl.minimum(col_lo + cols_per_prog, m_cols)

    # per bandwidth and row, the value sums K and U live in a float64 scratch owned by this program (see
    # _imq_values_kernel); so do the da sums, one slot per feature and row
    k_rows = scratch_ptr + (pid_z * 2 * S).to(tl.int64) * n_pad + rows
    u_rows = k_rows + S * n_pad
    acc_rows = acc_ptr + (pid_z * n_feat).to(tl.int64) * n_pad + rows
    rtrue = rows >= 0
    wrow = tl.zeros([BLOCK_I], dtype=tl.float64)
    sum_phi = tl.zeros([BLOCK_I], dtype=tl.float64)  # sum_j w_j phi_ij
    for n0 in range(col_lo, col_hi, BLOCK_J):
        cols = tl.max_contiguous(tl.multiple_of(n0 + tl.arange(0, BLOCK_J), BLOCK_J), BLOCK_J)
        wb = tl.load(wb_ptr + cols)
        dist = _sq_dist(aT_ptr, rows, n_pad, bT_ptr, cols, m_pad, n_feat_pad, BLOCK_J, BLOCK_I, BLOCK_D, CDT)
        wmat = _tile_weights(wb, rows, cols, group, row_hi, False, MASK_GROUPS, True, BLOCK_J, BLOCK_I, CDT)
        if WITH_VALUES:
            wrow += tl.sum(wmat.to(tl.float64), axis=0)
        phi, npsi = _phi_psi(dist, inv_ptr, hc_ptr, k_rows, u_rows, n_pad, wmat, rtrue, S, WITH_VALUES, XMAX, FAST_RCP)
        sum_phi += tl.sum(wmat * phi, axis=0).to(tl.float64)
        _add_da(acc_rows, aT_ptr + rows, bT_ptr + cols, wmat * npsi, n_feat, n_pad, m_pad)

    rmask = rows < n_rows
    wa64 = tl.load(wa_ptr + rows).to(tl.float64)
    # outputs of split z at da[z], dwa[z] (the final tensors when there is one split, else float64 workspaces)
    z_off = pid_z.to(tl.int64) * n_rows
    tl.store(dwa_ptr + z_off + rows, (sum_phi * dw_scale).to(dwa_ptr.dtype.element_ty), mask=rmask)
    # da_i = da_scale * w_i * sum_j w_j psi_ij (a_i - b_j) = da_scale * w_i * acc_i  (acc: -psi, b_j - a_i)
    scale = da_scale * wa64
    da_rows = da_ptr + (z_off + rows) * n_feat
    for g in range(0, n_feat):
        grad = tl.load(acc_rows) * scale
        if da_ptr.dtype.element_ty == tl.float64:  # a float64 workspace of column splits
            tl.store(da_rows, grad, mask=rmask)
        else:  # via the compute dtype: float64 -> bfloat16 / float16 is not a direct conversion everywhere
            tl.store(da_rows, grad.to(CDT).to(da_ptr.dtype.element_ty), mask=rmask)
        acc_rows += n_pad
        da_rows += 1
    if WITH_VALUES:
        vals = _finish_values(k_rows, u_rows, n_pad, wrow, wa64, tl.arange(0, S_PAD), S)
        tl.store(part_ptr + (pid_i * num_z + pid_z) * S_PAD + tl.arange(0, S_PAD), vals)


# ---------------------------------------------------------------------------------------------------------------
# Host side: checks, configuration, launches
# ---------------------------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    from gmwae_fast.backends import triton_interpreting

    return triton_interpreting()


def _device_guard(device: torch.device):
    """Launch on the tensors' GPU even when it is not the current one (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_points(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(x.shape)}")
    if x.dtype not in _POINT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_vector(name: str, x, length: int, dtype: torch.dtype, device: torch.device, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},) ({what}), got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} ({what}), got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} (all arguments on one device)")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_device(device: torch.device) -> None:
    if device.type == "cpu" and not _interpreting():
        raise ValueError(
            "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing triton "
            "(or move the tensors to a GPU)"
        )


def _check_common(a, wa, bw, name_a: str = "a", name_wa: str = "wa") -> Tuple[torch.dtype, int]:
    _check_points(name_a, a)
    cdt = _compute_dtype(a.dtype)
    _check_vector(name_wa, wa, a.shape[0], cdt, a.device, f"weights of {name_a} in the compute dtype")
    if not isinstance(bw, torch.Tensor):
        raise TypeError(f"bw must be a torch.Tensor, got {type(bw).__name__}")
    if bw.dim() != 1:
        raise ValueError(f"bw must be 1-D (S,), got shape {tuple(bw.shape)}")
    _check_vector("bw", bw, bw.shape[0], torch.float64, a.device, "bandwidths")
    _check_device(a.device)
    return cdt, bw.shape[0]


def _check_group(group, unbiased, n: int) -> None:
    if isinstance(group, bool) or not isinstance(group, int):
        raise TypeError(f"group must be an int, got {type(group).__name__}")
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    if n % group != 0:
        raise ValueError(f"group ({group}) must divide the number of points ({n})")
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased must be a bool, got {type(unbiased).__name__}")


def _check_cross(a, wa, b, wb, bw) -> Tuple[torch.dtype, int]:
    cdt, S = _check_common(a, wa, bw)
    _check_points("b", b)
    if b.dtype != a.dtype:
        raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if b.device != a.device:
        raise ValueError(f"b is on {b.device}, expected {a.device} (all arguments on one device)")
    if b.shape[1] != a.shape[1]:
        raise ValueError(f"a and b must have the same number of features, got {a.shape[1]} and {b.shape[1]}")
    _check_vector("wb", wb, b.shape[0], cdt, a.device, "weights of b in the compute dtype")
    return cdt, S


def _check_h(h, S: int, device: torch.device) -> None:
    _check_vector("h", h, S, torch.float64, device, "cotangent, one per bandwidth")


def _pow2(name: str, value: int, lo: int) -> int:
    value = int(value)
    if value < lo or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {lo}, got {value}")
    return value


class _Config:
    """Validated launch configuration of one kernel call."""

    def __init__(self, kind: str, block_i, block_j, num_warps, col_splits, f64: bool = False):
        default_j = DEFAULTS[f"{kind}_block_j_f64" if f64 else f"{kind}_block_j"]
        bi = _pow2("block_i", DEFAULTS[f"{kind}_block_i"] if block_i is None else block_i, 32)
        bj = _pow2("block_j", default_j if block_j is None else block_j, 1)
        if bj > bi:
            raise ValueError(f"block_j ({bj}) must not exceed block_i ({bi})")
        self.block_i, self.block_j = bi, bj
        self.num_warps = max(1, bi // 32) if num_warps is None else int(num_warps)
        self.maxnreg = DEFAULTS[f"{kind}_maxnreg"]
        if col_splits is not None and int(col_splits) < 1:
            raise ValueError(f"col_splits must be >= 1, got {col_splits}")
        self.col_splits = None if col_splits is None else int(col_splits)


def _block_d(d: int) -> int:
    """Features unrolled per step of the distance loop: at most DEFAULTS['block_d'], sized so the zero padding of
    the features wastes little (d = 10 -> one step of 10; d = 33 -> 3 steps of 11; d = 64 -> 4 x 16)."""
    cap = max(1, int(DEFAULTS["block_d"]))
    steps = max(1, triton.cdiv(d, cap))
    return max(1, triton.cdiv(d, steps))


def _s_pad(S: int) -> int:
    return max(2, triton.next_power_of_2(S))


@functools.lru_cache(maxsize=None)
def _num_sms(device_type: str, index: Optional[int]) -> int:
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(
            index if index is not None else torch.cuda.current_device()
        ).multi_processor_count
    return 1


def _fast_rcp(device: torch.device, cdt: torch.dtype) -> bool:
    return device.type == "cuda" and cdt == torch.float32 and torch.version.hip is None and not _interpreting()


def _col_chunks(device: torch.device, programs: int, col_tiles: int, col_splits: Optional[int]) -> Tuple[int, int]:
    """Split the column tiles of each row block over ``splits`` programs so that the grid fills the GPU
    (``DEFAULTS['programs_per_sm']`` per multiprocessor), keeping at least ``min_tiles_per_program`` tiles each.
    Returns ``(splits, tiles_per_split)``."""
    if col_splits is None:
        target = int(DEFAULTS["programs_per_sm"]) * _num_sms(device.type, device.index)
        col_splits = min(
            triton.cdiv(target, max(programs, 1)), max(1, col_tiles // max(1, int(DEFAULTS["min_tiles_per_program"])))
        )
    splits = max(1, min(int(col_splits), col_tiles))
    tiles = triton.cdiv(col_tiles, splits)
    return triton.cdiv(col_tiles, tiles), tiles


def _prepare(x: torch.Tensor, w: torch.Tensor, n_pad: int, d_pad: int, cdt: torch.dtype):
    """Transposed, zero-padded copy ``(d_pad, n_pad)`` of the points in the compute dtype and the padded weights
    (padding points and features are zeros: they weigh nothing and add nothing to a distance)."""
    n, d = x.shape
    xT = torch.zeros(d_pad, n_pad, dtype=cdt, device=x.device)
    xT[:d, :n] = x.t()
    wp = torch.zeros(n_pad, dtype=cdt, device=x.device)
    wp[:n] = w
    return xT, wp


def _inv_bw(bw: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """``ic = 1 / C_s`` in the compute dtype (the kernels evaluate ``k = 1 / (1 + D ic)``)."""
    return torch.reciprocal(bw).to(cdt)


def _xmax(cdt: torch.dtype) -> float:
    """Clamp of ``x = D / C`` in the kernels: ``1 + x`` stays finite, ``k = 1 / (1 + x)`` stays a normal number
    (2^126 / 2^1022, as the C++ kernels' ``far_x``: a lower clamp such as 1e30 froze ``k`` at 1e-30 for every pair
    with ``D / C`` above it, 100% off for a bandwidth of 1e-32 against unit distances)."""
    return 2.0**1022 if cdt == torch.float64 else 2.0**126


def _roundup(x: int, m: int) -> int:
    return triton.cdiv(x, m) * m


def _values(a, wa, b, wb, bw, self_: bool, group: int, unbiased: bool, cfg: _Config) -> torch.Tensor:
    N, d = a.shape
    M = b.shape[0]
    S = bw.shape[0]
    if N == 0 or M == 0 or S == 0:
        return torch.zeros(S, dtype=torch.float64, device=a.device)
    cdt = wa.dtype
    bi, bj = cfg.block_i, cfg.block_j
    bd = _block_d(d)
    d_pad = _roundup(max(d, 1), bd)
    if self_:
        n_pad = m_pad = _roundup(N, bi)
        aT, wap = bT, wbp = _prepare(a, wa, n_pad, d_pad, cdt)
    else:
        n_pad, m_pad = _roundup(N, bi), _roundup(M, bj)
        aT, wap = _prepare(a, wa, n_pad, d_pad, cdt)
        bT, wbp = _prepare(b, wb, m_pad, d_pad, cdt)
    row_blocks = n_pad // bi
    m_cols = _roundup(M, bj)  # columns visited (the self copy is padded further, to whole row blocks)
    splits, tiles = _col_chunks(a.device, row_blocks, m_cols // bj, cfg.col_splits)
    s_pad = _s_pad(S)
    part = torch.empty(row_blocks * splits, s_pad, dtype=torch.float64, device=a.device)
    scratch = torch.zeros(row_blocks * splits * 2 * S * bi, dtype=torch.float64, device=a.device)
    with _device_guard(a.device):
        _imq_values_kernel[(row_blocks, splits)](
            aT,
            wap,
            bT,
            wbp,
            _inv_bw(bw, cdt),
            part,
            scratch,
            n_pad,
            m_pad,
            m_cols,
            d_pad,
            group,
            tiles * bj,
            S,
            SELF=self_,
            UNBIASED=bool(unbiased),
            FAST_RCP=_fast_rcp(a.device, cdt),
            XMAX=_xmax(cdt),
            BLOCK_I=bi,
            BLOCK_J=bj,
            BLOCK_D=bd,
            S_PAD=s_pad,
            num_warps=cfg.num_warps,
            maxnreg=cfg.maxnreg,
        )
    return part[:, :S].sum(dim=0)


def _rowpass(
    h,
    a,
    wa,
    b,
    wb,
    bw,
    group: int,
    mask_groups: bool,
    with_values: bool,
    dw_scale: float,
    da_scale: float,
    cfg: _Config,
):
    """One deterministic row pass: gradients of the rows of ``a`` against all of ``b`` (and the values)."""
    N, d = a.shape
    M = b.shape[0]
    S = bw.shape[0]
    cdt = wa.dtype
    if N == 0 or M == 0 or S == 0:
        return torch.zeros(S, dtype=torch.float64, device=a.device), torch.zeros_like(a), torch.zeros_like(wa)
    bi, bj = cfg.block_i, cfg.block_j
    bd = _block_d(d)
    d_pad = _roundup(max(d, 1), bd)
    same = b is a and wb is wa
    n_pad = _roundup(N, bi)
    m_pad = n_pad if same else _roundup(M, bj)
    aT, wap = _prepare(a, wa, n_pad, d_pad, cdt)
    bT, wbp = (aT, wap) if same else _prepare(b, wb, m_pad, d_pad, cdt)
    row_blocks = n_pad // bi
    m_cols = _roundup(M, bj)  # columns visited (the self copy is padded further, to whole row blocks)
    splits, tiles = _col_chunks(a.device, row_blocks, m_cols // bj, cfg.col_splits)
    if splits == 1:
        da_out, dwa_out = torch.empty_like(a), torch.empty_like(wa)
    else:
        da_out = torch.empty(splits, N, d, dtype=torch.float64, device=a.device)
        dwa_out = torch.empty(splits, N, dtype=torch.float64, device=a.device)
    s_pad = _s_pad(S)
    part = torch.empty(row_blocks * splits if with_values else 1, s_pad, dtype=torch.float64, device=a.device)
    # per (split, K or U, bandwidth, row) float64 sums of the values (written by the first feature chunk only)
    scratch = torch.zeros(splits * 2 * S * n_pad if with_values else 1, dtype=torch.float64, device=a.device)
    # per (split, feature, row) float64 sums of the da terms
    acc = torch.zeros(splits * d * n_pad, dtype=torch.float64, device=a.device)
    with _device_guard(a.device):
        _imq_rowpass_kernel[(row_blocks, splits)](
            aT,
            wap,
            bT,
            wbp,
            _inv_bw(bw, cdt),
            h.to(cdt),
            part,
            scratch,
            acc,
            da_out,
            dwa_out,
            N,
            d,
            n_pad,
            m_pad,
            m_cols,
            d_pad,
            group,
            float(dw_scale),
            float(da_scale),
            tiles * bj,
            S,
            MASK_GROUPS=bool(mask_groups),
            WITH_VALUES=bool(with_values),
            FAST_RCP=_fast_rcp(a.device, cdt),
            XMAX=_xmax(cdt),
            BLOCK_I=bi,
            BLOCK_J=bj,
            BLOCK_D=bd,
            S_PAD=s_pad,
            num_warps=cfg.num_warps,
            maxnreg=cfg.maxnreg,
        )
    values = part[:, :S].sum(dim=0) if with_values else None
    if splits == 1:
        return values, da_out, dwa_out
    return values, da_out.sum(dim=0).to(a.dtype), dwa_out.sum(dim=0).to(wa.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Launchers (the op contracts)
# ---------------------------------------------------------------------------------------------------------------


def imq_self(
    a: torch.Tensor,
    wa: torch.Tensor,
    bw: torch.Tensor,
    group: int,
    unbiased: bool,
    *,
    block_i: Optional[int] = None,
    block_j: Optional[int] = None,
    num_warps: Optional[int] = None,
    col_splits: Optional[int] = None,
) -> torch.Tensor:
    """``self_s = sum_{i, j allowed} wa_i wa_j C_s / (C_s + ||a_i - a_j||^2)``, ``(S,)`` float64.

    Allowed pairs: ``i // group != j // group`` when ``unbiased``, every ordered pair (``i == j`` included) when
    biased. Evaluates the pairs ``j >= i`` only (symmetry)."""
    _check_common(a, wa, bw)
    _check_group(group, unbiased, a.shape[0])
    cfg = _Config("values", block_i, block_j, num_warps, col_splits, a.dtype == torch.float64)
    return _values(a, wa, a, wa, bw, True, group, unbiased, cfg)


def imq_cross(
    a: torch.Tensor,
    wa: torch.Tensor,
    b: torch.Tensor,
    wb: torch.Tensor,
    bw: torch.Tensor,
    *,
    block_i: Optional[int] = None,
    block_j: Optional[int] = None,
    num_warps: Optional[int] = None,
    col_splits: Optional[int] = None,
) -> torch.Tensor:
    """``cross_s = sum_{i, j} wa_i wb_j C_s / (C_s + ||a_i - b_j||^2)``, ``(S,)`` float64."""
    _check_cross(a, wa, b, wb, bw)
    cfg = _Config("values", block_i, block_j, num_warps, col_splits, a.dtype == torch.float64)
    return _values(a, wa, b, wb, bw, False, 1, False, cfg)


def imq_self_grad(
    h: torch.Tensor,
    a: torch.Tensor,
    wa: torch.Tensor,
    bw: torch.Tensor,
    group: int,
    unbiased: bool,
    *,
    block_i: Optional[int] = None,
    block_j: Optional[int] = None,
    num_warps: Optional[int] = None,
    col_splits: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, da, dwa)``: ``self_s`` and the gradients of ``L = sum_s h_s self_s`` (``da`` like ``a``,
    ``dwa`` like ``wa``), in one deterministic row pass."""
    _, S = _check_common(a, wa, bw)
    _check_group(group, unbiased, a.shape[0])
    _check_h(h, S, a.device)
    cfg = _Config("grad", block_i, block_j, num_warps, col_splits, a.dtype == torch.float64)
    return _rowpass(h, a, wa, a, wa, bw, group, bool(unbiased), True, 2.0, 4.0, cfg)


def imq_cross_grad(
    h: torch.Tensor,
    a: torch.Tensor,
    wa: torch.Tensor,
    b: torch.Tensor,
    wb: torch.Tensor,
    bw: torch.Tensor,
    b_grad: bool = True,
    *,
    block_i: Optional[int] = None,
    block_j: Optional[int] = None,
    num_warps: Optional[int] = None,
    col_splits: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, da, dwa, db, dwb)``: ``cross_s`` and the gradients of ``L = sum_s h_s cross_s``; two row passes
    (rows of ``a`` against ``b``, then rows of ``b`` against ``a``), no atomics.  ``b_grad=False`` skips the
    second pass and returns zeros for ``db`` and ``dwb``."""
    _, S = _check_cross(a, wa, b, wb, bw)
    _check_h(h, S, a.device)
    cfg = _Config("grad", block_i, block_j, num_warps, col_splits, a.dtype == torch.float64)
    values, da, dwa = _rowpass(h, a, wa, b, wb, bw, 1, False, True, 1.0, 2.0, cfg)
    if not b_grad:
        return values, da, dwa, torch.zeros_like(b), torch.zeros_like(wb)
    _, db, dwb = _rowpass(h, b, wb, a, wa, bw, 1, False, False, 1.0, 2.0, cfg)
    return values, da, dwa, db, dwb
