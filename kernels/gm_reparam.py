"""Triton kernels and host launchers of the fused per-mode reparameterisation (``gmwae_fast.gm_reparameterize``).

Two launchers, plain functions (no autograd; ``gmwae_fast/ops/gm_reparam.py`` wraps them as custom ops)::

    gm_reparam(mu, sigma_raw, logits, seed, noise, activation)                   -> (z, pi)
    gm_reparam_backward(grad_z, grad_pi, sigma_raw, logits, seed, noise, activation) -> (d_sigma_raw, d_logits)

``mu``, ``sigma_raw`` (and ``noise``, ``grad_z``) are ``(B, K, d)`` of one floating dtype, ``logits`` (and
``grad_pi``) ``(B, K)``; ``seed`` is an int64 tensor with one element (on the inputs' device, read inside the
kernel, or on the CPU, read on the host) or ``None`` when ``noise`` is given. ``activation`` is ``"softplus"`` or
``"exp"``. Math is float32 (float64 for float64 inputs).

Forward: ``z = mu + act(sigma_raw) * eps`` and ``pi = softmax(logits, -1)``; backward:
``d_sigma_raw = grad_z * eps * act'(sigma_raw)`` and ``d_logits = pi * (grad_pi - sum_k grad_pi * pi)``, with ``pi``
recomputed from ``logits`` in the compute dtype (``d_mu = grad_z`` needs no kernel).

The noise stream (identical to the C++ kernels' ``csrc/philox.h``, up to the rounding of log/sin/cos)
-----------------------------------------------------------------------------------------------
Element ``i`` (row-major flat index into ``(B, K, d)``) uses counter ``c = i // 4`` and lane ``i % 4``:
``(x0, x1, x2, x3) = Philox4x32-10(counter = (c mod 2^32, c >> 32, 0, 0), key = (seed mod 2^32, seed >> 32))``,
``u_j = ((x_j >> 8) + 1/2) 2^-24`` (in ``(0, 1)``, exact in float32), Box-Muller on ``(u0, u1)`` gives lanes 0, 1
(``r cos t``, ``r sin t`` with ``r = sqrt(-2 ln u0)``, ``t = 2 pi u1``) and on ``(u2, u3)`` lanes 2, 3.
Nothing is stored: the backward regenerates ``eps`` from ``(seed, i)``.

Kernel layout: one launch per direction. Program ``p`` handles counters ``[p * BLOCK_C, (p + 1) * BLOCK_C)`` as a
``(BLOCK_C, 4)`` tile (so its ``4 * BLOCK_C`` elements are contiguous: coalesced loads and stores, one Philox call
per 4 elements) *and* softmax rows ``[p * ROWS, (p + 1) * ROWS)`` as a ``(ROWS, BLOCK_K)`` tile; the grid is the larger
of the two program counts and both parts are masked.

CPU tensors run through the Triton interpreter (``TRITON_INTERPRET=1`` set before Triton is imported).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["gm_reparam", "gm_reparam_backward", "DEFAULTS", "ACTIVATIONS"]

ACTIVATIONS = ("softplus", "exp")

#: Launch configuration. ``block_c``: Philox counters (4 elements each) per program on a GPU; ``interp_block_c``:
#: the same under the interpreter (fewer, larger programs run faster there); ``tile``: at most this many logits per
#: program in the softmax part.
DEFAULTS = {"block_c": 256, "num_warps": 4, "interp_block_c": 4096, "tile": 4096}

#: 2^-24: a Philox word's top 24 bits, plus one half, times this is a uniform in (0, 1) (as csrc/philox.h).
_TWO_POW_M24 = tl.constexpr(5.9604644775390625e-08)


@triton.jit
def _philox_normal4(seed, c):
    """Four standard normals per counter ``c`` (int64 block), float32."""
    c_lo = (c & 0xFFFFFFFF).to(tl.uint32)
    c_hi = (c >> 32).to(tl.uint32)
    zero = c_lo * 0
    x0, x1, x2, x3 = tl.philox(seed, c_lo, c_hi, zero, zero)
    u0 = ((x0 >> 8).to(tl.float32) + 0.5) * _TWO_POW_M24
    u1 = ((x1 >> 8).to(tl.float32) + 0.5) * _TWO_POW_M24
    u2 = ((x2 >> 8).to(tl.float32) + 0.5) * _TWO_POW_M24
    u3 = ((x3 >> 8).to(tl.float32) + 0.5) * _TWO_POW_M24
    r01 = tl.sqrt(-2.0 * tl.log(u0))
    t01 = 6.283185307179586 * u1
    r23 = tl.sqrt(-2.0 * tl.log(u2))
    t23 = 6.283185307179586 * u3
    return r01 * tl.cos(t01), r01 * tl.sin(t01), r23 * tl.cos(t23), r23 * tl.sin(t23)


@triton.jit
def _eps_tile(seed, c, lane):
    """``(BLOCK_C, 4)`` tile of the stream: element ``4 c + lane``."""
    n0, n1, n2, n3 = _philox_normal4(seed, c)
    ln = lane[None, :]
    return tl.where(ln == 0, n0[:, None], tl.where(ln == 1, n1[:, None], tl.where(ln == 2, n2[:, None], n3[:, None])))


@triton.jit
def _softplus(x):
    """``log(1 + e^x)`` like ``torch.nn.functional.softplus`` (identity above 20), without cancellation."""
    t = tl.exp(-tl.abs(x))
    u = 1.0 + t
    den = tl.where(u == 1.0, 1.0, u - 1.0)
    log1p_t = tl.where(u == 1.0, t, tl.log(u) * (t / den))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p_t)


@triton.jit
def _load_seed(seed, SEED_PTR: tl.constexpr):
    if SEED_PTR:
        s = tl.load(seed)
    else:
        s = seed
    return s


@triton.jit
def _softmax_tile(logits_ptr, pid, B, K, F64: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = pid * ROWS + tl.arange(0, ROWS)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < B
    lmask = row_ok[:, None] & (ks[None, :] < K)
    loff = rows[:, None] * K + ks[None, :]
    lg = tl.load(logits_ptr + loff, mask=lmask, other=float("-inf"))
    if F64:
        lg = lg.to(tl.float64)
    else:
        lg = lg.to(tl.float32)
    mx = tl.max(lg, axis=1)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    e = tl.exp(lg - mx[:, None])
    s = tl.sum(e, axis=1)
    s = tl.where(row_ok, s, 1.0)  # rows past B: avoid 0/0 (never stored)
    return e / s[:, None], loff, lmask


@triton.jit
def _gm_reparam_fwd_kernel(
    mu_ptr,
    sr_ptr,
    noise_ptr,
    z_ptr,
    logits_ptr,
    pi_ptr,
    seed,
    n_elem,
    B,
    K,
    SEED_PTR: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    EXP_ACT: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # --- z = mu + act(sigma_raw) * eps over a (BLOCK_C, 4) tile of contiguous elements
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    lane = tl.arange(0, 4)
    idx = c[:, None] * 4 + lane[None, :]
    m = idx < n_elem
    mu = tl.load(mu_ptr + idx, mask=m, other=0.0)
    sr = tl.load(sr_ptr + idx, mask=m, other=0.0)
    if HAS_NOISE:
        eps = tl.load(noise_ptr + idx, mask=m, other=0.0)
    else:
        eps = _eps_tile(_load_seed(seed, SEED_PTR), c, lane)
    if F64:
        mu = mu.to(tl.float64)
        sr = sr.to(tl.float64)
        eps = eps.to(tl.float64)
    else:
        mu = mu.to(tl.float32)
        sr = sr.to(tl.float32)
        eps = eps.to(tl.float32)
    if EXP_ACT:
        sigma = tl.exp(sr)
    else:
        sigma = _softplus(sr)
    z = mu + sigma * eps
    tl.store(z_ptr + idx, z.to(z_ptr.dtype.element_ty), mask=m)
    # --- pi = softmax(logits) over a (ROWS, BLOCK_K) tile of rows
    p, loff, lmask = _softmax_tile(logits_ptr, pid, B, K, F64, ROWS, BLOCK_K)
    tl.store(pi_ptr + loff, p.to(pi_ptr.dtype.element_ty), mask=lmask)


@triton.jit
def _gm_reparam_bwd_kernel(
    gz_ptr,
    sr_ptr,
    noise_ptr,
    dsr_ptr,
    gpi_ptr,
    logits_ptr,
    dl_ptr,
    seed,
    n_elem,
    B,
    K,
    SEED_PTR: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    EXP_ACT: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # --- d_sigma_raw = grad_z * eps * act'(sigma_raw)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    lane = tl.arange(0, 4)
    idx = c[:, None] * 4 + lane[None, :]
    m = idx < n_elem
    gz = tl.load(gz_ptr + idx, mask=m, other=0.0)
    sr = tl.load(sr_ptr + idx, mask=m, other=0.0)
    if HAS_NOISE:
        eps = tl.load(noise_ptr + idx, mask=m, other=0.0)
    else:
        eps = _eps_tile(_load_seed(seed, SEED_PTR), c, lane)
    if F64:
        gz = gz.to(tl.float64)
        sr = sr.to(tl.float64)
        eps = eps.to(tl.float64)
    else:
        gz = gz.to(tl.float32)
        sr = sr.to(tl.float32)
        eps = eps.to(tl.float32)
    if EXP_ACT:
        dact = tl.exp(sr)
    else:
        e = tl.exp(-tl.abs(sr))  # sigmoid from exp(-|x|), which never overflows
        dact = tl.where(sr > 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
        dact = tl.where(sr > 20.0, 1.0, dact)
    tl.store(dsr_ptr + idx, (gz * eps * dact).to(dsr_ptr.dtype.element_ty), mask=m)
    # --- d_logits = pi * (grad_pi - <grad_pi, pi>)
    p, loff, lmask = _softmax_tile(logits_ptr, pid, B, K, F64, ROWS, BLOCK_K)
    g = tl.load(gpi_ptr + loff, mask=lmask, other=0.0)
    if F64:
        g = g.to(tl.float64)
    else:
        g = g.to(tl.float32)
    dot = tl.sum(tl.where(lmask, p * g, 0.0), axis=1)
    tl.store(dl_ptr + loff, (p * (g - dot[:, None])).to(dl_ptr.dtype.element_ty), mask=lmask)


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    from gmwae_fast.backends import triton_interpreting  # the one rule (Triton's own reading of TRITON_INTERPRET)

    return triton_interpreting()


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(
    mu: torch.Tensor,
    sigma_raw: torch.Tensor,
    logits: torch.Tensor,
    seed: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    activation: str,
    mu_name: str = "mu",
) -> None:
    if mu.dim() != 3:
        raise ValueError(f"{mu_name} must have shape (B, K, d), got {tuple(mu.shape)}")
    if mu.dtype not in _FLOATS:
        raise TypeError(f"{mu_name} must be float32/float16/bfloat16/float64, got {mu.dtype}")
    if sigma_raw.shape != mu.shape or sigma_raw.dtype != mu.dtype:
        raise ValueError(
            f"sigma_raw must match {mu_name} (shape {tuple(mu.shape)}, dtype {mu.dtype}), got shape "
            f"{tuple(sigma_raw.shape)}, dtype {sigma_raw.dtype}"
        )
    if tuple(logits.shape) != tuple(mu.shape[:2]) or logits.dtype not in _FLOATS:
        raise ValueError(
            f"logits must be a floating (B, K) = {tuple(mu.shape[:2])} tensor, got shape "
            f"{tuple(logits.shape)}, dtype {logits.dtype}"
        )
    for name, t in (("sigma_raw", sigma_raw), ("logits", logits)):
        if t.device != mu.device:
            raise ValueError(f"{name} is on {t.device} but {mu_name} is on {mu.device}")
    if noise is not None:
        if noise.shape != mu.shape or noise.dtype != mu.dtype or noise.device != mu.device:
            raise ValueError(
                f"noise must match {mu_name} (shape, dtype, device), got {tuple(noise.shape)}, "
                f"{noise.dtype}, {noise.device}"
            )
    elif seed is None:
        raise ValueError("give seed (an int64 tensor with one element) or noise")
    else:
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(
                f"seed must be an int64 tensor with one element, got dtype {seed.dtype}, shape {tuple(seed.shape)}"
            )
        if seed.device != mu.device and seed.device.type != "cpu":
            raise ValueError(f"seed must be on {mu.device} or on the CPU, got {seed.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if mu.device.type == "cpu" and not _interpreting():
        raise ValueError("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing triton")


def _launch_config(n_elem: int, B: int, K: int):
    block_c = DEFAULTS["interp_block_c"] if _interpreting() else DEFAULTS["block_c"]
    n_counters = triton.cdiv(n_elem, 4)
    block_c = min(block_c, max(16, triton.next_power_of_2(n_counters)))
    prog_z = triton.cdiv(n_counters, block_c)
    block_k = triton.next_power_of_2(K)
    max_rows = max(1, DEFAULTS["tile"] // block_k)
    rows = min(max_rows, triton.next_power_of_2(triton.cdiv(B, prog_z)))
    grid = (max(prog_z, triton.cdiv(B, rows)),)
    return grid, block_c, rows, block_k


def _seed_arg(seed: Optional[torch.Tensor], device: torch.device):
    """``(kernel argument, SEED_PTR)``: a pointer read in the kernel (no host sync) or an int read on the host."""
    if seed is None:
        return 0, False
    if seed.device == device:
        return seed.reshape(1), True
    return int(seed.reshape(()).item()), False  # a CPU seed for GPU tensors: reading it does not sync the GPU


def gm_reparam(
    mu: torch.Tensor,
    sigma_raw: torch.Tensor,
    logits: torch.Tensor,
    seed: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    activation: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(z, pi)``: ``z = mu + act(sigma_raw) * eps`` (``eps`` = ``noise`` or the Philox stream of ``seed``),
    ``pi = softmax(logits, -1)``."""
    _check(mu, sigma_raw, logits, seed, noise, activation)
    mu, sigma_raw, logits = mu.contiguous(), sigma_raw.contiguous(), logits.contiguous()
    noise = noise.contiguous() if noise is not None else None
    z = torch.empty_like(mu)
    pi = torch.empty_like(logits)
    B, K, _ = mu.shape
    n_elem = mu.numel()
    if n_elem == 0:
        return z, pi
    grid, block_c, rows, block_k = _launch_config(n_elem, B, K)
    seed_arg, seed_ptr = _seed_arg(seed if noise is None else None, mu.device)
    _gm_reparam_fwd_kernel[grid](
        mu,
        sigma_raw,
        noise if noise is not None else mu,
        z,
        logits,
        pi,
        seed_arg,
        n_elem,
        B,
        K,
        SEED_PTR=seed_ptr,
        HAS_NOISE=noise is not None,
        EXP_ACT=activation == "exp",
        F64=mu.dtype == torch.float64 or logits.dtype == torch.float64,
        BLOCK_C=block_c,
        ROWS=rows,
        BLOCK_K=block_k,
        num_warps=DEFAULTS["num_warps"],
    )
    return z, pi


