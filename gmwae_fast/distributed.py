"""Exact global-batch IMQ MMD² across processes: ``fast_imq_mmd(..., process_group=pg)``.

Every rank passes its local shard of ``x`` (and of ``y``, and of the optional weights); every rank gets the MMD²
of the union of all shards, concatenated in rank order, and a backward that gives each rank the gradient of that
global value with respect to its *local* points and weights (the matching slice of the single-process gradient).

How (rank ``r``, local rows ``A_r``, all-rank points ``A = [A_0, ..., A_{R-1}]``, groups never span ranks):

* one all-gather of a small metadata vector (shapes, dtypes, options), then one all-gather of every rank's points
  and raw weights (padded to the longest shard), so each rank holds ``A`` and ``B`` (memory ``O(N d)``);
* weights are normalised by their global sum; ``1 - sum_g W_g^2`` is computed from the gathered weights;
* the rank's share of the ordered-pair sums is ``self(A_r) + cross(A_r, A_{!=r})`` (likewise for ``y``) and
  ``cross(A_r, B)`` for the ``x``-``y`` term (``O(n_r N S)`` pair work, no pairwise matrix); one all-reduce of
  these ``3 S`` float64 values gives the global sums on every rank;
* the gradient w.r.t. the local points is ``d self(A_r) + 2 d_rows cross(A_r, A_{!=r})`` (the pairs where a local
  point is the column are the mirror images of those where it is the row) plus ``d_rows cross(A_r, B)``; the
  gradient w.r.t. the raw local weights follows from the one w.r.t. the normalised weights ``g`` as
  ``(g_i - sum_j W_j g_j) / sum(raw)`` where ``sum_j W_j g_j`` is a closed form of the all-reduced sums (Euler's
  identity: self terms have degree 2 in ``W``, cross terms degree 1, ``1 - sum W_g^2`` degree 2). The backward
  therefore needs no communication at all.

The primitive ops are those of ``gmwae_fast/ops/imq_mmd.py`` (``cpu``, ``cuda``, ``triton``) or float64 PyTorch
built on :func:`gmwae_fast.reference.reference_terms` (``reference``); no new kernel is involved.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import backends, reference
from ._common import (
    _REDUCTIONS,
    _check_pair,
    _check_weights,
    cross_group_mass,
    difference_safe,
    kernel_bandwidths,
    pow2_normalised,
)
from .ops._autograd import first_order_only
from .ops.imq_mmd import OpSet, op_set

__all__ = ["distributed_imq_mmd"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# metadata vector, one per rank (float64, exact for the small integers stored in it)
_META = (
    "error",
    "x_dim",
    "x_rows",
    "x_k",
    "x_d",
    "x_dtype",
    "x_w",
    "x_grad",
    "y_dim",
    "y_rows",
    "y_k",
    "y_d",
    "y_dtype",
    "y_w",
    "y_grad",
    "options",
)


def distributed_imq_mmd(
    x: Tensor,
    y: Tensor,
    x_weights: Optional[Tensor] = None,
    y_weights: Optional[Tensor] = None,
    *,
    process_group: Any,
    scales: Sequence[float],
    sigma2: float,
    bandwidths: Optional[Sequence[float]],
    unbiased: bool,
    reduction: str,
    eps: float,
    backend: str,
    validate: bool,
) -> Tensor:
    """The ``process_group`` branch of :func:`gmwae_fast.fast_imq_mmd` (see its docstring for the contract).

    Collective: every rank of ``process_group`` must call it, in the same order as its other collectives.
    Errors that depend on one rank's input (a wrong type or shape, mismatched ``d`` or dtype, grouped input on some
    ranks only, weights on some ranks only, different options or ``validate``, a backend that cannot run on one
    rank) are raised on every rank, after the metadata all-gather, so no rank is left waiting: the rank at fault
    raises its own error, the others a :class:`ValueError` naming it. Only a ``process_group`` that is not one
    raises before any communication.
    """
    _check_group(process_group)
    local_error, (bws, factors), options = _local_checks(
        x, y, x_weights, y_weights, scales, sigma2, bandwidths, unbiased, reduction, eps, backend, validate
    )
    meta = _meta_vector(x, y, x_weights, y_weights, local_error, options, process_group)
    metas = _gather_meta(meta, process_group)
    rank = dist.get_rank(process_group)
    if local_error is not None:
        raise local_error
    _check_consistent(metas, rank, unbiased)
    name = backends.select_backend(backend, x.device, "imq_mmd")
    plan, live = _gather(x, y, x_weights, y_weights, metas, rank, process_group, unbiased)
    if validate:
        _validate(plan, unbiased)
    plan.ops = _ops(name)
    plan.bw = torch.tensor(bws, dtype=torch.float64, device=x.device)
    plan.factor = torch.tensor(factors, dtype=torch.float64, device=x.device)
    plan.reduction = reduction
    grad_on = torch.is_grad_enabled()
    plan.grad_x = grad_on and any(t is not None and t.requires_grad for t in live[:2])
    plan.grad_y = grad_on and any(t is not None and t.requires_grad for t in live[2:])
    out = _GlobalMMD.apply(plan, *live)
    out_dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    return out.to(out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Checks and metadata
# ---------------------------------------------------------------------------------------------------------------


def _check_group(process_group: Any) -> None:
    if not dist.is_available():
        raise RuntimeError("process_group was given but torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group(...) on every rank first"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD), got {type(process_group).__name__}"
        )
    if dist.get_rank(process_group) < 0:
        raise RuntimeError("this process is not a member of process_group")


def _bandwidths(x: Tensor, y: Tensor, scales, sigma2, bandwidths, eps) -> tuple[tuple, tuple]:
    """The kernels' bandwidths and each one's factor, as in :func:`gmwae_fast.fast_imq_mmd` (factors 1 without
    ``eps``)."""
    compute = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    bws, factors = kernel_bandwidths(x.shape[-1], scales, sigma2, bandwidths, eps, compute)
    return bws, factors or (1.0,) * len(bws)


def _local_checks(x, y, xw, yw, scales, sigma2, bandwidths, unbiased, reduction, eps, backend, validate):
    """Errors are returned, to be raised after the metadata exchange (on every rank)."""
    try:
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        _check_pair(x, y, allow_empty=True)
        _check_weights("x_weights", xw, x, "x")
        _check_weights("y_weights", yw, y, "y")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected one of {_REDUCTIONS}")
        bws = _bandwidths(x, y, scales, sigma2, bandwidths, eps)
        backends.resolve_backend(backend, x.device, "imq_mmd")  # can this rank run it? (recorded after the exchange)
    except (ValueError, TypeError, RuntimeError) as exc:
        return exc, ((), ()), 0
    options = zlib.crc32(repr((bws, bool(unbiased), reduction, bool(validate))).encode()) & 0xFFFFFFFF
    return None, bws, options


def _side_meta(t: Tensor, w: Optional[Tensor]) -> list[float]:
    if t.dim() not in (2, 3):
        return [t.dim(), 0, 0, 0, -1, 0, 0]
    dtype = _FLOAT_DTYPES.index(t.dtype) if t.dtype in _FLOAT_DTYPES else -1
    grad = torch.is_grad_enabled() and (t.requires_grad or (isinstance(w, Tensor) and w.requires_grad))
    k = t.shape[1] if t.dim() == 3 else 1
    return [t.dim(), t.shape[0], k, t.shape[-1], dtype, w is not None, grad]


def _meta_vector(x, y, xw, yw, error, options, group) -> Tensor:
    n = len(_META)
    if error is not None:  # the inputs may not even be tensors: only the error flag counts
        vals = [1.0] + [0.0] * (n - 1)
        device = x.device if isinstance(x, Tensor) else _group_device(group)
    else:
        vals = [0.0, *_side_meta(x, xw), *_side_meta(y, yw), options]
        device = x.device
    return torch.tensor([float(v) for v in vals], dtype=torch.float64, device=device)


def _group_device(group) -> torch.device:
    """Where this group's collectives take tensors: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_meta(meta: Tensor, group) -> list[dict]:
    out = [torch.empty_like(meta) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, meta, group=group)
    return [dict(zip(_META, (int(v) for v in m.tolist()))) for m in out]


