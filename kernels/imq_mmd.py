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
  ``sum_j v_j phi_ij`` (``dwa``), ``sum_j v_j psi_ij`` and ``sum_j v_j psi_ij (b_j - c)`` (``da``; one
  multiply-add chain per feature inside each thread, the feature loop unrolled over a constexpr chunk of at most
  ``block_g`` features whose accumulators stay in registers) with ``c`` a common centre of the points (host-side
  shifted copies keep ``(a_i - c) sum psi - sum psi (b_j - c)`` free of the cancellation a large common offset
  would cause). Gradients of ``b`` (cross) are a second pass with the roles swapped. When there are too few row
  blocks to fill the GPU the columns are split over programs; each split writes partial ``da`` / ``dwa`` to a
  float workspace summed by the host in a fixed order (deterministic). The values come from the same pass.

Per-pair math (compute dtype: float32, float64 for float64 points)
-----------------------------------------------------------------
* Distances are built in registers feature by feature, ``D += (b_jk - a_ik)^2`` (loop over ``d`` in steps of the
  constexpr ``BLOCK_D``, unrolled); the ``|a|^2 + |b|^2 - 2ab`` expansion is never used.
* All bandwidths are evaluated on the same register tile (runtime loop over ``S``, ``1 / C_s`` loaded as a scalar),
  one reciprocal per pair and bandwidth: ``k = 1 / (1 + D * ic)``, ``ic = 1 / C_s`` rounded once to the compute
  dtype, reused for ``k`` and ``k' = -ic k^2`` in the gradient pass. On CUDA the float32 reciprocal is a single
  ``rcp.approx.ftz.f32`` (one MUFU op; its <= 1 ulp error only touches the small centred part below). (``C + D``
  would be rounded at the binade of ``D`` with the fixed low bits of ``C``, a bias that does not average out;
  ``1 + D * ic`` only rounds ``D``-dependent bits. Using ``ic`` amounts to the bandwidth ``C' = 1 / ic``, within
  6e-8 of ``C_s``, the same in every term, so the MMD combination is unaffected.)
