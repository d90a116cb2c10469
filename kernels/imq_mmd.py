"""Triton kernels and host launchers of the multi-bandwidth IMQ MMD (contract: ``docs/ARCHITECTURE.md``).

Four launchers, plain functions (no autograd; ``gmwae_fast/ops/imq_mmd.py`` wraps them as custom ops)::

    imq_self(a, wa, bw, group, unbiased)            -> values (S,) float64
    imq_cross(a, wa, b, wb, bw)                     -> values (S,) float64
    imq_self_grad(h, a, wa, bw, group, unbiased)    -> (values, da, dwa)
    imq_cross_grad(h, a, wa, b, wb, bw)             -> (values, da, dwa, db, dwb)

With ``k_s(D) = C_s / (C_s + D)`` and ``D = sum_k (a_ik - b_jk)^2``.

Per-pair math (compute dtype: float32, float64 for float64 points)
-----------------------------------------------------------------
* Distances are built in registers feature by feature, ``D += (a_ik - b_jk)^2`` (loop over ``d`` in masked steps of
  the constexpr ``BLOCK_D``, unrolled); the ``|a|^2 + |b|^2 - 2ab`` expansion is never used.
* Every bandwidth is evaluated on the same register tile (runtime loop over ``S``, ``1 / C_s`` loaded as a
  scalar), one reciprocal per pair and bandwidth: ``k = 1 / (1 + D * ic)`` with ``ic = 1 / C_s`` rounded once to the
  compute dtype. (``C + D`` would be rounded at the binade of ``D`` with the fixed low bits of ``C``, a bias that
  does not average out; ``1 + D * ic`` only rounds ``D``-dependent bits. Using ``ic`` amounts to the bandwidth
  ``1 / ic``, within 6e-8 of ``C_s``, the same in every term, so the MMD combination is unaffected.)
* Centring, for float64-grade sums of float32 pairs: with a per-tile reference distance ``D0`` (weighted mean of the
  tile's distances), ``kappa = 1 / (1 + D0 ic)`` and ``e = D0 - D``, exactly ``k = kappa (1 + ic e k)``, hence
  ``k = kappa + kappa^2 ic e + kappa^2 ic^2 e^2 k``. Per tile, the pair-weight total ``W`` and ``A1 = sum w e`` are
  formed in float64 (once per tile, not per bandwidth); only ``T = sum w e^2 k`` is summed from compute-dtype pairs
  (row sums over a tile, then float64 across rows, tiles and programs), and it enters multiplied by the small
  ``kappa^2 ic^2``: ``sum w k = kappa (W + kappa ic (A1 + ic T))``. The per-pair rounding of ``k`` then only
  touches the small part, which is what brings float32 inputs to a few 1e-6 relative error on
  ``MMD2 = self_x/den + self_y/den - 2 cross`` even when it is ~1e-6 (``C / (C + D)`` summed per tile in float32
  measured up to 3e-4 on the same data). Cost: one float64 pass over each tile, amortised over the ``S`` bandwidths.
  The gradient pass centres ``phi`` to first order the same way (``dwa``).

Kernels
-------
* ``_imq_values_kernel``: one program per ``BLOCK_M x BLOCK_N`` tile pair, writes its ``S`` float64 partials to a
  small ``(programs, S)`` buffer that the host sums in float64. Self terms visit only the upper triangle of tiles
  (lower programs exit at once), off-diagonal tiles count twice; diagonal tiles handle ``i == j`` (biased,
  ``k_s(0) = 1``) and same-group exclusion (unbiased: allowed iff ``i // G != j // G``) by masks on global indices,
  only on tiles whose group ranges overlap.
* ``_imq_rowpass_kernel``: deterministic gradient pass, no atomics. A program owns ``BLOCK_M`` rows of ``a`` (and a
  ``BLOCK_G`` chunk of its features for ``da``) and loops over all of ``b``. Per bandwidth the one ``k`` feeds
  ``phi = sum_s h_s k_s`` (centred as above) and ``-psi = sum_s h_s ic_s k_s^2`` (and the values); per column tile
  it then accumulates ``sum_j v_j phi_ij`` (``dwa``), ``sum_j v_j psi_ij`` and ``sum_j v_j psi_ij (b_j - o)`` (a
  ``tl.dot`` in full fp32 / fp64 precision) in registers, with ``o`` the program's first row of ``a``, a shift that
  keeps ``(a_i - o) sum psi - sum psi (b_j - o)`` free of the cancellation a large common offset would cause.
  Gradients of ``b`` (cross) are a second row pass with the roles swapped. The values come from the same pass
  (per-program partials, summed in float64 on the host). When there are too few row blocks to fill the GPU
  (n = 4096, ``BLOCK_M = 64``: 64 blocks for 132 SMs), the columns are split over a third grid axis: each split
  writes its partial ``da`` / ``dwa`` to a float workspace that the host sums in a fixed order (deterministic).

Block sizes are module defaults (:data:`DEFAULTS`, chosen for a GPU such as an H100; not yet tuned on one) and can
be overridden per call with the keyword-only ``block_m``, ``block_n``, ``num_warps`` arguments of every launcher
(powers of two >= 16; the self values kernel uses square ``block_m`` tiles), and ``col_splits`` of the gradient
launchers.

CPU tensors run through the Triton interpreter (``TRITON_INTERPRET=1`` set before Triton is imported).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["imq_self", "imq_cross", "imq_self_grad", "imq_cross_grad", "DEFAULTS"]

#: Default launch configuration (GPU oriented). ``values_*``: tile-pair values kernel; ``grad_*``: row-pass kernel.
#: ``block_d``: features unrolled per step of the distance loop; ``block_g``: widest ``da`` feature chunk a program
#: keeps in registers (larger ``d`` is split over a second grid axis, recomputing the distances);
#: ``grad_programs_per_sm``: programs per multiprocessor the column split of the row pass aims at.
DEFAULTS = {
    "values_block_m": 64,
    "values_block_n": 64,
    "values_num_warps": 4,
    "grad_block_m": 64,
    "grad_block_n": 64,
    "grad_num_warps": 8,
    "block_d": 16,
    "block_g": 128,
    "grad_programs_per_sm": 2,
}

_POINT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _sq_dist_tile(a_ptr, a_off, rmask, b_ptr, b_off, cmask, n_feat,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CDT: tl.constexpr):
    """``D[i, j] = sum_k (a[i, k] - b[j, k])^2`` for one tile, in the compute dtype, built feature by feature.

    ``a_off`` / ``b_off`` are the row offsets (in elements) of the tile's rows; features past ``n_feat`` are masked
    (they load 0 on both sides and add nothing)."""
    dist = tl.zeros([BLOCK_M, BLOCK_N], dtype=CDT)
    for k0 in range(0, n_feat, BLOCK_D):
        for kk in tl.static_range(BLOCK_D):
            f = k0 + kk
            fm = f < n_feat
            av = tl.load(a_ptr + a_off + f, mask=rmask & fm, other=0.0).to(CDT)
            bv = tl.load(b_ptr + b_off + f, mask=cmask & fm, other=0.0).to(CDT)
            diff = av[:, None] - bv[None, :]
            dist += diff * diff
    return dist


@triton.jit
def _tile_weights(dist, wa, wb, rows, cols, group, MASK_GROUPS: tl.constexpr, NEED_A1: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CDT: tl.constexpr):
    """Weights of a tile and its centring data.

    Returns ``wmat`` ``[BM, BN]`` (column weights, same-group pairs zeroed when ``MASK_GROUPS``, compute dtype),
    ``roww = sum_j wmat_ij`` (float64, exact), the reference distance ``d0`` (``|wa_i wb_j|``-weighted mean of the
    tile's distances, compute dtype; any value would do, the mean keeps the centred terms small) and, when
    ``NEED_A1``, ``a1r = sum_j wmat_ij (d0 - D_ij)`` in float64. The masked path runs only on tiles whose row and
    column group ranges overlap (the band around the diagonal)."""
    aw = tl.abs(wa)[:, None] * tl.abs(wb)[None, :]
    sw = tl.sum(tl.sum(aw, axis=1), axis=0)
    swd = tl.sum(tl.sum(aw * dist, axis=1), axis=0)
    d0 = tl.where(sw > 0, tl.maximum(swd / tl.where(sw > 0, sw, 1.0), 0.0), 0.0)
    wb64 = wb.to(tl.float64)
    if NEED_A1:
        dd64 = d0.to(tl.float64) - dist.to(tl.float64)
    band = False
    if MASK_GROUPS:
        r0 = tl.min(rows, axis=0) // group
        r1 = tl.max(rows, axis=0) // group
        c0 = tl.min(cols, axis=0) // group
        c1 = tl.max(cols, axis=0) // group
        band = (r0 <= c1) & (c0 <= r1)
    if band:
        same = (rows // group)[:, None] == (cols // group)[None, :]
        wmat = tl.where(same, 0.0, tl.zeros([BLOCK_M, BLOCK_N], dtype=CDT) + wb[None, :])
        wm64 = tl.where(same, 0.0, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64) + wb64[None, :])
        roww = tl.sum(wm64, axis=1)
        if NEED_A1:
            a1r = tl.sum(wm64 * dd64, axis=1)
        else:
            a1r = tl.zeros([BLOCK_M], dtype=tl.float64)
    else:
        wmat = tl.zeros([BLOCK_M, BLOCK_N], dtype=CDT) + wb[None, :]
        roww = tl.zeros([BLOCK_M], dtype=tl.float64) + tl.sum(wb64, axis=0)
        if NEED_A1:
            a1r = tl.sum(dd64 * wb64[None, :], axis=1)
        else:
            a1r = tl.zeros([BLOCK_M], dtype=tl.float64)
    return wmat, roww, d0, a1r


@triton.jit
def _kappa(ic, d0):
    """``kappa = 1 / (1 + d0 * ic)`` to float64 accuracy for compute-dtype scalars (the compute-dtype reciprocal
    refined by one float64 Newton step, which is cheaper than a float64 division)."""
    k0 = (1.0 / (d0 * ic + 1.0)).to(tl.float64)
    x = d0.to(tl.float64) * ic.to(tl.float64) + 1.0
    return k0 + k0 * (1.0 - k0 * x)


@triton.jit
def _imq_values_kernel(a_ptr, wa_ptr, b_ptr, wb_ptr, inv_ptr, part_ptr,
                       N, M, n_feat, S, group,
                       SELF: tl.constexpr, MASK_GROUPS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       S_PAD: tl.constexpr):
    CDT: tl.constexpr = wa_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    num_n = tl.num_programs(1)
    sidx = tl.arange(0, S_PAD)
    smask = sidx < S
    if SELF:
        first_n = pid_m  # upper triangle of tiles only (square tiles, BLOCK_M == BLOCK_N)
    else:
        first_n = 0
    if pid_n >= first_n:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        cmask = cols < M
        wa = tl.load(wa_ptr + rows, mask=rmask, other=0.0)
        wb = tl.load(wb_ptr + cols, mask=cmask, other=0.0)
        dist = _sq_dist_tile(a_ptr, rows.to(tl.int64) * n_feat, rmask, b_ptr, cols.to(tl.int64) * n_feat, cmask,
                             n_feat, BLOCK_M, BLOCK_N, BLOCK_D, CDT)
        wmat, roww, d0, a1r = _tile_weights(dist, wa, wb, rows, cols, group, MASK_GROUPS, True,
                                            BLOCK_M, BLOCK_N, CDT)
        wa64 = wa.to(tl.float64)
        wtot = tl.sum(wa64 * roww, axis=0)   # sum of the tile's pair weights, float64
        a1 = tl.sum(wa64 * a1r, axis=0)      # sum of w_i w_j (D0 - D_ij), float64
        dd = d0 - dist
        wdd2 = (wa[:, None] * wmat) * (dd * dd)
        vals = tl.zeros([S_PAD], dtype=tl.float64)
        for s in range(S):
            ic = tl.load(inv_ptr + s)
            k = 1.0 / (dist * ic + 1.0)   # the one reciprocal per pair and bandwidth
            # sum w k = kappa W + kappa^2 ic A1 + kappa^2 ic^2 sum w (D0 - D)^2 k (see the module docstring)
            t = tl.sum(tl.sum(wdd2 * k, axis=1).to(tl.float64), axis=0)
            ic64 = ic.to(tl.float64)
            kap = _kappa(ic, d0)
            v = kap * (wtot + kap * ic64 * (a1 + ic64 * t))
            vals = tl.where(sidx == s, vals + v, vals)
        if SELF:
            # off-diagonal tiles stand for both orders (i, j) and (j, i)
            vals = vals * (2.0 - (pid_n == pid_m).to(tl.float64))
        tl.store(part_ptr + (pid_m * num_n + pid_n) * S + sidx, vals, mask=smask)


@triton.jit
def _imq_rowpass_kernel(a_ptr, wa_ptr, b_ptr, wb_ptr, inv_ptr, h_ptr,
                        part_ptr, da_ptr, dwa_ptr,
                        N, M, n_feat, S, group, dw_scale, da_scale, cols_per_split,
                        MASK_GROUPS: tl.constexpr, WITH_VALUES: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_G: tl.constexpr, S_PAD: tl.constexpr):
    CDT: tl.constexpr = wa_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_z = tl.program_id(2)   # column split: this program covers columns [col_lo, col_hi) of b
    num_z = tl.num_programs(2)
    col_lo = pid_z * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    a_off = rows.to(tl.int64) * n_feat
    wa = tl.load(wa_ptr + rows, mask=rmask, other=0.0)
    wa64 = wa.to(tl.float64)
    gcols = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = gcols < n_feat
    # shift o = first row of this block (always a valid row): gradients use (a_i - o) and (b_j - o)
    o = tl.load(a_ptr + (pid_m * BLOCK_M).to(tl.int64) * n_feat + gcols, mask=gmask, other=0.0).to(CDT)
    sidx = tl.arange(0, S_PAD)

    vals = tl.zeros([S_PAD], dtype=tl.float64)
    sum_phi = tl.zeros([BLOCK_M], dtype=tl.float64)   # sum_j v_j phi_ij
    sum_psi = tl.zeros([BLOCK_M], dtype=tl.float64)   # -sum_j v_j psi_ij
    acc_g = tl.zeros([BLOCK_M, BLOCK_G], dtype=CDT)   # -sum_j v_j psi_ij (b_j - o)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < col_hi
        b_off = cols.to(tl.int64) * n_feat
        wb = tl.load(wb_ptr + cols, mask=cmask, other=0.0)
        dist = _sq_dist_tile(a_ptr, a_off, rmask, b_ptr, b_off, cmask, n_feat, BLOCK_M, BLOCK_N, BLOCK_D, CDT)
        wmat, roww, d0, a1r = _tile_weights(dist, wa, wb, rows, cols, group, MASK_GROUPS, WITH_VALUES,
                                            BLOCK_M, BLOCK_N, CDT)
        dd = d0 - dist
        if WITH_VALUES:
            wtot = tl.sum(wa64 * roww, axis=0)
            a1 = tl.sum(wa64 * a1r, axis=0)
            wdd2 = (wa[:, None] * wmat) * (dd * dd)
        # phi = phi0 + (D0 - D) phi_c with phi0 = sum_s h_s kappa_s (float64) and phi_c = sum_s h_s kappa_s ic_s k_s;
        # -psi = sum_s h_s ic_s k_s^2 (k_s = C_s / (C_s + D), ic_s = 1 / C_s)
        phi0 = tl.zeros([1], dtype=tl.float64)
        phi_c = tl.zeros([BLOCK_M, BLOCK_N], dtype=CDT)
        npsi = tl.zeros([BLOCK_M, BLOCK_N], dtype=CDT)
        for s in range(S):
            ic = tl.load(inv_ptr + s)
            ic64 = ic.to(tl.float64)
            h64 = tl.load(h_ptr + s)
            kap = _kappa(ic, d0)
            hk = h64 * kap
            phi0 += hk
            k = 1.0 / (dist * ic + 1.0)   # the one reciprocal per pair and bandwidth, reused for k and k'
            phi_c += (hk * ic64).to(CDT) * k
            t = (h64 * ic64).to(CDT) * k
            npsi += t * k
            if WITH_VALUES:
                tv = tl.sum(tl.sum(wdd2 * k, axis=1).to(tl.float64), axis=0)
                v = kap * (wtot + kap * ic64 * (a1 + ic64 * tv))
                vals = tl.where(sidx == s, vals + v, vals)
        sum_phi += tl.sum(phi0, axis=0) * roww + tl.sum(wmat * dd * phi_c, axis=1).to(tl.float64)
        p = wmat * npsi
        sum_psi += tl.sum(p, axis=1).to(tl.float64)
        bg = tl.load(b_ptr + b_off[:, None] + gcols[None, :], mask=cmask[:, None] & gmask[None, :], other=0.0)
        bg = bg.to(CDT) - o[None, :]
        acc_g = tl.dot(p, bg, acc_g, input_precision="ieee")

    # da_i = da_scale * w_i * sum_j v_j psi_ij (a_i - b_j) = da_scale * w_i * (acc_g - (a_i - o) * sum_psi)
    ag = tl.load(a_ptr + a_off[:, None] + gcols[None, :], mask=rmask[:, None] & gmask[None, :], other=0.0)
    ag = ag.to(CDT) - o[None, :]
    grad = acc_g.to(tl.float64) - ag.to(tl.float64) * sum_psi[:, None]
    grad = grad * (da_scale * wa64)[:, None]
    # outputs of split z at da[z], dwa[z] (the final tensors when there is one split, else float workspaces);
    # via the compute dtype: float64 -> bfloat16 / float16 is not a direct conversion everywhere
    z_off = pid_z.to(tl.int64) * N
    tl.store(da_ptr + z_off * n_feat + a_off[:, None] + gcols[None, :], grad.to(CDT).to(da_ptr.dtype.element_ty),
             mask=rmask[:, None] & gmask[None, :])
    first = pid_g == 0
    tl.store(dwa_ptr + z_off + rows, (sum_phi * dw_scale).to(dwa_ptr.dtype.element_ty), mask=rmask & first)
    if WITH_VALUES:
        tl.store(part_ptr + (pid_m * num_z + pid_z) * S + sidx, vals, mask=(sidx < S) & first)


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


def _pow2_block(name: str, value: int) -> int:
    value = int(value)
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    return value


def _values_config(block_m, block_n, num_warps):
    bm = _pow2_block("block_m", DEFAULTS["values_block_m"] if block_m is None else block_m)
    bn = _pow2_block("block_n", DEFAULTS["values_block_n"] if block_n is None else block_n)
    nw = DEFAULTS["values_num_warps"] if num_warps is None else int(num_warps)
    return bm, bn, nw


def _grad_config(block_m, block_n, num_warps):
    bm = _pow2_block("block_m", DEFAULTS["grad_block_m"] if block_m is None else block_m)
    bn = _pow2_block("block_n", DEFAULTS["grad_block_n"] if block_n is None else block_n)
    nw = DEFAULTS["grad_num_warps"] if num_warps is None else int(num_warps)
    return bm, bn, nw


def _block_d(d: int) -> int:
    """Features unrolled per step of the distance loop: chunks of at most DEFAULTS['block_d'], sized so the masked
    tail wastes as little as possible (d = 10 -> one step of 10; d = 33 -> 3 steps of 11; d = 64 -> 4 x 16)."""
    cap = max(1, int(DEFAULTS["block_d"]))
    steps = max(1, triton.cdiv(d, cap))
    return max(1, triton.cdiv(d, steps))


def _block_g(d: int) -> int:
    return min(max(16, triton.next_power_of_2(max(d, 1))), max(16, int(DEFAULTS["block_g"])))


def _s_pad(S: int) -> int:
    return max(1, triton.next_power_of_2(S))


def _inv_bw(bw: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """``1 / C_s`` in the compute dtype (the kernels evaluate ``k = 1 / (1 + D / C)``)."""
    return torch.reciprocal(bw).to(cdt)


def _values(a, wa, b, wb, bw, self_: bool, group: int, unbiased: bool, cfg) -> torch.Tensor:
    N, d = a.shape
    M = b.shape[0]
    S = bw.shape[0]
    if N == 0 or M == 0 or S == 0:
        return torch.zeros(S, dtype=torch.float64, device=a.device)
    bm, bn, nw = cfg
    if self_:
        bn = bm
    grid = (triton.cdiv(N, bm), triton.cdiv(M, bn))
    part = torch.zeros(grid[0] * grid[1], S, dtype=torch.float64, device=a.device)
    with _device_guard(a.device):
        _imq_values_kernel[grid](
            a, wa, b, wb, _inv_bw(bw, wa.dtype), part, N, M, d, S, group,
            SELF=self_, MASK_GROUPS=bool(self_ and unbiased),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_d(d), S_PAD=_s_pad(S), num_warps=nw)
    return part.sum(dim=0)


@functools.lru_cache(maxsize=None)
def _num_sms(device_type: str, index: Optional[int]) -> int:
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()
                                                ).multi_processor_count
    return 1


def _col_splits(device: torch.device, programs: int, col_tiles: int, col_splits: Optional[int]) -> int:
    """How many column ranges a row pass is split into: enough programs to fill the GPU
    (``DEFAULTS['grad_programs_per_sm']`` per multiprocessor) when there are few row blocks, e.g. n = 4096 with
    ``block_m = 64`` gives 64 row blocks for 132 SMs on an H100. Partial results are summed in a fixed order."""
    if col_splits is None:
        target = int(DEFAULTS["grad_programs_per_sm"]) * _num_sms(device.type, device.index)
        col_splits = triton.cdiv(target, programs)
    col_splits = int(col_splits)
    if col_splits < 1:
        raise ValueError(f"col_splits must be >= 1, got {col_splits}")
    return max(1, min(col_splits, col_tiles))


def _rowpass(h, a, wa, b, wb, bw, group: int, mask_groups: bool, with_values: bool,
             dw_scale: float, da_scale: float, cfg, col_splits: Optional[int]):
    """One deterministic row pass: gradients of the rows of ``a`` against all of ``b`` (and the values)."""
    N, d = a.shape
    M = b.shape[0]
    S = bw.shape[0]
    if N == 0 or M == 0 or S == 0:
        return (torch.zeros(S, dtype=torch.float64, device=a.device), torch.zeros_like(a), torch.zeros_like(wa))
    bm, bn, nw = cfg
    bg = _block_g(d)
    row_blocks = triton.cdiv(N, bm)
    d_chunks = max(1, triton.cdiv(d, bg))
    col_tiles = triton.cdiv(M, bn)
    splits = _col_splits(a.device, row_blocks * d_chunks, col_tiles, col_splits)
    tiles_per_split = triton.cdiv(col_tiles, splits)
    splits = triton.cdiv(col_tiles, tiles_per_split)   # no empty split
    if splits == 1:
        da_out, dwa_out = torch.empty_like(a), torch.empty_like(wa)
    else:
        da_out = torch.empty(splits, N, d, dtype=wa.dtype, device=a.device)
        dwa_out = torch.empty(splits, N, dtype=torch.float64, device=a.device)
    grid = (row_blocks, d_chunks, splits)
    part = torch.empty(row_blocks * splits if with_values else 1, S, dtype=torch.float64, device=a.device)
    with _device_guard(a.device):
        _imq_rowpass_kernel[grid](
            a, wa, b, wb, _inv_bw(bw, wa.dtype), h, part, da_out, dwa_out, N, M, d, S, group,
            float(dw_scale), float(da_scale), tiles_per_split * bn,
            MASK_GROUPS=bool(mask_groups), WITH_VALUES=bool(with_values),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_d(d), BLOCK_G=bg, S_PAD=_s_pad(S), num_warps=nw)
    values = part.sum(dim=0) if with_values else None
    if splits == 1:
        return values, da_out, dwa_out
    return values, da_out.sum(dim=0).to(a.dtype), dwa_out.sum(dim=0).to(wa.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Launchers (the op contracts)
# ---------------------------------------------------------------------------------------------------------------

def imq_self(a: torch.Tensor, wa: torch.Tensor, bw: torch.Tensor, group: int, unbiased: bool, *,
             block_m: Optional[int] = None, block_n: Optional[int] = None,
             num_warps: Optional[int] = None) -> torch.Tensor:
    """``self_s = sum_{i, j allowed} wa_i wa_j C_s / (C_s + ||a_i - a_j||^2)``, ``(S,)`` float64.

    Allowed pairs: ``i // group != j // group`` when ``unbiased``, every ordered pair (``i == j`` included) when
    biased. Square tiles of ``block_m`` (``block_n`` is ignored: the symmetric tile grid needs square tiles)."""
    _check_common(a, wa, bw)
    _check_group(group, unbiased, a.shape[0])
    cfg = _values_config(block_m, block_n, num_warps)
    return _values(a, wa, a, wa, bw, True, group, unbiased, cfg)


def imq_cross(a: torch.Tensor, wa: torch.Tensor, b: torch.Tensor, wb: torch.Tensor, bw: torch.Tensor, *,
              block_m: Optional[int] = None, block_n: Optional[int] = None,
              num_warps: Optional[int] = None) -> torch.Tensor:
    """``cross_s = sum_{i, j} wa_i wb_j C_s / (C_s + ||a_i - b_j||^2)``, ``(S,)`` float64."""
    _check_cross(a, wa, b, wb, bw)
    cfg = _values_config(block_m, block_n, num_warps)
    return _values(a, wa, b, wb, bw, False, 1, False, cfg)


def imq_self_grad(h: torch.Tensor, a: torch.Tensor, wa: torch.Tensor, bw: torch.Tensor, group: int,
                  unbiased: bool, *, block_m: Optional[int] = None, block_n: Optional[int] = None,
                  num_warps: Optional[int] = None, col_splits: Optional[int] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, da, dwa)``: ``self_s`` and the gradients of ``L = sum_s h_s self_s`` (``da`` like ``a``,
    ``dwa`` like ``wa``), in one deterministic row pass (``col_splits``: column ranges, default from the GPU size)."""
    _, S = _check_common(a, wa, bw)
    _check_group(group, unbiased, a.shape[0])
    _check_h(h, S, a.device)
    cfg = _grad_config(block_m, block_n, num_warps)
    values, da, dwa = _rowpass(h, a, wa, a, wa, bw, group, bool(unbiased), True, 2.0, 4.0, cfg, col_splits)
    return values, da, dwa


def imq_cross_grad(h: torch.Tensor, a: torch.Tensor, wa: torch.Tensor, b: torch.Tensor, wb: torch.Tensor,
                   bw: torch.Tensor, *, block_m: Optional[int] = None, block_n: Optional[int] = None,
                   num_warps: Optional[int] = None, col_splits: Optional[int] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, da, dwa, db, dwb)``: ``cross_s`` and the gradients of ``L = sum_s h_s cross_s``; two row passes
    (rows of ``a`` against ``b``, then rows of ``b`` against ``a``), no atomics."""
    _, S = _check_cross(a, wa, b, wb, bw)
    _check_h(h, S, a.device)
    cfg = _grad_config(block_m, block_n, num_warps)
    values, da, dwa = _rowpass(h, a, wa, b, wb, bw, 1, False, True, 1.0, 2.0, cfg, col_splits)
    _, db, dwb = _rowpass(h, b, wb, a, wa, bw, 1, False, False, 1.0, 2.0, cfg, col_splits)
    return values, da, dwa, db, dwb