def _check_consistent(metas: list[dict], rank: int, unbiased: bool) -> None:
    bad = [r for r, m in enumerate(metas) if m["error"]]
    if bad:
        raise ValueError(f"rank(s) {bad} passed invalid input to the distributed MMD (see the error raised there)")
    for key, what in (
        ("x_dim", "x's number of dimensions ((n, d) plain or (B, K, d) grouped)"),
        ("y_dim", "y's number of dimensions ((n, d) plain or (B, K, d) grouped)"),
        ("x_k", "x's group size K"),
        ("y_k", "y's group size K"),
        ("x_d", "the feature dimension d"),
        ("x_dtype", "x's dtype"),
        ("y_dtype", "y's dtype"),
        ("x_w", "whether x_weights is given"),
        ("y_w", "whether y_weights is given"),
        ("options", "the keyword options (bandwidths, unbiased, reduction, validate)"),
    ):
        values = [m[key] for m in metas]
        if len(set(values)) > 1:
            if key.endswith("dtype"):
                values = [str(_FLOAT_DTYPES[v]) for v in values]
            raise ValueError(
                f"all ranks must agree on {what}; got {values} on ranks 0..{len(values) - 1} (this is rank {rank})"
            )
    for side in ("x", "y"):
        groups = sum(m[f"{side}_rows"] for m in metas)
        if groups == 0:
            raise ValueError(f"{side} is empty on every rank: the global sample has no points")
        if unbiased and groups < 2:
            raise ValueError(
                f"the unbiased estimate needs at least 2 groups of points in {side} over all ranks, "
                f"got {groups}; use unbiased=False"
            )


