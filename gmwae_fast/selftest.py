"""Post-install self-test: every usable backend on every present device against the float64 reference.

Run it after installing (exit status 0 when every check passes, 1 otherwise)::

    python -m gmwae_fast.selftest                    # every device and backend usable here
    python -m gmwae_fast.selftest --device cuda --backend triton --json selftest.json
    python -m gmwae_fast.selftest --quick            # the core checks only

or from Python (``gmwae_fast.selftest`` is this module, and calling it calls :func:`selftest`)::

    >>> import gmwae_fast
    >>> report = gmwae_fast.selftest(quick=True)      # prints the table
    >>> report.ok
    True

Checks, on small odd-sized inputs (none a power of two; larger ones on compiled backends, so the kernels' tiles
have ragged edges; tiny ones for Triton in the CPU interpreter):

* ``mmd/...``: :func:`gmwae_fast.fast_imq_mmd` value and gradients (points **and** weights) against
  :func:`gmwae_fast.reference.imq_mmd_reference` in float64 on the same inputs; plain ``(n, d)`` and grouped
  ``(B, K, d)`` inputs, unbiased and biased, float32 and bfloat16 (and float64 without ``--quick``); the fused
  value-and-gradient pass (gradients on both sides), the WAE pass (no gradient on the prior side), and without
  ``--quick`` the per-bandwidth pass (``reduction="none"``) and the gradient on ``y`` only. The value is also
  recomputed under :func:`torch.no_grad` (the values-only kernels).
* ``reparam/noise/...``: :func:`gmwae_fast.gm_reparameterize` with explicit noise: ``z``, ``pi`` and the
  gradients of ``mu``, ``sigma_raw`` and ``logits`` against float64 autograd of the same formula.
* ``reparam/seed/fp32``: with a seed: the noise read back as ``eps = (z - mu) / sigma`` has mean 0, variance 1,
  a normal distribution (Kolmogorov-Smirnov) and uncorrelated neighbours; the same seed gives the same ``z``,
  another seed another ``z``; the gradients match the closed form with that ``eps`` (so the backward regenerates
  the forward's noise).

Tolerances (``TOLERANCES``), as normalised errors:

* values: ``|v - r| / |r|``. float32: ``1e-5``, the accuracy contract of ``docs/ARCHITECTURE.md`` (per-pair math
  in float32, partial sums in float64). bfloat16 inputs are rounded to bfloat16 first and compared with the
  float64 reference *of the rounded inputs*; the kernels convert bfloat16 to float32 exactly and compute as for
  float32, so the same ``1e-5``. float64: ``1e-10``.
* point gradients: ``max |g - g_ref| / max |g_ref|`` per tensor. float32: ``1e-5`` (the same per-pair float32
  math; components near zero are judged against the tensor's scale, not their own). float64: ``1e-10``.
  bfloat16: ``8 u``, ``u = 2^-8`` the unit roundoff of bfloat16: gradients come back in bfloat16 and a point's
  gradient is the sum of its self-term and cross-term contributions, each rounded to bfloat16 by the kernels and
  added in bfloat16 by autograd (up to 4 roundings), of terms up to ~2.5x the total they sum to (they pull in
  opposite directions). A gradient that is wrong (sign, missing term, wrong index) is off by O(1).
* weight gradients: as point gradients, but float32 ``1e-4``: weights are normalised (``w / sum w``), so
  ``dL/dw_i = (g_i - sum_j w_j g_j) / sum w`` where the kernels' ``g_i`` (float32, about ``S`` times a kernel
  value) is ~100x larger than the result; its float32 rounding (``2^-24``) shows as ~1e-5 of the result.
* ``gm_reparameterize`` values and gradients: float32 ``1e-5`` of the tensor's scale (a few float32 roundings in
  softplus / exp, the product and the sum, each ``<= 2^-24``); bfloat16 ``4 u`` (the result rounded once, plus
  intermediates a backend may keep in bfloat16, e.g. ``pi`` in the softmax backward, whose terms partly cancel).
* noise statistics (``n`` samples, fixed seed): ``|mean| <= 6 / sqrt(n)``, ``|var - 1| <= 6 sqrt(2 / n)``,
  correlations ``<= 6 / sqrt(n)`` (six standard errors), KS distance ``<= 1.95 / sqrt(n) + 1 / n`` (0.1% level).

Triton runs on CPU tensors only when ``TRITON_INTERPRET=1`` was set before triton was imported
(:func:`gmwae_fast.available_backends` says so); it is then tested on tiny inputs. Times are wall-clock per check,
the float64 oracle included (the first call of a kernel includes its compilation), with a device synchronisation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
import types
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional, Sequence, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor

from . import PAPER_SCALES, available_backends, build_info, fast_imq_mmd, gm_reparameterize, reference

__all__ = ["selftest", "main", "SelftestReport", "CheckResult", "TOLERANCES"]

#: Normalised error bounds per (quantity, dtype); see the module docstring for the reasoning.
TOLERANCES: dict[str, dict[str, float]] = {
    "value": {"fp32": 1e-5, "bf16": 1e-5, "fp64": 1e-10},
    "grad": {"fp32": 1e-5, "bf16": 8 * 2.0**-8, "fp64": 1e-10},
    "weight_grad": {"fp32": 1e-4, "bf16": 8 * 2.0**-8, "fp64": 1e-10},
    "reparam": {"fp32": 1e-5, "bf16": 4 * 2.0**-8, "fp64": 1e-10},
}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
_SEED = 20261129


@dataclass
class CheckResult:
    """One check of one backend on one device. ``error`` / ``tol`` belong to the quantity named by ``what`` (the
    one closest to its bound); ``status`` is ``"pass"`` or ``"FAIL"``."""

    device: str
    backend: str
    check: str
    status: str
    error: Optional[float]
    tol: Optional[float]
    what: str
    time_s: float


@dataclass
class SelftestReport:
    """What :func:`selftest` ran: ``results``, ``not_run`` (``"device/backend[/op family]"`` -> reason) and ``problems``
    (requested devices or backends that cannot run here). ``ok`` is true when something ran and all passed."""

    results: list[CheckResult] = field(default_factory=list)
    not_run: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    time_s: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.results) and not self.problems and all(r.status == "pass" for r in self.results)

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "time_s": self.time_s,
            "results": [asdict(r) for r in self.results],
            "not_run": self.not_run,
            "problems": self.problems,
            "tolerances": TOLERANCES,
            "build_info": build_info(),
        }

    def table(self) -> str:
        head = ("device", "backend", "check", "status", "max error", "tol", "time", "quantity")
        rows = [
            (r.device, r.backend, r.check, r.status, _fmt(r.error), _fmt(r.tol), f"{r.time_s * 1e3:.0f} ms", r.what)
            for r in self.results
        ]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += [f"not run: {k}: {v}" for k, v in self.not_run.items()]
        lines += [f"PROBLEM: {p}" for p in self.problems]
        failed = sum(r.status != "pass" for r in self.results)
        verdict = "OK" if self.ok else "FAILED"
        passed = len(self.results) - failed
        lines.append(f"{verdict}: {passed}/{len(self.results)} checks passed in {self.time_s:.1f} s")
        return "\n".join(lines)


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1e}"


# --------------------------------------------------------------------------------------------------------------
# Inputs and error measures
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sizes:
    n: int  # plain x (n, d)
    m: int  # plain y (m, d)
    d: int
    B: int  # grouped x (B, K, dg)
    K: int
    B2: int  # grouped y (B2, K2, dg)
    K2: int
    dg: int
    stat: tuple  # (B, K, d) of the noise-statistics check


# Compiled backends: the plain cases (d = 7) take the CUDA-core route of the CUDA kernels, the grouped ones (d = 36,
# a multiple of 4 in 32 .. 64) the tensor-core route with 16-byte tile loads.
_COMPILED = _Sizes(n=203, m=157, d=7, B=67, K=3, B2=51, K2=5, dg=36, stat=(257, 7, 11))
_INTERPRETED = _Sizes(n=13, m=11, d=3, B=5, K=3, B2=7, K2=3, dg=5, stat=(29, 5, 7))


@dataclass
class _Ctx:
    device: str
    backend: str
    sizes: _Sizes
    gen: torch.Generator


def _randn(ctx: _Ctx, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=ctx.gen, dtype=torch.float64)


def _rand(ctx: _Ctx, *shape: int) -> Tensor:
    return torch.rand(*shape, generator=ctx.gen, dtype=torch.float64)


def _rel(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want| (float64, on the CPU)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        raise AssertionError(f"shape {tuple(got.shape)} != expected {tuple(want.shape)}")
    if not bool(torch.isfinite(got).all()):
        return math.inf
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / (scale if scale > 0 else 1.0)


def _value_err(got: Tensor, want: Tensor) -> float:
    """Elementwise relative error |v - r| / |r|, worst element."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        raise AssertionError(f"value shape {tuple(got.shape)} != expected {tuple(want.shape)}")
    if not bool(torch.isfinite(got).all()):
        return math.inf
    return ((got - want).abs() / want.abs().clamp_min(1e-300)).max().item()