* Centring, for float64-grade sums of float32 pairs: with a reference distance ``D0`` (the host's weighted mean
  of all pair distances, computed in O((N + M) d) and rounded to 8 significant bits so that ``D0 - D`` rounds
  without bias), ``kappa = 1 / (1 + D0 ic)`` and ``e = D0 - D``, exactly ``k = kappa (1 + ic e k)``, hence
  ``k = kappa + kappa^2 ic e + kappa^2 ic^2 e^2 k``. For the pairs with ``D <= 4 D0`` (where
  ``|kappa ic e| <= 3``), the pair-weight total ``W`` and ``A1 = sum w e`` are formed in float64 (once per tile,
  not per bandwidth), and only ``T = sum w e^2 k`` is summed from compute-dtype pairs (over ``j`` inside a thread,
  then float64 across tiles in a per-row scratch and across threads); it enters multiplied by the small
  ``kappa^2 ic^2``: ``sum w k = kappa (W + kappa ic (A1 + ic T))``. Rounding of ``k`` then only touches the small
  part: float32 inputs reach a few 1e-6 relative error on ``MMD2 = self_x/den + self_y/den - 2 cross`` even when
  it is ~1e-6 (``C / (C + D)`` summed per tile in float32 measured up to 3e-4 on the same data). Pairs beyond
  ``4 D0`` (outliers, where the expansion would amplify rounding by ``(kappa ic e)^2``) are summed directly,
  ``F = sum w k``, and enter ``T`` as ``(C' + D0)^2 F``. The gradient sums (``phi``, ``psi``) are stored in the
  compute dtype and are summed directly.

Block sizes are module defaults (:data:`DEFAULTS`, chosen for a GPU such as an H100 from the generated SASS: no
register spills for float32 at S = 15, d = 64; not yet timed on one) and can be overridden per call with the keyword-only ``block_i``, ``block_j``, ``num_warps`` and
``col_splits`` arguments of every launcher.

CPU tensors run through the Triton interpreter (``TRITON_INTERPRET=1`` set before Triton is imported).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["imq_self", "imq_cross", "imq_self_grad", "imq_cross_grad", "DEFAULTS"]

#: Default launch configuration (GPU oriented). ``*_block_i``: points of ``a`` per program (``32 * num_warps``:
#: one per thread); ``*_block_j``: points of ``b`` per tile (held by every thread); ``block_d``: features unrolled
#: per step of the distance loop; ``block_g``: widest ``da`` feature chunk a gradient program keeps in registers
#: (larger ``d`` is split over a grid axis, recomputing the distances); ``programs_per_sm`` and
#: ``min_tiles_per_program``: how far the column range of a row block is split over programs.
DEFAULTS = {
    "values_block_i": 128,
    "values_block_j": 16,
    "grad_block_i": 64,
    "grad_block_j": 16,
    "block_d": 16,
    "block_g": 64,
    "programs_per_sm": 4,
    "min_tiles_per_program": 4,
    # float64 points: doubles take two registers; smaller tiles keep the kernels from spilling as much
    "values_block_j_f64": 8,
    "grad_block_j_f64": 8,
    "block_g_f64": 32,
}

_POINT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _sq_dist(aT_ptr, rows, n_pad, bT_ptr, cols, m_pad, n_feat_pad,
             BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, CDT: tl.constexpr):
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
    """``1 / y`` for ``y >= 1``: one ``rcp.approx.ftz.f32`` on CUDA (float32), else a division."""
    if FAST_RCP:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [y], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / y


@triton.jit
def _tile_weights(wb, wb64, rows, cols, group, row_hi,
                  SELF_TRI: tl.constexpr, MASK_GROUPS: tl.constexpr, UNBIASED: tl.constexpr,
                  BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, CDT: tl.constexpr):
    """Column weights of a ``[BLOCK_J, BLOCK_I]`` tile as ``wmat`` (compute dtype) and ``wm64`` (float64).

    ``SELF_TRI``: symmetric self values, pairs ``j > i`` weigh ``2 wb_j``, ``j == i`` weighs ``wb_j`` (biased) and
    ``j < i`` nothing. ``MASK_GROUPS``: pairs of one group (``i // group == j // group``) weigh nothing. The masks
    are evaluated only on tiles that can contain such pairs (``row_hi`` = last row of the block)."""
    if SELF_TRI:
        scale = 2.0
    else:
        scale = 1.0
    plain_w = tl.zeros([BLOCK_J, BLOCK_I], dtype=CDT) + (wb * scale)[:, None]
    plain_w64 = tl.zeros([BLOCK_J, BLOCK_I], dtype=tl.float64) + (wb64 * scale)[:, None]
    if SELF_TRI or MASK_GROUPS:
        col_lo = tl.min(cols, axis=0)
        if UNBIASED:
            cut = (row_hi // group + 1) * group   # columns >= cut share no group with the block, and are > i
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
            wm64 = factor.to(tl.float64) * wb64[:, None]
        else:
            wmat = plain_w
            wm64 = plain_w64
    else:
        wmat = plain_w
        wm64 = plain_w64
    return wmat, wm64


@triton.jit
def _tile_split(dist, d0, wmat, wm64, wa):
    """Centring data of a tile (see the module docstring). Pairs with ``D <= 4 D0`` ("near": there
    ``|kappa ic (D0 - D)| <= 3`` for every bandwidth) are summed centred; the others ("far", outliers) directly.

    Returns ``wn2 = w (D0 - D)^2`` on near pairs and ``wf = w`` on far pairs (compute dtype, ``w = wb_j wa_i``
    with the tile's masks), and per row, in float64, ``sum_j wb_j`` and ``sum_j wb_j (D0 - D_ij)`` over near pairs."""
    near = dist <= 4.0 * d0
    w = wmat * wa[None, :]
    e = d0 - dist
    wn2 = tl.where(near, w * (e * e), 0.0)   # (select after the product: an infinite far D gives no 0 * inf)
    wf = tl.where(near, 0.0, w)
    wrow = tl.sum(tl.where(near, wm64, 0.0), axis=0)
    a1row = tl.sum(tl.where(near, wm64 * (d0.to(tl.float64) - dist.to(tl.float64)), 0.0), axis=0)
    return wn2, wf, wrow, a1row


@triton.jit
def _tile_t(k, wn2, wf, cp64, d0):
    """Per row, float64: ``T_near + (C' + D0)^2 F_far`` for one bandwidth (``C' = 1 / ic``; the factor turns the
    direct far sum ``F = sum_j wf k`` into the units of ``T = sum_j wn2 k``), both summed inside each thread."""
    s2 = cp64 + d0.to(tl.float64)
    return tl.sum(wn2 * k, axis=0).to(tl.float64) + (s2 * s2) * tl.sum(wf * k, axis=0).to(tl.float64)


@triton.jit
def _finish_values(acc_t, wrow, a1row, wa64, d0, inv_ptr, sidx, S):
    """``sum w k = kappa (W + kappa ic (A1 + ic T))`` per bandwidth, float64 (see the module docstring)."""
    t = tl.sum(acc_t, axis=1)
    w = tl.sum(wa64 * wrow, axis=0)
    a1 = tl.sum(wa64 * a1row, axis=0)
    ic = tl.load(inv_ptr + sidx, mask=sidx < S, other=0.0).to(tl.float64)
    kap = 1.0 / (1.0 + d0.to(tl.float64) * ic)
    return kap * (w + kap * ic * (a1 + ic * t))


@triton.jit
def _imq_values_kernel(aT_ptr, wa_ptr, bT_ptr, wb_ptr, wb64_ptr, inv_ptr, cp_ptr, part_ptr, scratch_ptr,
                       n_pad, m_pad, m_cols, n_feat_pad, group, cols_per_prog, S, d0_arg,
                       SELF: tl.constexpr, UNBIASED: tl.constexpr, FAST_RCP: tl.constexpr,
                       BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                       S_PAD: tl.constexpr):
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
        col_lo = tl.maximum(col_lo, (row0 // BLOCK_J) * BLOCK_J)   # upper triangle j >= i only
    wa = tl.load(wa_ptr + rows)
    wa64 = wa.to(tl.float64)
    # per row and bandwidth: T (near + scaled far) in a float64 scratch row owned by this program (zeroed by the
    # host): a register array indexed by a runtime bandwidth would cost a select per element, an unrolled bandwidth
    # loop spills; each thread only ever touches its own rows (no races, fixed order)
    t_rows = scratch_ptr + ((pid_i * num_z + pid_z) * S).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    wrow = tl.zeros([BLOCK_I], dtype=tl.float64)           # per row: sum_j w_j over near pairs
    a1row = tl.zeros([BLOCK_I], dtype=tl.float64)          # per row: sum_j w_j (D0 - D_ij) over near pairs
    d0 = tl.sum(tl.zeros([1], dtype=CDT), axis=0) + d0_arg   # centring distance (host: mean distance, as float32)
    for n0 in range(col_lo, col_hi, BLOCK_J):
        cols = tl.max_contiguous(tl.multiple_of(n0 + tl.arange(0, BLOCK_J), BLOCK_J), BLOCK_J)
        wb = tl.load(wb_ptr + cols)
        wb64 = tl.load(wb64_ptr + cols)
        dist = _sq_dist(aT_ptr, rows, n_pad, bT_ptr, cols, m_pad, n_feat_pad, BLOCK_J, BLOCK_I, BLOCK_D, CDT)
        wmat, wm64 = _tile_weights(wb, wb64, rows, cols, group, row_hi, SELF, UNBIASED, UNBIASED,
                                   BLOCK_J, BLOCK_I, CDT)
        wn2, wf, wrow_t, a1row_t = _tile_split(dist, d0, wmat, wm64, wa)
        wrow += wrow_t
        a1row += a1row_t
        for s in range(S):
            ic = tl.load(inv_ptr + s)
            k = _rcp(dist * ic + 1.0, FAST_RCP)   # the one reciprocal per pair and bandwidth
            t_p = t_rows + s * BLOCK_I
            tl.store(t_p, tl.load(t_p) + _tile_t(k, wn2, wf, tl.load(cp_ptr + s), d0))
    acc_t = tl.load(t_rows[None, :] + sidx[:, None] * BLOCK_I, mask=(sidx < S)[:, None], other=0.0)
    vals = _finish_values(acc_t, wrow, a1row, wa64, d0, inv_ptr, sidx, S)
    tl.store(part_ptr + (pid_i * num_z + pid_z) * S_PAD + sidx, vals)


@triton.jit
def _imq_rowpass_kernel(aT_ptr, wa_ptr, bT_ptr, wb_ptr, wb64_ptr, aS_ptr, bS_ptr, inv_ptr, cp_ptr, hc_ptr,
                        part_ptr, scratch_ptr, da_ptr, dwa_ptr,
                        n_rows, n_feat, n_pad, m_pad, m_cols, n_feat_pad, group, dw_scale, da_scale, cols_per_prog, S,
                        d0_arg,
                        MASK_GROUPS: tl.constexpr, WITH_VALUES: tl.constexpr,
                        FAST_RCP: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, G_LOOP: tl.constexpr, S_PAD: tl.constexpr):
    CDT: tl.constexpr = wa_ptr.dtype.element_ty
    pid_i = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_z = tl.program_id(2)
    num_z = tl.num_programs(2)
    row0 = pid_i * BLOCK_I
    rows = tl.max_contiguous(tl.multiple_of(row0 + tl.arange(0, BLOCK_I), BLOCK_I), BLOCK_I)
    row_hi = row0 + BLOCK_I - 1
    sidx = tl.arange(0, S_PAD)
    gidx = tl.arange(0, BLOCK_G)
    g0 = pid_g * BLOCK_G
    col_lo = pid_z * cols_per_prog
    col_hi = tl.minimum(col_lo + cols_per_prog, m_cols)
    wa = tl.load(wa_ptr + rows)
    wa64 = wa.to(tl.float64)

    # per row and bandwidth T sums live in a float64 scratch row owned by this program (zeroed by the host): a
    # register array indexed by a runtime bandwidth would cost a select per element, an unrolled bandwidth loop
    # spills; each thread only ever touches its own rows (no races, fixed order)
    t_rows = scratch_ptr + (pid_z * S).to(tl.int64) * n_pad + rows
    first = pid_g == 0   # only the first feature chunk of a row block does the values
    wrow = tl.zeros([BLOCK_I], dtype=tl.float64)
    a1row = tl.zeros([BLOCK_I], dtype=tl.float64)
    sum_phi = tl.zeros([BLOCK_I], dtype=tl.float64)   # sum_j w_j phi_ij
    sum_psi = tl.zeros([BLOCK_I], dtype=tl.float64)   # -sum_j w_j psi_ij
    acc_g = tl.zeros([BLOCK_G, BLOCK_I], dtype=CDT)   # [g, i]: -sum_j w_j psi_ij (b_jg - c_g)
    d0 = tl.sum(tl.zeros([1], dtype=CDT), axis=0) + d0_arg   # centring distance (host: mean distance, as float32)
    for n0 in range(col_lo, col_hi, BLOCK_J):
        cols = tl.max_contiguous(tl.multiple_of(n0 + tl.arange(0, BLOCK_J), BLOCK_J), BLOCK_J)
        wb = tl.load(wb_ptr + cols)
        wb64 = tl.load(wb64_ptr + cols)
        dist = _sq_dist(aT_ptr, rows, n_pad, bT_ptr, cols, m_pad, n_feat_pad, BLOCK_J, BLOCK_I, BLOCK_D, CDT)
        wmat, wm64 = _tile_weights(wb, wb64, rows, cols, group, row_hi, False, MASK_GROUPS, True,
                                   BLOCK_J, BLOCK_I, CDT)
        if WITH_VALUES:
            wn2, wf, wrow_t, a1row_t = _tile_split(dist, d0, wmat, wm64, wa)
            wrow += wrow_t
            a1row += a1row_t
        # phi = sum_s h_s k_s and -psi = sum_s h_s ic_s k_s^2 (their sums over j are gradients, stored in the
        # compute dtype: summed directly)
        phi = tl.zeros([BLOCK_J, BLOCK_I], dtype=CDT)
        npsi = tl.zeros([BLOCK_J, BLOCK_I], dtype=CDT)
        for s in range(S):
            ic = tl.load(inv_ptr + s)
            hs = tl.load(hc_ptr + s)                     # h_s (compute dtype)
            k = _rcp(dist * ic + 1.0, FAST_RCP)   # the one reciprocal per pair and bandwidth, for k and k'
            phi += hs * k
            t = (hs * ic) * k
            npsi += t * k
            if WITH_VALUES:
                t_p = t_rows + s * n_pad
                tl.store(t_p, tl.load(t_p, mask=first, other=0.0) + _tile_t(k, wn2, wf, tl.load(cp_ptr + s), d0),
                         mask=first)
        sum_phi += tl.sum(wmat * phi, axis=0).to(tl.float64)
        p = wmat * npsi
        sum_psi += tl.sum(p, axis=0).to(tl.float64)
        # sum_j p_ji (b_jg - c_g) for this program's features g, inside each thread (c: the host's common shift)
        bs_p = bS_ptr + g0.to(tl.int64) * m_pad + cols
        for g in tl.static_range(G_LOOP):
            bv = tl.load(bs_p)
            acc_g = tl.where(gidx[:, None] == g, acc_g + tl.sum(p * bv[:, None], axis=0)[None, :], acc_g)
            bs_p += m_pad

    rmask = rows < n_rows
    # outputs of split z at da[z], dwa[z] (the final tensors when there is one split, else float workspaces)
    z_off = pid_z.to(tl.int64) * n_rows
    tl.store(dwa_ptr + z_off + rows, (sum_phi * dw_scale).to(dwa_ptr.dtype.element_ty),
             mask=rmask & first)
    # da_i = da_scale * w_i * sum_j w_j psi_ij (a_i - b_j) = da_scale * w_i * (acc_g - (a_i - c) * sum_psi)
    gcols = g0 + gidx
    ag = tl.load(aS_ptr + gcols[:, None].to(tl.int64) * n_pad + rows[None, :])
    grad = acc_g.to(tl.float64) - ag.to(tl.float64) * sum_psi[None, :]
    grad = grad * (da_scale * wa64)[None, :]
    # via the compute dtype: float64 -> bfloat16 / float16 is not a direct conversion everywhere
    tl.store(da_ptr + (z_off + rows[None, :]) * n_feat + gcols[:, None], grad.to(CDT).to(da_ptr.dtype.element_ty),
             mask=rmask[None, :] & (gcols < n_feat)[:, None])
    if WITH_VALUES:
        acc_t = tl.load(t_rows[None, :] + sidx[:, None] * n_pad, mask=(sidx < S)[:, None], other=0.0)
        vals = _finish_values(acc_t, wrow, a1row, wa64, d0, inv_ptr, sidx, S)
        tl.store(part_ptr + (pid_i * num_z + pid_z) * S_PAD + sidx, vals, mask=first)


# ---------------------------------------------------------------------------------------------------------------
# Host side: checks, configuration, launches
# ---------------------------------------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


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
        raise ValueError("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing triton "
                         "(or move the tensors to a GPU)")


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
        return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()
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
        col_splits = min(triton.cdiv(target, max(programs, 1)),
                         max(1, col_tiles // max(1, int(DEFAULTS["min_tiles_per_program"]))))
    splits = max(1, min(int(col_splits), col_tiles))
    tiles = triton.cdiv(col_tiles, splits)
    return triton.cdiv(col_tiles, tiles), tiles


def _prepare(x: torch.Tensor, w: torch.Tensor, n_pad: int, d_pad: int, cdt: torch.dtype):
    """Transposed, zero-padded copy ``(d_pad, n_pad)`` of the points in the compute dtype, and padded weights in the
    compute dtype and in float64 (padding points weigh nothing)."""
    n, d = x.shape
    xT = torch.zeros(d_pad, n_pad, dtype=cdt, device=x.device)
    xT[:d, :n] = x.t()
    wp = torch.zeros(n_pad, dtype=cdt, device=x.device)
    wp[:n] = w
    return xT, wp, wp.to(torch.float64)


def _shifted(x: torch.Tensor, c: torch.Tensor, n_pad: int, g_pad: int, cdt: torch.dtype) -> torch.Tensor:
    """Transposed, zero-padded copy ``(g_pad, n_pad)`` of ``x - c`` (shift in float64, then the compute dtype)."""
    n, d = x.shape
    xs = torch.zeros(g_pad, n_pad, dtype=cdt, device=x.device)
    xs[:d, :n] = (x.to(torch.float64) - c).t()
    return xs


def _inv_bw(bw: torch.Tensor, cdt: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``ic = 1 / C_s`` in the compute dtype (the kernels evaluate ``k = 1 / (1 + D ic)``), and the bandwidths that
    this amounts to, ``C' = 1 / ic``, in float64."""
    ic = torch.reciprocal(bw).to(cdt)
    return ic, torch.reciprocal(ic.to(torch.float64))


def _mean_sq_distance(a: torch.Tensor, wa: torch.Tensor, b: torch.Tensor, wb: torch.Tensor) -> float:
    """Reference distance ``D0`` of the centring: the ``|w|``-weighted mean of ``||a_i - b_j||^2`` over all pairs,
    ``E|a - c|^2 + E|b - c|^2`` with ``c`` the weighted mean of ``a`` (float64, O((N + M) d)), rounded to 8
    significant bits (exact in every dtype: the kernels use the same value in the compute dtype and in float64).
    0 when not finite or without weight."""
    ua, ub = wa.abs().to(torch.float64), wb.abs().to(torch.float64)
    sa, sb = ua.sum(), ub.sum()
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    c = (ua @ a64) / sa
    d0 = (ua @ ((a64 - c) ** 2).sum(1)) / sa + (ub @ ((b64 - c) ** 2).sum(1)) / sb
    d0 = float(d0)
    if not (0.0 < d0 < 1e30):   # also NaN (no weight, non-finite points) -> 0: no centring
        return 0.0
    # 8 significant bits: then D0 - D is exact in float32 whenever D >= D0 (D is a multiple of the ulp of the
    # difference, and so is D0); with D0's full mantissa that difference would round D0's fixed low bits away, the
    # same way for every D of a binade: a bias that does not average out
    m, ex = math.frexp(d0)
    return math.ldexp(round(m * 256.0), ex - 8)


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
        aT, wap, _ = bT, wbp, wb64 = _prepare(a, wa, n_pad, d_pad, cdt)
    else:
        n_pad, m_pad = _roundup(N, bi), _roundup(M, bj)
        aT, wap, _ = _prepare(a, wa, n_pad, d_pad, cdt)
        bT, wbp, wb64 = _prepare(b, wb, m_pad, d_pad, cdt)
    row_blocks = n_pad // bi
    m_cols = _roundup(M, bj)   # columns visited (the self copy is padded further, to whole row blocks)
    splits, tiles = _col_chunks(a.device, row_blocks, m_cols // bj, cfg.col_splits)
    s_pad = _s_pad(S)
    part = torch.empty(row_blocks * splits, s_pad, dtype=torch.float64, device=a.device)
    scratch = torch.zeros(row_blocks * splits * S * bi, dtype=torch.float64, device=a.device)
    with _device_guard(a.device):
        _imq_values_kernel[(row_blocks, splits)](
            aT, wap, bT, wbp, wb64, *_inv_bw(bw, cdt), part, scratch, n_pad, m_pad, m_cols, d_pad, group, tiles * bj, S,
            _mean_sq_distance(a, wa, b, wb),
            SELF=self_, UNBIASED=bool(unbiased), FAST_RCP=_fast_rcp(a.device, cdt),
            BLOCK_I=bi, BLOCK_J=bj, BLOCK_D=bd, S_PAD=s_pad, num_warps=cfg.num_warps)
    return part[:, :S].sum(dim=0)


def _rowpass(h, a, wa, b, wb, bw, group: int, mask_groups: bool, with_values: bool,
             dw_scale: float, da_scale: float, cfg: _Config):
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
    bg = min(triton.next_power_of_2(d_pad), int(DEFAULTS["block_g_f64" if cdt == torch.float64 else "block_g"]))
    d_chunks = triton.cdiv(d_pad, bg)
    g_loop = d_pad if d_chunks == 1 else bg
    same = b is a and wb is wa
    n_pad = _roundup(N, bi)
    m_pad = n_pad if same else _roundup(M, bj)
    aT, wap, _ = _prepare(a, wa, n_pad, d_pad, cdt)
    bT, wbp, wb64 = (aT, wap, wap.to(torch.float64)) if same else _prepare(b, wb, m_pad, d_pad, cdt)
    # gradient copies shifted by a common centre (keeps (a_i - c) sum psi - sum psi (b_j - c) well conditioned),
    # features padded to whole chunks
    c = a.to(torch.float64).mean(dim=0)
    aS = _shifted(a, c, n_pad, bg * d_chunks, cdt)
    bS = aS if same else _shifted(b, c, m_pad, bg * d_chunks, cdt)
    row_blocks = n_pad // bi
    m_cols = _roundup(M, bj)   # columns visited (the self copy is padded further, to whole row blocks)
    splits, tiles = _col_chunks(a.device, row_blocks * d_chunks, m_cols // bj, cfg.col_splits)
    if splits == 1:
        da_out, dwa_out = torch.empty_like(a), torch.empty_like(wa)
    else:
        da_out = torch.empty(splits, N, d, dtype=cdt, device=a.device)
        dwa_out = torch.empty(splits, N, dtype=torch.float64, device=a.device)
    s_pad = _s_pad(S)
    part = torch.empty(row_blocks * splits if with_values else 1, s_pad, dtype=torch.float64, device=a.device)
    # per (split, bandwidth, row) float64 sums of the values (written by the first feature chunk only)
    scratch = torch.zeros(splits * S * n_pad if with_values else 1, dtype=torch.float64, device=a.device)
    with _device_guard(a.device):
        _imq_rowpass_kernel[(row_blocks, d_chunks, splits)](
            aT, wap, bT, wbp, wb64, aS, bS, *_inv_bw(bw, cdt), h.to(cdt), part, scratch, da_out, dwa_out,
            N, d, n_pad, m_pad, m_cols, d_pad, group, float(dw_scale), float(da_scale), tiles * bj, S,
            _mean_sq_distance(a, wa, b, wb) if with_values else 0.0,
            MASK_GROUPS=bool(mask_groups), WITH_VALUES=bool(with_values), FAST_RCP=_fast_rcp(a.device, cdt),
            BLOCK_I=bi, BLOCK_J=bj, BLOCK_D=bd, BLOCK_G=bg, G_LOOP=g_loop, S_PAD=s_pad, num_warps=cfg.num_warps)
    values = part[:, :S].sum(dim=0) if with_values else None
    if splits == 1:
        return values, da_out, dwa_out
    return values, da_out.sum(dim=0).to(a.dtype), dwa_out.sum(dim=0).to(wa.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Launchers (the op contracts)
# ---------------------------------------------------------------------------------------------------------------

def imq_self(a: torch.Tensor, wa: torch.Tensor, bw: torch.Tensor, group: int, unbiased: bool, *,
             block_i: Optional[int] = None, block_j: Optional[int] = None, num_warps: Optional[int] = None,
             col_splits: Optional[int] = None) -> torch.Tensor:
    """``self_s = sum_{i, j allowed} wa_i wa_j C_s / (C_s + ||a_i - a_j||^2)``, ``(S,)`` float64.

    Allowed pairs: ``i // group != j // group`` when ``unbiased``, every ordered pair (``i == j`` included) when
    biased. Evaluates the pairs ``j >= i`` only (symmetry)."""
    _check_common(a, wa, bw)
    _check_group(group, unbiased, a.shape[0])
    cfg = _Config("values", block_i, block_j, num_warps, col_splits, a.dtype == torch.float64)
    return _values(a, wa, a, wa, bw, True, group, unbiased, cfg)


def imq_cross(a: torch.Tensor, wa: torch.Tensor, b: torch.Tensor, wb: torch.Tensor, bw: torch.Tensor, *,
              block_i: Optional[int] = None, block_j: Optional[int] = None, num_warps: Optional[int] = None,
              col_splits: Optional[int] = None) -> torch.Tensor:
    """``cross_s = sum_{i, j} wa_i wb_j C_s / (C_s + ||a_i - b_j||^2)``, ``(S,)`` float64."""
    _check_cross(a, wa, b, wb, bw)
    cfg = _Config("values", block_i, block_j, num_warps, col_splits, a.dtype == torch.float64)
    return _values(a, wa, b, wb, bw, False, 1, False, cfg)


def imq_self_grad(h: torch.Tensor, a: torch.Tensor, wa: torch.Tensor, bw: torch.Tensor, group: int,
                  unbiased: bool, *, block_i: Optional[int] = None, block_j: Optional[int] = None,
                  num_warps: Optional[int] = None, col_splits: Optional[int] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, da, dwa)``: ``self_s`` and the gradients of ``L = sum_s h_s self_s`` (``da`` like ``a``,
    ``dwa`` like ``wa``), in one deterministic row pass."""
    _, S = _check_common(a, wa, bw)
    _check_group(group, unbiased, a.shape[0])
    _check_h(h, S, a.device)
    cfg = _Config("grad", block_i, block_j, num_warps, col_splits, a.dtype == torch.float64)
    return _rowpass(h, a, wa, a, wa, bw, group, bool(unbiased), True, 2.0, 4.0, cfg)


def imq_cross_grad(h: torch.Tensor, a: torch.Tensor, wa: torch.Tensor, b: torch.Tensor, wb: torch.Tensor,
                   bw: torch.Tensor, b_grad: bool = True, *, block_i: Optional[int] = None,
                   block_j: Optional[int] = None, num_warps: Optional[int] = None, col_splits: Optional[int] = None
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