# ---------------------------------------------------------------------------------------------------------------
# The gather
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Side:
    """One sample (``x`` or ``y``) after the all-gather."""

    pts: list  # per-rank flattened points (n_r, d) in the compute dtype (rank order)
    w: list  # per-rank normalised weights (n_r,) in the weight dtype
    raw: Optional[list]  # per-rank raw weights in the weight dtype (None when uniform)
    raw_sum: Optional[Tensor]  # global float64 sum of the raw weights (None when uniform)
    group: int
    den: Tensor  # float64 0-d: 1 - sum_g W_g^2 (unbiased) or 1
    grad: bool  # some rank needs a gradient for this side


@dataclass
class _Plan:
    x: _Side
    y: _Side
    rank: int
    group_handle: Any
    unbiased: bool
    a_dtype: torch.dtype
    w_dtype: torch.dtype
    ops: Any = None
    bw: Optional[Tensor] = None  # (S,) float64 bandwidths the kernels see (C_s + eps)
    factor: Optional[Tensor] = None  # (S,) float64 C_s / (C_s + eps), multiplies every term
    reduction: str = "sum"
    grad_x: bool = False  # this rank's x (points or weights) needs a gradient
    grad_y: bool = False


def _dtypes(metas: list[dict]) -> tuple[torch.dtype, torch.dtype]:
    pts = torch.promote_types(_FLOAT_DTYPES[metas[0]["x_dtype"]], _FLOAT_DTYPES[metas[0]["y_dtype"]])
    return pts, (torch.float64 if pts == torch.float64 else torch.float32)


def _lengths(m: dict, side: str, d: int) -> tuple[int, int]:
    n = m[f"{side}_rows"] * m[f"{side}_k"]
    return n * d, (n if m[f"{side}_w"] else 0)