def _grad_measures(
    names: Sequence[str], got: Sequence[Optional[Tensor]], want: Sequence[Optional[Tensor]], tols: Sequence[float]
) -> list[tuple[str, float, float]]:
    out = []
    for name, g, w, tol in zip(names, got, want, tols):
        if w is None:
            continue
        if g is None:
            raise AssertionError(f"no gradient reached {name}")
        out.append((f"grad {name}", _rel(g, w), tol))
    return out


# --------------------------------------------------------------------------------------------------------------
# fast_imq_mmd checks
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MMDCase:
    grouped: bool
    unbiased: bool
    dtype: str
    grads: str  # "all", "x" (the WAE pass: no gradient on the prior side) or "y"
    reduction: str = "sum"

    @property
    def name(self) -> str:
        parts = [
            "mmd",
            "grouped" if self.grouped else "plain",
            "unbiased" if self.unbiased else "biased",
            self.dtype,
            {"all": "grad-xy", "x": "grad-x", "y": "grad-y"}[self.grads],
        ]
        if self.reduction == "none":
            parts.append("per-bandwidth")
        return "/".join(parts)


def _mmd_inputs(case: _MMDCase, ctx: _Ctx) -> list[Tensor]:
    """x, x_weights, y, y_weights in float64, already rounded to the case's dtype."""
    s = ctx.sizes
    if case.grouped:
        shapes = [(s.B, s.K, s.dg), (s.B, s.K), (s.B2, s.K2, s.dg), (s.B2, s.K2)]
    else:
        shapes = [(s.n, s.d), (s.n,), (s.m, s.d), (s.m,)]
    x = _randn(ctx, *shapes[0])
    y = 1.3 * _randn(ctx, *shapes[2]) + 0.4  # another law: MMD^2 well away from zero at these sizes
    xw = _rand(ctx, *shapes[1]) + 0.2
    yw = _rand(ctx, *shapes[3]) + 0.2
    dt = _DTYPES[case.dtype]
    return [t.to(dt).double() for t in (x, xw, y, yw)]


