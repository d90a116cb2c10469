"""Argument checks, the weight and point conditioning (exact power-of-two scaling, the cancellation-free pair mass,
the difference-safe clamp) and the result type shared by :mod:`gmwae_fast.mmd`, :mod:`gmwae_fast.distributed` and
:mod:`gmwae_fast.reference`: this module imports none of them, so they do not import each other to share them."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterable
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

_REDUCTIONS = ("sum", "none")


def _check_points(name: str, t: object, allow_empty: bool = False) -> Tensor:
    """``t`` as points ``(n, d)`` or ``(B, K, d)``; ``allow_empty`` admits ``n = 0`` / ``B = 0`` (a rank's shard)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape (n, d) or (B, K, d), got {tuple(t.shape)} ({t.dim()} dims)")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if allow_empty and 0 in t.shape[1:]:
        raise ValueError(
            f"{name} has a zero-sized dimension other than the first: {tuple(t.shape)} "
            "(an empty shard is (0, d) or (0, K, d))"
        )
    if not allow_empty and t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    return t


def _check_pair(x: object, y: object, allow_empty: bool = False) -> tuple[Tensor, Tensor]:
    """``x`` and ``y`` checked as points (:func:`_check_points`) of one feature dimension on one device."""
    x, y = _check_points("x", x, allow_empty), _check_points("y", y, allow_empty)
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x and y must have the same feature dimension d, got {x.shape[-1]} and {y.shape[-1]}")
    if x.device != y.device:
        raise ValueError(f"x is on {x.device} but y is on {y.device}; put both on one device")
    return x, y


def _check_weights(name: str, w: object, pts: Tensor, pts_name: str) -> Optional[Tensor]:
    if w is None:
        return None
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {w.dtype}")
    if tuple(w.shape) != tuple(pts.shape[:-1]):
        raise ValueError(
            f"{name} must have the leading shape of {pts_name}, {tuple(pts.shape[:-1])}, got {tuple(w.shape)}"
        )
    if w.device != pts.device:
        raise ValueError(f"{name} is on {w.device} but {pts_name} is on {pts.device}")
    return w


def _no_grad_wanted(name: str, v: Tensor) -> None:
    """A kernel parameter given as a tensor that requires grad would silently get no gradient: refuse it."""
    if v.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name} is a tensor that requires grad, but gmwae_fast reads it as a constant and would give it no "
            f"gradient (learnable bandwidths are not supported): pass {name}.detach() or a number"
        )


def _finite(v: float) -> bool:
    """``math.isfinite`` written with comparisons, which :func:`torch.compile` also traces when ``v`` is symbolic
    (``dynamic=True`` makes Python floats such as ``eps`` symbolic; ``math.isfinite`` of one breaks the graph)."""
    return v == v and abs(v) != math.inf


def _real(name: str, v: object) -> float:
    """A Python real number or a one-element real tensor (read once on the host) as a float."""
    if isinstance(v, Tensor):
        _no_grad_wanted(name, v)
        if v.numel() != 1 or v.is_complex() or v.dtype == torch.bool:
            raise TypeError(
                f"{name} must be a real number or a one-element real tensor, got a tensor of shape "
                f"{tuple(v.shape)} and dtype {v.dtype}"
            )
        return float(v.detach().reshape(()).item())
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    return float(v)


def _real_sequence(name: str, vals: object) -> tuple[float, ...]:
    if isinstance(vals, Tensor):
        _no_grad_wanted(name, vals)
        if vals.is_complex() or vals.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got a tensor of dtype {vals.dtype}")
        return tuple(float(v) for v in vals.detach().reshape(-1).tolist())
    if isinstance(vals, (str, bytes)) or not isinstance(vals, Iterable):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(vals).__name__}")
    return tuple(_real(f"{name}[{i}]", v) for i, v in enumerate(vals))


def _check_bandwidths(vals: tuple[float, ...], compute_dtype: torch.dtype, what: str) -> tuple[float, ...]:
    """Every ``C_s`` finite and in ``[64 * tiny, max]`` of the compute dtype: at least 2^6 above the smallest
    normal number, so that the kernel values of pairs at unit distance (``~C_s``) stay normal numbers (a float32
    bandwidth of 1e-37 passed the plain normal-number check and came out 6-18% off on the cpu and triton backends;
    1e-36 is accurate)."""
    fi = torch.finfo(compute_dtype)
    low = 64.0 * fi.tiny
    bad = [c for c in vals if not (_finite(c) and low <= c <= fi.max)]
    if bad:
        raise ValueError(
            f"every bandwidth C_s must be positive, finite and in [{low:.3g}, {fi.max:.3g}] for {compute_dtype} "
            f"inputs; {what} gave {bad}"
        )
    return vals