def _pack(x, xw, y, yw, buf_dtype) -> Tensor:
    parts = [x.detach().reshape(-1), y.detach().reshape(-1)]
    parts += [w.detach().reshape(-1) for w in (xw, yw) if w is not None]
    return torch.cat([p.to(buf_dtype) for p in parts])


def _gather(x, y, xw, yw, metas, rank, group, unbiased) -> tuple[_Plan, list]:
    """All-gather every rank's points and raw weights; returns the plan and the local differentiable inputs."""
    pts_dtype, w_dtype = _dtypes(metas)
    d = metas[0]["x_d"]
    sizes = [sum(_lengths(m, "x", d)) + sum(_lengths(m, "y", d)) for m in metas]
    # raw weights travel in float64 (float32 would turn 1e300 into inf and 1e-50 into 0); points are exact in it
    weighted = bool(metas[0]["x_w"] or metas[0]["y_w"])
    local = _pack(x, xw, y, yw, torch.float64 if weighted else w_dtype)
    padded = local.new_zeros(max(sizes))
    padded[: local.numel()] = local
    bufs = [torch.empty_like(padded) for _ in metas]
    dist.all_gather(bufs, padded, group=group)
    x_pts, y_pts, x_raw, y_raw = [], [], [], []
    for m, buf in zip(metas, bufs):
        (xp, xwl), (yp, ywl) = _lengths(m, "x", d), _lengths(m, "y", d)
        cuts = torch.split(buf[: xp + yp + xwl + ywl], [xp, yp, xwl, ywl])
        x_pts.append(cuts[0].view(-1, d).to(pts_dtype))
        y_pts.append(cuts[1].view(-1, d).to(pts_dtype))
        x_raw.append(cuts[2])
        y_raw.append(cuts[3])
    sx, x_live = _side(x, xw, x_pts, x_raw, metas, "x", rank, pts_dtype, w_dtype, unbiased)
    sy, y_live = _side(y, yw, y_pts, y_raw, metas, "y", rank, pts_dtype, w_dtype, unbiased)
    return _Plan(sx, sy, rank, group, unbiased, pts_dtype, w_dtype), [*x_live, *y_live]


def _side(t, w, pts, raw, metas, name, rank, pts_dtype, w_dtype, unbiased) -> tuple[_Side, list]:
    group = metas[0][f"{name}_k"]
    live = difference_safe(t.reshape(-1, t.shape[-1]).to(pts_dtype))
    pts[rank] = live.detach().contiguous()
    raw_live, raw_sum = None, None
    if w is not None:
        raw_live = w.reshape(-1).to(torch.float64)
        raw[rank] = raw_live.detach()
        every = torch.cat(raw)
        raw_sum = every.sum()
        scaled = pow2_normalised(every)  # exact; the sum of 1e300-sized weights cannot overflow
        norm = list((scaled / scaled.sum()).to(w_dtype).split([r.shape[0] for r in raw]))
        norm = [n.contiguous() for n in norm]
    else:
        raw, total = None, sum(p.shape[0] for p in pts)
        norm = [torch.full((p.shape[0],), 1.0 / total, dtype=w_dtype, device=t.device) for p in pts]
    den = torch.ones((), dtype=torch.float64, device=t.device)
    if unbiased:  # sum_{g != h} W_g W_h of the weights the kernels see: no cancellation for a dominant group
        den = cross_group_mass(torch.cat(norm).to(torch.float64).view(-1, group).sum(1))
    grad = any(m[f"{name}_grad"] for m in metas)
    return _Side(pts, norm, raw, raw_sum, group, den, grad), [live, raw_live]