def _mmd_call(case: _MMDCase, tensors: Sequence[Tensor], backend: Optional[str]) -> Tensor:
    x, xw, y, yw = tensors
    if backend is None:  # the float64 oracle
        bws = reference.bandwidths_for(x.shape[-1], PAPER_SCALES)
        return reference.imq_mmd_reference(
            x, y, xw, yw, bandwidths=bws, unbiased=case.unbiased, reduction=case.reduction
        )
    return fast_imq_mmd(
        x, y, xw, yw, scales=PAPER_SCALES, unbiased=case.unbiased, reduction=case.reduction, backend=backend
    )


def _leaves(tensors: Sequence[Tensor], dtype: torch.dtype, device: str, grads: str) -> list[Tensor]:
    want = {"all": (True,) * 4, "x": (True, True, False, False), "y": (False, False, True, True)}[grads]
    return [t.detach().to(device=device, dtype=dtype, copy=True).requires_grad_(g) for t, g in zip(tensors, want)]


def _check_mmd(case: _MMDCase, ctx: _Ctx) -> list[tuple[str, float, float]]:
    base = _mmd_inputs(case, ctx)
    ref_in = _leaves(base, torch.float64, "cpu", case.grads)
    ref = _mmd_call(case, ref_in, None)
    # the cotangent of reduction="none" is rounded to float32 (what the backend gets for non-float64 inputs)
    cot = _randn(ctx, *ref.shape).float().double() if case.reduction == "none" else torch.ones((), dtype=torch.float64)
    ref.backward(cot)

    test_in = _leaves(base, _DTYPES[case.dtype], ctx.device, case.grads)
    out = _mmd_call(case, test_in, ctx.backend)
    out.backward(cot.to(device=ctx.device, dtype=out.dtype))
    with torch.no_grad():
        out_ng = _mmd_call(case, test_in, ctx.backend)

    vt, gt, wt = (TOLERANCES[k][case.dtype] for k in ("value", "grad", "weight_grad"))
    res = [("value", _value_err(out, ref), vt), ("value (no grad)", _value_err(out_ng, ref), vt)]
    names = ("x", "x_weights", "y", "y_weights")
    return res + _grad_measures(names, [t.grad for t in test_in], [t.grad for t in ref_in], (gt, wt, gt, wt))