def kernel_bandwidths(d: int, scales, sigma2, bandwidths, eps, compute: torch.dtype):
    """``(the bandwidths the kernels see, their factors or None)`` for the keyword options: with ``eps > 0``,
    ``C / (C + D + eps) = C / (C + eps) * C' / (C' + D)`` with ``C' = C + eps``."""
    eps = _real("eps", eps)
    if not (eps >= 0 and _finite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    bws = _resolve_bandwidths(d, scales, sigma2, bandwidths, compute)
    if eps == 0:
        return bws, None
    factors = tuple(c / (c + eps) for c in bws)
    return _check_bandwidths(tuple(c + eps for c in bws), compute, f"C_s + eps with eps = {eps!r}"), factors


def _plain(vals) -> Optional[tuple]:
    """``vals`` as a tuple when it is a list or tuple of Python ints and floats (hashable as they are), else None."""
    if isinstance(vals, (tuple, list)) and all(type(v) in (int, float) for v in vals):
        return tuple(vals)
    return None


def _resolve_bandwidths(
    d: int,
    scales: Sequence[float],
    sigma2: Union[float, Tensor],
    bandwidths: Optional[Sequence[float]],
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[float, ...]:
    """The checked ``C_s``; plain Python options (the usual call) are resolved once and remembered (the checks
    cost tens of microseconds, as much as a small call's kernels)."""
    if type(sigma2) in (int, float) and not torch.compiler.is_compiling():
        sc, bw = _plain(scales), None if bandwidths is None else _plain(bandwidths)
        if sc is not None and (bandwidths is None or bw is not None):
            return _resolve_bandwidths_cached(int(d), sc, sigma2, bw, compute_dtype)
    return _resolve_bandwidths_checked(d, scales, sigma2, bandwidths, compute_dtype)


@functools.lru_cache(maxsize=256)
def _resolve_bandwidths_cached(d, scales, sigma2, bandwidths, compute_dtype) -> tuple[float, ...]:
    return _resolve_bandwidths_checked(d, scales, sigma2, bandwidths, compute_dtype)


def _resolve_bandwidths_checked(d, scales, sigma2, bandwidths, compute_dtype) -> tuple[float, ...]:
    if bandwidths is not None:
        vals = _real_sequence("bandwidths", bandwidths)
        if not vals:
            raise ValueError("bandwidths is empty: give at least one bandwidth C_s > 0")
        return _check_bandwidths(vals, compute_dtype, "bandwidths")
    scales = _real_sequence("scales", scales)
    if not scales:
        raise ValueError("scales is empty: give at least one scale (e.g. gmwae_fast.WAE_SCALES)")
    bad = [s for s in scales if not (s > 0 and _finite(s))]
    if bad:
        raise ValueError(f"every entry of scales must be positive and finite, got {bad}")
    sigma2 = _real("sigma2", sigma2)
    if not (sigma2 > 0 and _finite(sigma2)):
        raise ValueError(f"sigma2 must be a positive finite number, got {sigma2!r}")
    vals = tuple(bandwidths_for(d, scales, sigma2))
    return _check_bandwidths(vals, compute_dtype, f"C_s = 2 * d * sigma2 * s with d = {d}, sigma2 = {sigma2!r}")


def bandwidths_for(d: int, scales: Sequence[float], sigma2: float = 1.0) -> list[float]:
    """Absolute bandwidths ``C_s = 2 * d * sigma2 * s`` (the WAE convention)."""
    return [2.0 * d * sigma2 * float(s) for s in scales]


class IMQMMDTerms(NamedTuple):
    """The pieces of the MMD² (float64; ``(S,)`` per-bandwidth sums and 0-d denominators), see
    :func:`imq_mmd_terms`."""

    #: ``sum_{a !~ a'} W_a W_a' k_s(a, a')`` over ordered pairs (all pairs, ``a = a'`` included, when biased).
    self_x: Tensor
    #: the same for ``y``.
    self_y: Tensor
    #: ``sum_{a, b} W_a V_b k_s(a, b)``.
    cross: Tensor
    #: ``1 - sum_g W_g^2`` when unbiased, else 1.
    den_x: Tensor
    #: the same for ``y``.
    den_y: Tensor

    def mmd(self) -> Tensor:
        """``(S,)`` MMD² per bandwidth: ``self_x / den_x + self_y / den_y - 2 cross``."""
        return self.self_x / self.den_x + self.self_y / self.den_y - 2.0 * self.cross


def difference_safe(pts: Tensor) -> Tensor:
    """``pts`` clamped to half the dtype's range, so that no difference ``a - b`` of two points overflows to an
    infinity (``-3e38 - 3e38`` in float32), which made ``0 * inf = NaN`` gradient rows where the true gradient is
    0. Nothing representable changes: a pair that far apart has a kernel value and gradient below the dtype's
    resolution either way, and the clamp's gradient (0 on clamped entries) is that gradient. NaN stays NaN."""
    half = torch.finfo(pts.dtype).max / 2
    return pts.clamp(-half, half)


def pow2_normalised(flat: Tensor) -> Tensor:
    """``flat * 2^-e`` with ``e`` the exponent of ``max |flat|`` (that maximum lands in [0.5, 1)): exact, and
    differentiable with the gradient ``2^-e`` on every torch (``torch.ldexp`` with a negative integer exponent
    tensor has a zero gradient in torch 2.11). Two factors, each at most 2^538, so a subnormal maximum (``2^-e`` up
    to 2^1074, beyond float64) neither overflows nor makes the backward overflow."""
    _, e = torch.frexp(flat.detach().abs().amax())
    e = e.to(torch.float64)
    half = torch.floor(e * 0.5)
    return flat * torch.exp2(-half) * torch.exp2(half - e)


def cross_group_mass(wg: Tensor) -> Tensor:
    """``sum_{g != h} w_g w_h`` of group masses ``wg`` (1-d) without the cancellation of
    ``(sum w)^2 - sum w_g^2``: ``2 sum_g w_g (w_0 + ... + w_{g-1})``, a sum of non-negative terms (for
    non-negative masses), so a nearly-single group (one mass 1, the others 1e-15) keeps full relative accuracy."""
    before = torch.cat([wg.new_zeros(1), torch.cumsum(wg, 0)[:-1]])
    return 2.0 * (wg * before).sum()