def _validate(plan: _Plan, unbiased: bool) -> None:
    """``validate=True``: the checks of the single-process path, on the gathered (global) sample."""
    for name, side in (("x", plan.x), ("y", plan.y)):
        if not bool(torch.isfinite(torch.cat(side.pts)).all()):
            raise ValueError(f"{name} contains NaN or Inf values (on some rank)")
        if side.raw_sum is None:
            continue
        raw = torch.cat(side.raw)
        wname = f"{name}_weights"
        if not bool(torch.isfinite(raw).all()) or not bool(torch.isfinite(side.raw_sum)):
            raise ValueError(f"{wname} contains NaN or Inf values (on some rank)")
        if bool((raw < 0).any()):
            raise ValueError(f"{wname} has negative entries (on some rank); weights must be >= 0")
        if not bool(side.raw_sum > 0):
            raise ValueError(f"{wname} are all zero on every rank; at least one point needs positive mass")
        if unbiased and float(side.den) <= 0.0:
            raise ValueError(
                f"{wname} put all the mass in one group: the unbiased self term is undefined (use unbiased=False)"
            )


# ---------------------------------------------------------------------------------------------------------------
# Primitive ops (reference backend: float64 PyTorch with autograd) and the local pass
# ---------------------------------------------------------------------------------------------------------------


def _ref_self(a, wa, bw, group, unbiased):
    return reference.reference_terms(a, wa, a, wa, bw, group_a=group, group_b=group, exclude_same_group=unbiased)


def _ref_cross(a, wa, b, wb, bw):
    return reference.reference_terms(a, wa, b, wb, bw)


def _autograd_grads(fn: Callable, h: Tensor, tensors: Sequence[Tensor], *rest) -> list[Tensor]:
    with torch.enable_grad():
        live = [t.detach().requires_grad_(True) for t in tensors]
        values = fn(*live, *rest)
        grads = torch.autograd.grad((values * h).sum(), live)
    return [values.detach(), *(g.to(t.dtype) for g, t in zip(grads, tensors))]


def _ref_self_grad(h, a, wa, bw, group, unbiased):
    return tuple(_autograd_grads(lambda a_, w_: _ref_self(a_, w_, bw, group, unbiased), h, (a, wa)))


def _ref_cross_grad(h, a, wa, b, wb, bw, b_grad=True):
    values, da, dwa = _autograd_grads(lambda a_, w_: _ref_cross(a_, w_, b, wb, bw), h, (a, wa))
    return values, da, dwa, torch.zeros_like(b), torch.zeros_like(wb)


_REFERENCE_OPS = OpSet(_ref_self, _ref_cross, _ref_self_grad, _ref_cross_grad)


def _ops(name: str) -> OpSet:
    return _REFERENCE_OPS if name == "reference" else op_set(name)


def _others(side: _Side, rank: int) -> tuple[Tensor, Tensor]:
    idx = [r for r in range(len(side.pts)) if r != rank]
    if not idx:
        return side.pts[rank][:0], side.w[rank][:0]
    return torch.cat([side.pts[r] for r in idx]), torch.cat([side.w[r] for r in idx])