def gm_reparam_backward(
    grad_z: torch.Tensor,
    grad_pi: torch.Tensor,
    sigma_raw: torch.Tensor,
    logits: torch.Tensor,
    seed: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    activation: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(d_sigma_raw, d_logits)`` for cotangents ``grad_z`` (like ``sigma_raw``) and ``grad_pi`` (like ``logits``)."""
    _check(sigma_raw, sigma_raw, logits, seed, noise, activation, mu_name="sigma_raw")
    if grad_z.shape != sigma_raw.shape or grad_z.device != sigma_raw.device:
        raise ValueError(
            f"grad_z must have the shape and device of sigma_raw, got {tuple(grad_z.shape)} on {grad_z.device}"
        )
    if grad_pi.shape != logits.shape or grad_pi.device != logits.device:
        raise ValueError(
            f"grad_pi must have the shape and device of logits, got {tuple(grad_pi.shape)} on {grad_pi.device}"
        )
    grad_z, grad_pi = grad_z.contiguous(), grad_pi.contiguous()
    sigma_raw, logits = sigma_raw.contiguous(), logits.contiguous()
    noise = noise.contiguous() if noise is not None else None
    dsr = torch.empty_like(sigma_raw)
    dl = torch.empty_like(logits)
    B, K, _ = sigma_raw.shape
    n_elem = sigma_raw.numel()
    if n_elem == 0:
        return dsr, dl
    grid, block_c, rows, block_k = _launch_config(n_elem, B, K)
    seed_arg, seed_ptr = _seed_arg(seed if noise is None else None, sigma_raw.device)
    _gm_reparam_bwd_kernel[grid](
        grad_z,
        sigma_raw,
        noise if noise is not None else sigma_raw,
        dsr,
        grad_pi,
        logits,
        dl,
        seed_arg,
        n_elem,
        B,
        K,
        SEED_PTR=seed_ptr,
        HAS_NOISE=noise is not None,
        EXP_ACT=activation == "exp",
        F64=sigma_raw.dtype == torch.float64 or logits.dtype == torch.float64,
        BLOCK_C=block_c,
        ROWS=rows,
        BLOCK_K=block_k,
        num_warps=DEFAULTS["num_warps"],
    )
    return dsr, dl