def _mmd_cases(quick: bool) -> list[_MMDCase]:
    cases = [
        _MMDCase(False, True, "fp32", "all"),
        _MMDCase(True, True, "fp32", "x"),
        _MMDCase(False, True, "bf16", "all"),
        _MMDCase(True, False, "fp32", "all"),
    ]
    if quick:
        return cases
    return cases + [
        _MMDCase(False, False, "fp32", "x"),
        _MMDCase(True, True, "fp32", "all"),
        _MMDCase(False, True, "fp32", "y"),
        _MMDCase(True, True, "fp32", "all", "none"),
        _MMDCase(False, False, "fp32", "all", "none"),
        _MMDCase(True, True, "bf16", "x"),
        _MMDCase(True, False, "bf16", "all"),
        _MMDCase(False, True, "fp64", "all"),
        _MMDCase(True, True, "fp64", "all", "none"),
    ]


# --------------------------------------------------------------------------------------------------------------
# gm_reparameterize checks
# --------------------------------------------------------------------------------------------------------------


def _reparam_inputs(ctx: _Ctx, shape: tuple, dtype: torch.dtype) -> list[Tensor]:
    """mu, sigma_raw, logits in float64, rounded to dtype."""
    B, K, d = shape
    mu, sr, lg = _randn(ctx, B, K, d), 0.5 * _randn(ctx, B, K, d), 2.0 * _randn(ctx, B, K)
    return [t.to(dtype).double() for t in (mu, sr, lg)]


def _reparam_formula(mu: Tensor, sr: Tensor, lg: Tensor, eps: Tensor, act: str) -> tuple[Tensor, Tensor]:
    sigma = F.softplus(sr) if act == "softplus" else torch.exp(sr)
    return mu + sigma * eps, torch.softmax(lg, dim=-1)