class _Terms:
    """Accumulates one side's share of the sums and, when a cotangent is given, its local gradients."""

    def __init__(self, ops: OpSet, bw: Tensor, a: Tensor, wa: Tensor, h: Optional[Tensor]) -> None:
        self.ops, self.bw, self.a, self.wa, self.h = ops, bw, a, wa, h
        self.value = torch.zeros(bw.shape, dtype=torch.float64, device=bw.device)
        self.da = torch.zeros_like(a) if h is not None else None
        self.dwa = torch.zeros(wa.shape, dtype=torch.float64, device=wa.device) if h is not None else None

    def _add(self, out, scale: float) -> None:
        self.value = self.value + out[0]
        if self.h is not None:
            self.da = self.da + scale * out[1]
            self.dwa = self.dwa + scale * out[2].to(torch.float64)

    def self_term(self, group: int, unbiased: bool, h_scale: Tensor) -> "_Terms":
        if self.a.shape[0] == 0:
            return self
        if self.h is None:
            self.value = self.value + self.ops.self_values(self.a, self.wa, self.bw, group, unbiased)
            return self
        self._add(self.ops.self_grad((self.h * h_scale).contiguous(), self.a, self.wa, self.bw, group, unbiased), 1)
        return self

    def cross_term(self, b: Tensor, wb: Tensor, h_scale: Tensor, mirror: float = 1.0) -> "_Terms":
        """``cross(a, b)``; ``mirror = 2`` counts the mirror pairs (b, a) in the gradient of a self sum."""
        if self.a.shape[0] == 0 or b.shape[0] == 0:
            return self
        if self.h is None:
            self.value = self.value + self.ops.cross_values(self.a, self.wa, b, wb, self.bw)
            return self
        self._add(self.ops.cross_grad((self.h * h_scale).contiguous(), self.a, self.wa, b, wb, self.bw, False), mirror)
        return self


def _self_share(plan: _Plan, side: _Side, h: Optional[Tensor]) -> _Terms:
    """This rank's rows of ``self(side)``: ``self(A_r) + cross(A_r, A_{!=r})`` (gradient: mirror pairs count twice)."""
    a_o, w_o = _others(side, plan.rank)
    inv_den = 1.0 / side.den
    return (
        _Terms(plan.ops, plan.bw, side.pts[plan.rank], side.w[plan.rank], h)
        .self_term(side.group, plan.unbiased, inv_den)
        .cross_term(a_o, w_o, inv_den, mirror=2.0)
    )


def _cross_share(plan: _Plan, rows: _Side, cols: _Side, h: Optional[Tensor]) -> _Terms:
    """This rank's rows of ``cross(rows, cols)`` against every rank's columns."""
    terms = _Terms(plan.ops, plan.bw, rows.pts[plan.rank], rows.w[plan.rank], h)
    return terms.cross_term(torch.cat(cols.pts), torch.cat(cols.w), plan.bw.new_tensor(-2.0))


def _local_pass(plan: _Plan, h: Optional[Tensor], grad_x: bool, grad_y: bool) -> tuple[Tensor, dict]:
    """This rank's share ``(3, S)`` of ``[self(x), self(y), cross(x, y)]`` and, for the sides asked for, the
    :class:`_Terms` holding the local gradients of ``sum_s h_s (terms)`` (same kernel passes)."""
    rows_x = plan.x.grad or not plan.y.grad  # from every rank's metadata: all ranks sum the same cross share
    terms = {
        "xx": _self_share(plan, plan.x, h if grad_x else None),
        "yy": _self_share(plan, plan.y, h if grad_y else None),
    }
    if rows_x or grad_x:
        terms["xy"] = _cross_share(plan, plan.x, plan.y, h if grad_x else None)
    if not rows_x or grad_y:
        terms["yx"] = _cross_share(plan, plan.y, plan.x, h if grad_y else None)
    xy = terms["xy"].value if rows_x else terms["yx"].value
    return torch.stack([terms["xx"].value, terms["yy"].value, xy]), terms


def _grad_pass(plan: _Plan, h: Tensor, grad_x: bool, grad_y: bool) -> dict:
    """The gradient passes alone (the backward of ``reduction="none"``): no value-only pass."""
    terms = {}
    if grad_x:
        terms["xx"], terms["xy"] = _self_share(plan, plan.x, h), _cross_share(plan, plan.x, plan.y, h)
    if grad_y:
        terms["yy"], terms["yx"] = _self_share(plan, plan.y, h), _cross_share(plan, plan.y, plan.x, h)
    return terms


def _side_grads(plan: _Plan, side: _Side, own: _Terms, cross: _Terms, h: Tensor, sums: Tensor, k_self: int):
    """Gradients of ``sum_s h_s MMD2_s`` w.r.t. the local points and raw local weights of ``side``."""
    da = own.da + cross.da
    if side.raw_sum is None:
        return da, None
    g = own.dwa + cross.dwa  # w.r.t. the normalised local weights, 1/den held fixed
    self_sum = sums[k_self]
    if plan.unbiased:  # d(1 / den)/dW_i = 2 W_{g(i)} / den^2
        wg = side.w[plan.rank].to(torch.float64).view(-1, side.group).sum(1).repeat_interleave(side.group)
        g = g + 2.0 * (h * self_sum).sum() / side.den**2 * wg
    # sum_j W_j g_j over all ranks, by Euler's identity: self/den has degree 2 (with 1 - den of degree 2), cross 1
    euler = (h * (2.0 * self_sum / side.den**2 - 2.0 * sums[2])).sum()
    return da, (g - euler) / side.raw_sum


def _grads(plan: _Plan, terms: dict, h: Tensor, sums: Tensor, grad_x: bool, grad_y: bool) -> list:
    gx = _side_grads(plan, plan.x, terms["xx"], terms["xy"], h, sums, 0) if grad_x else (None, None)
    gy = _side_grads(plan, plan.y, terms["yy"], terms["yx"], h, sums, 1) if grad_y else (None, None)
    return [gx[0], gx[1], gy[0], gy[1]]


def _times(h: Optional[Tensor], factor: Tensor) -> Optional[Tensor]:
    return None if h is None else h * factor


def _mmd(plan: _Plan, sums: Tensor) -> Tensor:
    mmd = sums[0] / plan.x.den + sums[1] / plan.y.den - 2.0 * sums[2]
    return mmd.sum() if plan.reduction == "sum" else mmd


class _GlobalMMD(torch.autograd.Function):
    """Global MMD² from the local inputs; the backward needs no communication.

    With ``reduction="sum"`` the cotangent of every bandwidth is the same scalar, so the forward runs the gradient
    passes with ``h = 1`` (each pass also returns the values) and the backward only rescales; with
    ``reduction="none"`` the forward runs value passes and the backward the gradient passes for its ``h``.
    """

    @staticmethod
    def forward(ctx, plan: _Plan, a_live, wa_live, b_live, wb_live):
        grad_x, grad_y = plan.grad_x, plan.grad_y
        fused = plan.reduction == "sum" and (grad_x or grad_y)
        h = torch.ones(plan.bw.shape, dtype=torch.float64, device=plan.bw.device) if fused else None
        local, terms = _local_pass(plan, _times(h, plan.factor), grad_x and fused, grad_y and fused)
        dist.all_reduce(local, group=plan.group_handle)  # the op's one all-reduce: 3 S float64 values
        sums = local * plan.factor
        ctx.save_for_backward(a_live, wa_live, b_live, wb_live)  # anchors of the first-order-only guard
        ctx.sums, ctx.flags = sums, (grad_x, grad_y)
        ctx.dtypes = (plan.a_dtype, torch.float64, plan.a_dtype, torch.float64)  # the live raw weights are float64
        ctx.fused = _grads(plan, terms, h, sums, grad_x, grad_y) if fused else None
        ctx.plan = None if fused else plan  # the gathered points are kept only if the backward needs them
        return _mmd(plan, sums)

    @staticmethod
    def backward(ctx, grad):
        if ctx.fused is not None:
            grads = [None if g is None else g * grad.to(torch.float64) for g in ctx.fused]
        else:
            plan = ctx.plan
            h = grad.to(torch.float64).expand(plan.bw.shape).contiguous()
            terms = _grad_pass(plan, h * plan.factor, *ctx.flags)
            grads = _grads(plan, terms, h, ctx.sums, *ctx.flags)
        grads = [None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        # under create_graph=True, a second derivative raises instead of silently missing the point dependence
        return (None, *first_order_only("distributed imq_mmd", grads, (grad, *ctx.saved_tensors)))