def _reparam_grads(
    ctx: _Ctx,
    z: Tensor,
    pi: Tensor,
    leaves: Sequence[Tensor],
    ref: tuple[Tensor, Tensor],
    ref_leaves: Sequence[Tensor],
    tol: float,
):
    # cotangents rounded to the outputs' dtypes, so the oracle sees exactly what the backend gets
    gz, gpi = _randn(ctx, *z.shape).to(z.dtype).double(), _randn(ctx, *pi.shape).to(pi.dtype).double()
    torch.autograd.backward(ref, (gz, gpi))
    torch.autograd.backward((z, pi), (gz.to(device=z.device, dtype=z.dtype), gpi.to(device=z.device, dtype=pi.dtype)))
    return _grad_measures(
        ("mu", "sigma_raw", "logits"), [t.grad for t in leaves], [t.grad for t in ref_leaves], (tol,) * 3
    )


def _check_reparam_noise(ctx: _Ctx, dtype_name: str, act: str) -> list[tuple[str, float, float]]:
    s = ctx.sizes
    shape = (s.B, s.K, s.dg)
    base = _reparam_inputs(ctx, shape, _DTYPES[dtype_name])
    noise = _randn(ctx, *shape).to(_DTYPES[dtype_name]).double()
    ref_leaves = _leaves(base, torch.float64, "cpu", "all")
    ref = _reparam_formula(*ref_leaves, noise, act)
    leaves = _leaves(base, _DTYPES[dtype_name], ctx.device, "all")
    z, pi = gm_reparameterize(
        *leaves, noise=noise.to(device=ctx.device, dtype=_DTYPES[dtype_name]), sigma_activation=act, backend=ctx.backend
    )
    tol = TOLERANCES["reparam"][dtype_name]
    res = [("z", _rel(z, ref[0]), tol), ("pi", _rel(pi, ref[1]), tol)]
    return res + _reparam_grads(ctx, z, pi, leaves, ref, ref_leaves, tol)


def _noise_stats(eps: Tensor) -> list[tuple[str, float, float]]:
    """|mean|, |var - 1|, KS distance to N(0, 1), neighbour / mode correlations, with their bounds."""
    x = eps.reshape(-1)
    n = x.numel()
    se = 6.0 / math.sqrt(n)
    xs = x.sort().values
    cdf = 0.5 * (1.0 + torch.special.erf(xs / math.sqrt(2.0)))
    emp_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum((emp_hi - cdf).abs(), (emp_hi - 1.0 / n - cdf).abs()).max().item()

    def corr(a: Tensor, b: Tensor) -> float:
        return abs(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1].item())

    res = [
        ("noise mean", abs(x.mean().item()), se),
        ("noise variance - 1", abs(x.var().item() - 1.0), 6.0 * math.sqrt(2.0 / n)),
        ("noise KS distance", ks, 1.95 / math.sqrt(n) + 1.0 / n),
    ]
    res += [(f"noise lag-{lag} correlation", corr(x[:-lag], x[lag:]), se) for lag in (1, 4)]
    res.append(("noise mode-to-mode correlation", corr(eps[:, :-1], eps[:, 1:]), se))
    return res


def _check_reparam_seed(ctx: _Ctx) -> list[tuple[str, float, float]]:
    shape = ctx.sizes.stat
    base = _reparam_inputs(ctx, shape, torch.float32)
    leaves = _leaves(base, torch.float32, ctx.device, "all")
    z, pi = gm_reparameterize(*leaves, seed=_SEED, backend=ctx.backend)
    eps = (z.detach().double().cpu() - base[0]) / F.softplus(base[1])
    res = _noise_stats(eps)
    with torch.no_grad():
        z_same, _ = gm_reparameterize(*leaves, seed=_SEED, backend=ctx.backend)
        z_other, _ = gm_reparameterize(*leaves, seed=_SEED + 1, backend=ctx.backend)
    res.append(("same seed, same z (max |dz|)", (z_same - z).abs().max().item(), 0.0))
    res.append(("other seed, fraction of equal z", (z_other == z).double().mean().item(), 0.01))
    ref_leaves = _leaves(base, torch.float64, "cpu", "all")
    ref = _reparam_formula(*ref_leaves, eps, "softplus")
    return res + _reparam_grads(ctx, z, pi, leaves, ref, ref_leaves, TOLERANCES["reparam"]["fp32"])


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------

_Check = tuple[str, Callable[[_Ctx], list]]


def _checks(quick: bool) -> list[_Check]:
    checks: list[_Check] = [(c.name, (lambda ctx, c=c: _check_mmd(c, ctx))) for c in _mmd_cases(quick)]
    noise = [("fp32", "softplus")] + ([] if quick else [("fp32", "exp"), ("bf16", "softplus")])
    checks += [
        (f"reparam/noise/{dt}/{act}", (lambda ctx, dt=dt, act=act: _check_reparam_noise(ctx, dt, act)))
        for dt, act in noise
    ]
    checks.append(("reparam/seed/fp32", _check_reparam_seed))
    return checks


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _closeness(m: tuple[str, float, float]) -> float:
    """error / tol of one measure (how close it came to failing)."""
    return m[1] / m[2] if m[2] > 0 else (0.0 if m[1] == 0 else math.inf)


def _run_one(device: str, backend: str, name: str, fn: Callable[[_Ctx], list]) -> CheckResult:
    sizes = _INTERPRETED if (backend == "triton" and device == "cpu") else _COMPILED
    gen = torch.Generator().manual_seed(_SEED + sum(map(ord, name)))  # the same inputs on every backend
    t0 = time.perf_counter()
    try:
        measures = fn(_Ctx(device, backend, sizes, gen))
        _sync(device)
    except Exception as exc:  # a crash is a failure, reported with its message
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip().replace("\n", " ")
        return CheckResult(device, backend, name, "FAIL", None, None, detail[:300], time.perf_counter() - t0)
    elapsed = time.perf_counter() - t0
    bad = [m for m in measures if not m[1] <= m[2]]  # NaN fails too
    worst = bad[0] if bad else max(measures, key=_closeness)
    return CheckResult(device, backend, name, "FAIL" if bad else "pass", worst[1], worst[2], worst[0], elapsed)


def _family(check: str) -> str:
    """The op family (``gmwae_fast.backends.OP_FAMILIES``) a check exercises."""
    return "gm_reparam" if check.startswith("reparam/") else "imq_mmd"


def _plan(
    device: Optional[str], backend: Optional[str], families: Iterable[str], report: SelftestReport
) -> list[tuple[str, str, str]]:
    """(device, backend, op family) triples to run; the rest recorded in ``report.not_run`` (``"device/backend"``,
    or ``"device/backend/family"`` when the backend runs another family there) and ``report.problems``."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if device not in (None, "all"):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {device!r}; expected 'cpu', 'cuda' or 'all'")
        if device not in devices:
            report.problems.append(f"device {device!r} requested but no CUDA device is available")
        devices = [d for d in devices if d == device]
    families = sorted(set(families) or {_family(n) for n, _ in _checks(False)})
    triples = []
    for dev in devices:
        reasons = {fam: available_backends(dev, op=fam) for fam in families}
        for name in next(iter(reasons.values()), {}):
            if backend not in (None, "all") and name != backend:
                continue
            why = {fam: r[name] for fam, r in reasons.items() if r[name] is not None}
            triples += [(dev, name, fam) for fam in families if fam not in why]
            if len(why) == len(families):
                report.not_run[f"{dev}/{name}"] = "; ".join(dict.fromkeys(why.values()))
            else:
                report.not_run.update({f"{dev}/{name}/{fam}": r for fam, r in why.items()})
    if backend not in (None, "all") and devices and not triples:
        report.problems.append(
            f"backend {backend!r} cannot run on {', '.join(devices)}: " + "; ".join(report.not_run.values())
        )
    return triples


class _Progress:
    """A tqdm bar when ``stream`` is a terminal and tqdm is installed, else one plain line per check."""

    def __init__(self, total: int, stream: TextIO, bar: Optional[bool]) -> None:
        self.total, self.stream, self.done, self.bar = total, stream, 0, None
        if bar is None:
            bar = hasattr(stream, "isatty") and stream.isatty()
        if bar:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, file=stream, desc="selftest", unit="check", leave=False)

    def update(self, r: CheckResult) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{r.device}/{r.backend} {r.check}", refresh=False)
            self.bar.update(1)
            return
        print(
            f"[{self.done}/{self.total}] {r.device}/{r.backend} {r.check}: {r.status} "
            f"({r.what} {_fmt(r.error)} <= {_fmt(r.tol)}, {r.time_s * 1e3:.0f} ms)",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def selftest(
    device: Optional[str] = None,
    backend: Optional[str] = None,
    *,
    quick: bool = False,
    json_path: Optional[str] = None,
    verbose: bool = True,
    progress: Optional[bool] = None,
    checks: Optional[Iterable[str]] = None,
) -> SelftestReport:
    """Check every usable backend on every present device against the float64 reference (see the module docs).

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``None`` / ``"all"`` (every present device).
        backend: one of ``"reference"``, ``"triton"``, ``"cpu"``, ``"cuda"``, or ``None`` / ``"all"``.
        quick: only the core checks (plain and grouped float32, bfloat16, noise and seed of the reparameterisation).
        json_path: also write the report as JSON there.
        verbose: print progress (to stderr) and the table (to stdout).
        progress: force (``True``) or refuse (``False``) the tqdm bar; default: a bar only on a terminal.
        checks: run only the checks whose name starts with one of these prefixes (e.g. ``["mmd/plain"]``).

    Returns:
        A :class:`SelftestReport`; ``report.ok`` is false if any check failed or a requested device or backend
        cannot run here.
    """
    t0 = time.perf_counter()
    report = SelftestReport()
    todo = [c for c in _checks(quick) if checks is None or any(c[0].startswith(p) for p in checks)]
    runs = [
        (dev, be, name, fn)
        for dev, be, fam in _plan(device, backend, {_family(n) for n, _ in todo}, report)
        for name, fn in todo
        if _family(name) == fam
    ]
    bar = _Progress(len(runs), sys.stderr, progress) if verbose else None
    for dev, be, name, fn in runs:
        report.results.append(_run_one(dev, be, name, fn))
        if bar is not None:
            bar.update(report.results[-1])
    if bar is not None:
        bar.close()
    report.time_s = time.perf_counter() - t0
    if verbose:
        print(report.table(), flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report.to_json(), f, indent=1, default=str)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m gmwae_fast.selftest``: 0 when every check passes, 1 on any failure."""
    p = argparse.ArgumentParser(
        prog="python -m gmwae_fast.selftest",
        description="Check every usable gmwae_fast backend against the float64 reference.",
    )
    p.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    p.add_argument("--backend", choices=("all", "reference", "triton", "cpu", "cuda"), default="all")
    p.add_argument("--json", metavar="PATH", default=None, help="write machine-readable results there")
    p.add_argument("--quick", action="store_true", help="only the core checks")
    p.add_argument(
        "--check",
        action="append",
        default=None,
        metavar="PREFIX",
        help="run only checks whose name starts with PREFIX (repeatable), e.g. mmd/plain",
    )
    a = p.parse_args(argv)
    report = selftest(a.device, a.backend, quick=a.quick, json_path=a.json, checks=a.check)
    return 0 if report.ok else 1


class _CallableModule(types.ModuleType):
    """Makes ``gmwae_fast.selftest(...)`` call :func:`selftest` although ``gmwae_fast.selftest`` is this module."""

    def __call__(self, *args, **kwargs) -> SelftestReport:
        return selftest(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
