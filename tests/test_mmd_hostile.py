"""Hostile inputs to fast_imq_mmd / imq_mmd_terms, and a property-based test of every CPU-runnable backend against
an independent float64 brute force written from the contract (README "Math contract").

Each named case is one an adversarial test found: weight normalisation in float32, weights whose sum overflows,
bandwidths that under/overflow, one-row inputs in float64, double backward, eps, tensors as sigma2.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import brute_force, interpreted, skip_unless_usable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gmwae_fast
from gmwae_fast import PAPER_SCALES, WAE_SCALES, fast_imq_mmd, imq_mmd_terms
from gmwae_fast.reference import bandwidths_for

CPU_BACKENDS = ["reference", "cpu", "triton"]


def _rel(v, r):
    return float((v.double() - r).abs().max() / r.abs().max().clamp_min(1e-300))


def _skip(backend):
    skip_unless_usable("cpu", backend)


# ----------------------------------------------------------------------------------------------------------------
# Weight normalisation (float64, consistent with what the kernels see)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu"])
def test_unweighted_float32_meets_the_accuracy_contract(backend):
    _skip(backend)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1000, 10, generator=g), torch.randn(1000, 10, generator=g)
    bws = bandwidths_for(10, PAPER_SCALES)
    v = fast_imq_mmd(x, y, scales=PAPER_SCALES, backend=backend)
    r = fast_imq_mmd(x.double(), y.double(), scales=PAPER_SCALES, backend="reference")
    assert abs(v.item() - r.item()) <= 1e-5 * abs(r.item()), (v.item(), r.item())
    assert r.item() == pytest.approx(brute_force(x, y, bandwidths=bws).sum().item(), rel=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_concentrated_weights_per_bandwidth(backend):
    _skip(backend)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 10, generator=g), torch.randn(60, 10, generator=g)
    w = torch.full((50,), 1e-6)
    w[0] = 1.0
    bws = bandwidths_for(10, WAE_SCALES)
    v = fast_imq_mmd(x, y, w, reduction="none", backend=backend)
    r = brute_force(x, y, w, bandwidths=bws)
    assert _rel(v, r) <= 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("validate", [False, True])
def test_weights_whose_float32_sum_overflows(backend, validate):
    _skip(backend)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 5, generator=g), torch.randn(30, 5, generator=g) + 0.3
    w = torch.full((40,), 1e37, requires_grad=True)
    v = fast_imq_mmd(x, y, w, validate=validate, backend=backend)
    r = fast_imq_mmd(x.double(), y.double(), backend="reference")
    assert v.item() == pytest.approx(r.item(), rel=1e-5)
    (gw,) = torch.autograd.grad(v, w)
    wr = w.detach().double().requires_grad_(True)
    (gr,) = torch.autograd.grad(brute_force(x, y, wr, bandwidths=bandwidths_for(5, WAE_SCALES)).sum(), wr)
    # ~1e-39: float32 holds these only as subnormals (resolution 1.4e-45)
    assert float((gw.double() - gr).abs().max()) <= 1e-4 * float(gr.abs().max()) + 1e-44


# ----------------------------------------------------------------------------------------------------------------
# Bandwidths, scales, sigma2, eps
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,dtype",
    [
        (dict(scales=[1e-200], sigma2=1e-200), torch.float64),
        (dict(scales=[1e300], sigma2=1e300), torch.float64),
        (dict(bandwidths=[1e-50]), torch.float32),
        (dict(bandwidths=[1e-37]), torch.float32),  # normal, but below 64 x the smallest normal float32
        (dict(bandwidths=[1e39]), torch.float32),
        (dict(bandwidths=[float("nan")]), torch.float64),
        (dict(scales=[1.0], eps=float("inf")), torch.float64),
    ],
)
def test_bandwidths_outside_the_compute_dtype_are_refused(kwargs, dtype):
    x, y = torch.randn(6, 3, dtype=dtype), torch.randn(5, 3, dtype=dtype)
    with pytest.raises(ValueError, match="bandwidth|eps"):
        fast_imq_mmd(x, y, backend="reference", **kwargs)


@pytest.mark.parametrize(
    "bad,exc",
    [
        ("12", TypeError),
        (b"12", TypeError),
        (5.0, TypeError),
        ([1.0, "a"], TypeError),
        ([], ValueError),
        ([1.0, -2.0], ValueError),
    ],
)
def test_scales_must_be_a_sequence_of_positive_numbers(bad, exc):
    with pytest.raises(exc, match="scales"):
        fast_imq_mmd(torch.randn(4, 2), torch.randn(4, 2), scales=bad)


def test_sigma2_accepts_a_one_element_tensor():
    x, y = torch.randn(9, 3), torch.randn(7, 3)
    assert fast_imq_mmd(x, y, sigma2=torch.tensor(2.0)).item() == fast_imq_mmd(x, y, sigma2=2.0).item()
    with pytest.raises(TypeError, match="sigma2"):
        fast_imq_mmd(x, y, sigma2=torch.ones(2))
    with pytest.raises(TypeError, match="sigma2"):
        fast_imq_mmd(x, y, sigma2="2")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("unbiased", [True, False])
def test_eps_matches_the_brute_force(backend, unbiased):
    _skip(backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, 4, dtype=torch.float64, generator=g).requires_grad_(True)
    y = torch.randn(13, 4, dtype=torch.float64, generator=g)
    bws = bandwidths_for(4, (0.1, 1.0, 10.0))
    v = fast_imq_mmd(x, y, bandwidths=bws, eps=0.25, unbiased=unbiased, backend=backend)
    xr = x.detach().clone().requires_grad_(True)
    r = brute_force(xr, y, bandwidths=bws, unbiased=unbiased, eps=0.25).sum()
    assert v.item() == pytest.approx(r.item(), rel=1e-10)
    (gv,) = torch.autograd.grad(v, x)
    (gr,) = torch.autograd.grad(r, xr)
    assert _rel(gv, gr) <= 1e-9
    with pytest.raises(ValueError, match="eps"):
        fast_imq_mmd(x, y, eps=-1.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_terms_rebuild_the_mmd_and_are_differentiable(backend):
    _skip(backend)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 4, dtype=torch.float64, generator=g).requires_grad_(True)
    w = torch.rand(5, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    y = torch.randn(17, 4, dtype=torch.float64, generator=g)
    t = imq_mmd_terms(x, y, w, backend=backend)
    assert isinstance(t, gmwae_fast.IMQMMDTerms)
    ref = fast_imq_mmd(x, y, w, reduction="none", backend="reference")
    assert _rel(t.mmd().detach(), ref.detach()) <= 1e-10
    assert float(t.den_y) == pytest.approx(1 - 1 / 17, rel=1e-12)
    gv = torch.autograd.grad(t.mmd().sum(), (x, w))
    gr = torch.autograd.grad(ref.sum(), (x, w))
    for a, b in zip(gv, gr):
        assert _rel(a, b) <= 1e-9


# ----------------------------------------------------------------------------------------------------------------
# Autograd: one-row inputs, double backward
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("shape", [(1, 3), (1, 1, 3)])
def test_one_row_float64_backward(backend, shape):
    _skip(backend)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    fast_imq_mmd(x, y, unbiased=False, backend=backend).backward()
    yr = y.detach().clone().requires_grad_(True)
    brute_force(x, yr, bandwidths=bandwidths_for(3, WAE_SCALES), unbiased=False).sum().backward()
    assert _rel(y.grad, yr.grad) <= 1e-10


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_double_backward_raises_instead_of_returning_zero(backend, reduction):
    _skip(backend)
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(7, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 3, dtype=torch.float64)
    v = fast_imq_mmd(x, y, w, reduction=reduction, backend=backend).sum()
    gx, gw = torch.autograd.grad(v, (x, w), create_graph=True)  # first order with create_graph still works
    xr = x.detach().clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(fast_imq_mmd(xr, y, w.detach(), backend="reference"), xr)
    assert _rel(gx.detach(), gr) <= 1e-9
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gx.pow(2).sum(), x)


def test_reference_backend_gives_second_derivatives():
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 2, dtype=torch.float64)
    (gx,) = torch.autograd.grad(fast_imq_mmd(x, y, backend="reference"), x, create_graph=True)
    (hx,) = torch.autograd.grad(gx.pow(2).sum(), x)
    xr = x.detach().clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(
        brute_force(xr, y, bandwidths=bandwidths_for(2, WAE_SCALES)).sum(), xr, create_graph=True
    )
    (hr,) = torch.autograd.grad(gr.pow(2).sum(), xr)
    assert hr.abs().max() > 1e-4 and _rel(hx, hr) <= 1e-8


def test_gm_reparameterize_double_backward_raises():
    skip_unless_usable("cpu", "cpu")
    mu = torch.randn(3, 4, 2, requires_grad=True)
    sr = torch.randn(3, 4, 2, requires_grad=True)
    lg = torch.randn(3, 4, requires_grad=True)
    z, pi = gmwae_fast.gm_reparameterize(mu, sr, lg, seed=7, backend="cpu")
    (gs,) = torch.autograd.grad((z.pow(2).sum() + pi.pow(2).sum()), sr, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gs.sum(), sr)


def test_gm_reparameterize_refuses_negative_tensor_seed():
    mu = torch.randn(2, 3, 2)
    with pytest.raises(ValueError, match="seed"):
        gmwae_fast.gm_reparameterize(mu, mu, torch.randn(2, 3), seed=torch.tensor(-5))


# ----------------------------------------------------------------------------------------------------------------
# No host syncs on the op's path; torch.compile as the first call of a fresh process
# ----------------------------------------------------------------------------------------------------------------


def test_cpu_path_makes_no_host_reads_of_tensors(monkeypatch):
    """On CPU a host read is free, but the same code runs on CUDA tensors, where it is a device sync."""
    skip_unless_usable("cpu", "cpu")
    x = torch.randn(9, 2, 3, requires_grad=True)
    w = torch.rand(9, 2, requires_grad=True)
    y = torch.randn(11, 3)
    fast_imq_mmd(x, y, w)  # warm up: lazy imports and registrations may read tensors once

    def boom(*_a, **_k):
        raise AssertionError("a host read of a tensor on the op's path")

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    for reduction in ("sum", "none"):
        v = fast_imq_mmd(x, y, w, reduction=reduction)
        torch.autograd.grad(v.sum(), (x, w))
        fast_imq_mmd(x.detach(), y, reduction=reduction)
    torch.autograd.grad(fast_imq_mmd(x, y), x)  # the one-node route (unweighted)
    torch.autograd.grad(fast_imq_mmd(y, x), x)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_path_makes_no_device_sync(backend):
    skip_unless_usable("cuda", backend)
    x = torch.randn(37, 3, 5, device="cuda", requires_grad=True)
    w = torch.rand(37, 3, device="cuda", requires_grad=True)
    y = torch.randn(101, 5, device="cuda")
    mu, sr, lg = (torch.randn(7, 3, 5, device="cuda", requires_grad=True) for _ in range(3))
    lg = lg[..., 0].detach().requires_grad_(True)

    def step():
        z, pi = gmwae_fast.gm_reparameterize(mu, sr, lg, backend=backend)
        v = fast_imq_mmd(x, y, w, backend=backend) + fast_imq_mmd(z, y, pi, backend=backend)
        v = v + fast_imq_mmd(x, y, backend=backend)  # the one-node route (unweighted)
        torch.autograd.grad(v, (x, w, mu, sr, lg))
        fast_imq_mmd(x.detach(), y, reduction="none", backend=backend)

    step()  # warm-up: compilation, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_torch_compile_fullgraph_as_first_call():
    skip_unless_usable("cpu", "cpu")
    code = (
        "import torch, gmwae_fast\n"
        "f = torch.compile(lambda x, y: gmwae_fast.fast_imq_mmd(x, y), fullgraph=True, backend='aot_eager')\n"
        "x = torch.randn(10, 3, requires_grad=True); y = torch.randn(12, 3)\n"
        "v = f(x, y); v.backward()\n"
        "r = gmwae_fast.fast_imq_mmd(x.detach(), y)\n"
        "assert abs(v.item() - r.item()) <= 1e-6 * abs(r.item()), (v.item(), r.item())\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------------
# Property-based: every CPU-runnable backend against the brute force
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def mmd_cases(draw, max_points):
    d = draw(st.integers(1, 9))
    kx = draw(st.sampled_from([None, 1, 2, 3]))
    bx = draw(st.integers(2, max(2, max_points // (kx or 1))))
    my = draw(st.integers(2, max_points))
    unbiased = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    weighted = draw(st.sampled_from(["none", "x", "both"]))
    spread = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    outlier = draw(st.sampled_from([None, 1e3]))
    concentrated = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    scales = draw(st.sampled_from([PAPER_SCALES, (0.5,), (0.1, 10.0)]))
    return dict(
        d=d,
        kx=kx,
        bx=bx,
        my=my,
        unbiased=unbiased,
        dtype=dtype,
        weighted=weighted,
        spread=spread,
        outlier=outlier,
        concentrated=concentrated,
        seed=seed,
        scales=scales,
    )


def _make(case):
    g = torch.Generator().manual_seed(case["seed"])
    shape = (case["bx"], case["d"]) if case["kx"] is None else (case["bx"], case["kx"], case["d"])
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * case["spread"]).to(case["dtype"])
    y = (torch.randn(case["my"], case["d"], generator=g, dtype=torch.float64) * case["spread"] + 0.1).to(case["dtype"])
    if case["outlier"] is not None:
        x.view(-1, case["d"])[0] += case["outlier"] * case["spread"]

    def weights(n_shape):
        w = torch.rand(*n_shape, generator=g, dtype=torch.float64) + 0.05
        if case["concentrated"]:
            w = w * 1e-4
            w.view(-1)[-1] = 1.0
        return w.to(case["dtype"])

    xw = weights(shape[:-1]) if case["weighted"] in ("x", "both") else None
    yw = weights((case["my"],)) if case["weighted"] == "both" else None
    return x, y, xw, yw


def _check_case(case, backend):
    x, y, xw, yw = _make(case)
    if case["unbiased"] and xw is not None and case["kx"] is not None and case["concentrated"]:
        pass  # still defined: at least two groups carry mass
    bws = bandwidths_for(case["d"], case["scales"])
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, y, xw, yw)]
    v = fast_imq_mmd(*leaves, scales=case["scales"], unbiased=case["unbiased"], reduction="none", backend=backend)
    refs = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, y, xw, yw)]
    r = brute_force(*refs, bandwidths=bws, unbiased=case["unbiased"])
    # A cotangent that weighs the bandwidths differently: exercises reduction="none" gradients.
    h = torch.linspace(1.0, 2.0, len(bws), dtype=torch.float64)
    gv = torch.autograd.grad((v.double() * h).sum(), [t for t in leaves if t is not None])
    gr = torch.autograd.grad((r * h).sum(), [t for t in refs if t is not None])
    f32 = case["dtype"] == torch.float32
    # Values: relative to the size of the terms MMD² is a difference of (it may be ~0 itself).
    scale = float(
        brute_force(*[t.detach() if t is not None else None for t in refs], bandwidths=bws, unbiased=False).abs().max()
    ) + float(r.detach().abs().max())
    tol = 2e-5 if f32 else 1e-10
    assert float((v.detach().double() - r.detach()).abs().max()) <= tol * scale, (v, r)
    # Gradients: MMD² is a difference of terms, and the unbiased self terms are ratios whose denominator
    # 1 - sum_g W_g^2 can be small (concentrated weights); the gradient is then a cancellation of parts of size
    # (per bandwidth, since 0 < k <= 1 and |psi(D)| |a - b| <= 0.65 / sqrt(C)) 2 / den for a weight and
    # 4 * 0.65 / sqrt(C) / den for a point. Errors are measured against those parts, as the values are above.
    den = 1.0
    if case["unbiased"]:
        for t, g in ((refs[2], case["kx"] or 1), (refs[3], 1)):
            if t is not None:
                wn = t.detach().reshape(-1) / t.detach().sum()
                den = min(den, float(1.0 - (wn.view(-1, g).sum(1) ** 2).sum()))
    c = torch.tensor(bws, dtype=torch.float64)
    part = {"w": 2.0 * float((torch.ones_like(c) * h).sum()) / den, "p": 2.6 * float((h / c.sqrt()).sum()) / den}
    kinds = ["p", "p"] + ["w" for t in (xw, yw) if t is not None]
    gtol = 2e-5 if f32 else 1e-10
    for kind, a, b in zip(kinds, gv, gr):
        err = float((a.double() - b).abs().max())
        assert err <= gtol * (float(b.abs().max()) + part[kind]), (kind, err, a, b)


_FAR_OUTLIER_F64 = dict(
    d=2, kx=2, bx=4, my=2, unbiased=False, dtype=torch.float64, weighted="none", spread=30.0, outlier=1000.0,
    concentrated=False, seed=0, scales=PAPER_SCALES,
)  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_far_outlier_float64_example(backend):
    """Found by the property test below: the reference's expanded distances |a|^2 + |b|^2 - 2 a.b lost 2e-7 on the
    outlier's own pair (|a|^2 ~ 1e9), a 1.5e-7 relative error of MMD² in float64; direct differences are exact."""
    _skip(backend)
    _check_case(_FAR_OUTLIER_F64, backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mmd_cases(max_points=30))
def test_property_against_brute_force(backend, case):
    _skip(backend)
    _check_case(case, backend)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mmd_cases(max_points=10))
def test_property_against_brute_force_triton_interpreted(case):
    _skip("triton")
    assert interpreted("cpu", "triton")
    _check_case(case, "triton")


# ----------------------------------------------------------------------------------------------------------------
# The power-of-two weight scaling: differentiable on every supported torch, no overflow for subnormal weights
# ----------------------------------------------------------------------------------------------------------------


def _weight_grad(backend, x, y, w):
    w = w.detach().clone().requires_grad_(True)
    (gw,) = torch.autograd.grad(fast_imq_mmd(x, y, w, backend=backend), w)
    return gw


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("top", [1.0, 3.0, 1e30])
def test_weight_gradient_when_the_largest_weight_is_at_least_one(backend, top):
    # torch.ldexp(t, negative int tensor) has a zero gradient in torch 2.11: the old scaling returned zero weight
    # gradients whenever max |w| >= 1, silently
    _skip(backend)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(23, 4, dtype=torch.float64, generator=g), torch.randn(17, 4, dtype=torch.float64, generator=g)
    w = torch.rand(23, dtype=torch.float64, generator=g) * top + 1e-3
    gw = _weight_grad(backend, x, y, w)
    wr = w.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(brute_force(x, y, wr, bandwidths=bandwidths_for(4, WAE_SCALES)).sum(), wr)
    assert float(gr.abs().max()) > 0
    assert float((gw - gr).abs().max()) <= 1e-9 * float(gr.abs().max())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tiny", [2e-309, 1e-300])
def test_subnormal_weights_give_finite_exact_gradients(backend, tiny):
    # MMD is invariant under w -> c w, so d/dw MMD(w) = c * (d/dv MMD)(v = c w): the gradient at subnormal weights
    # is an exact power-of-two multiple of the gradient at normal weights (here ~1e307: still representable)
    _skip(backend)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(40, 3, dtype=torch.float64, generator=g), torch.randn(9, 3, dtype=torch.float64, generator=g)
    w = (torch.rand(40, dtype=torch.float64, generator=g) * 0.5 + 0.5) * tiny
    gw = _weight_grad(backend, x, y, w)
    _, e = torch.frexp(w.max())
    k = -int(e)  # v = w 2^k has its largest entry in [0.5, 1)
    v = (w * 2.0 ** (k // 2)) * 2.0 ** (k - k // 2)
    gv = _weight_grad("reference", x, y, v)
    expected = (gv * 2.0 ** (k // 2)) * 2.0 ** (k - k // 2)
    assert torch.isfinite(expected).all(), "the case must have a representable gradient"
    assert torch.isfinite(gw).all(), gw
    assert float((gw - expected).abs().max()) <= 1e-9 * float(expected.abs().max())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_smallest_subnormal_weights_never_give_nan(backend):
    # the true gradient (~1 / (n 5e-324)) overflows float64: +-inf is the rounded truth, NaN never is
    _skip(backend)
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(5, 3, dtype=torch.float64, generator=g), torch.randn(6, 3, dtype=torch.float64, generator=g)
    w = torch.full((5,), 5e-324, dtype=torch.float64)
    w[0] = 1e-323
    v = fast_imq_mmd(x, y, w.clone().requires_grad_(True), backend=backend)
    r = fast_imq_mmd(x, y, w / w.sum(), backend="reference")
    assert v.item() == pytest.approx(r.item(), rel=1e-12)
    assert not torch.isnan(_weight_grad(backend, x, y, w)).any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rest", [1e-13, 1e-15, 1e-17])
@pytest.mark.parametrize("grouped", [False, True])
def test_nearly_single_weights(backend, rest, grouped):
    # (sum w)^2 - sum w_g^2 cancels when one group holds nearly all the mass: 1.814 instead of 1.0021 at 1e-15
    # (cpu), NaN at 1e-17; the pair mass is now a sum of non-negative terms on every backend
    _skip(backend)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(40, 5, dtype=torch.float64, generator=g)
    y = torch.randn(30, 5, dtype=torch.float64, generator=g) + 0.3
    w = torch.full((40,), rest, dtype=torch.float64)
    w[0] = 1.0
    if grouped:
        x, w = x.view(20, 2, 5), w.view(20, 2)
    v = fast_imq_mmd(x, y, w, validate=True, reduction="none", backend=backend)
    r = brute_force(x, y, w, bandwidths=bandwidths_for(5, WAE_SCALES))
    assert torch.isfinite(v).all()
    assert _rel(v, r) <= 1e-9, (v.sum().item(), r.sum().item())


# ----------------------------------------------------------------------------------------------------------------
# Forward-mode AD: a clear error on the fused backends (never a zero tangent), exact on the reference backend
# ----------------------------------------------------------------------------------------------------------------


def _jvp_case():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(11, 3, dtype=torch.float64, generator=g)
    y = torch.randn(8, 3, dtype=torch.float64, generator=g)
    w = torch.rand(11, dtype=torch.float64, generator=g) + 0.1
    tx, tw = torch.randn_like(x), torch.randn_like(w)
    return x, y, w, tx, tw


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("api", ["func.jvp", "make_dual"])
def test_forward_mode_ad_raises_on_fused_backends(backend, api):
    _skip(backend)
    x, y, w, tx, tw = _jvp_case()
    with pytest.raises(RuntimeError, match=rf"fast_imq_mmd: forward-mode AD .* fused '{backend}' backend"):
        if api == "func.jvp":
            torch.func.jvp(lambda a, b: fast_imq_mmd(a, y, b, backend=backend), (x, w), (tx, tw))
        else:
            from torch.autograd import forward_ad as fwAD

            with fwAD.dual_level():
                fast_imq_mmd(fwAD.make_dual(x, tx), y, w, backend=backend)
    with pytest.raises(RuntimeError, match="imq_mmd_terms|fast_imq_mmd"):
        torch.func.jvp(lambda a: imq_mmd_terms(a, y, backend=backend).cross.sum(), (x,), (tx,))


def test_forward_mode_ad_is_exact_on_the_reference_backend():
    x, y, w, tx, tw = _jvp_case()
    bws = bandwidths_for(3, WAE_SCALES)
    _, tangent = torch.func.jvp(lambda a, b: fast_imq_mmd(a, y, b, backend="reference"), (x, w), (tx, tw))
    _, expected = torch.func.jvp(lambda a, b: brute_force(a, y, b, bandwidths=bws).sum(), (x, w), (tx, tw))
    assert float(expected.abs()) > 0 and tangent.item() == pytest.approx(expected.item(), rel=1e-10)


def test_gm_reparameterize_forward_mode_ad_raises_on_fused_backend():
    skip_unless_usable("cpu", "cpu", op="gm_reparam")
    mu = torch.randn(3, 2, 4)
    with pytest.raises(RuntimeError, match="gm_reparameterize: forward-mode AD"):
        torch.func.jvp(lambda m: gmwae_fast.gm_reparameterize(m, mu, mu[..., 0], seed=1)[0].sum(), (mu,), (mu,))


@pytest.mark.parametrize("name", ["sigma2", "eps", "bandwidths", "scales"])
def test_kernel_parameters_that_require_grad_are_refused(name):
    # they would get no gradient, silently: an error until learnable bandwidths exist
    x, y = torch.randn(6, 3), torch.randn(5, 3)
    value = {"sigma2": 1.0, "eps": 0.1, "bandwidths": [1.0, 2.0], "scales": [1.0, 2.0]}[name]
    t = torch.tensor(value, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=rf"{name} is a tensor that requires grad"):
        fast_imq_mmd(x, y, backend="reference", **{name: t})
    with torch.no_grad():  # read as a constant where no gradient is wanted
        fast_imq_mmd(x, y, backend="reference", **{name: t})
    fast_imq_mmd(x, y, backend="reference", **{name: t.detach()})


def test_torch_compile_fullgraph_with_dynamic_shapes():
    # dynamic=True makes Python floats (eps, sigma2) symbolic: the host-side checks must still trace, and a new
    # n, d or input rank must recompile rather than break the graph
    skip_unless_usable("cpu", "cpu")

    def f(x, y, w):
        return fast_imq_mmd(x, y, w, eps=1e-9, sigma2=0.5)

    cf = torch.compile(f, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(11)
    for shape, m in (((12, 3), 14), ((15, 3), 9), ((15, 5), 9), ((6, 2, 5), 9)):
        x = torch.randn(*shape, generator=g, requires_grad=True)
        y = torch.randn(m, shape[-1], generator=g)
        w = torch.rand(shape[:-1], generator=g) + 0.1
        v = cf(x, y, w)
        (gx,) = torch.autograd.grad(v, x)
        xr = x.detach().double().requires_grad_(True)
        r = fast_imq_mmd(xr, y.double(), w.double(), eps=1e-9, sigma2=0.5, backend="reference")
        (gr,) = torch.autograd.grad(r, xr)
        assert v.item() == pytest.approx(r.item(), rel=1e-5, abs=1e-7)
        assert float((gx.double() - gr).abs().max()) <= 1e-4 * float(gr.abs().max())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("c", [1e-30, 1e-33, 1e-36])
def test_tiny_float32_bandwidths_against_unit_distances(backend, c):
    # the other side of the bandwidth floor: k ~ C / D far below 1 for every pair; Triton's clamp of D / C at 1e30
    # froze k at 1e-30 (100% off for C <= 1e-32), now 2^126 as in the C++ kernels
    _skip(backend)
    g = torch.Generator().manual_seed(12)
    x, y = torch.randn(30, 4, generator=g), torch.randn(20, 4, generator=g) + 0.5
    v = fast_imq_mmd(x, y, bandwidths=[c], backend=backend)
    r = brute_force(x, y, bandwidths=[c])
    assert _rel(v, r) <= 1e-5, (v.item(), r.item())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype,far", [(torch.float32, 3e38), (torch.float64, 1.5e308)])
def test_opposite_far_outliers_give_zero_not_nan_gradients(backend, dtype, far):
    # -far - far overflows to -inf: the kernels' 0 * inf made NaN gradient rows where the true gradient is 0
    _skip(backend)
    g = torch.Generator().manual_seed(13)
    x, y = torch.randn(20, 3, generator=g, dtype=dtype), torch.randn(15, 3, generator=g, dtype=dtype)
    x[3], x[5] = -far, far
    xs = x.clone().requires_grad_(True)
    v = fast_imq_mmd(xs, y, backend=backend)
    (gx,) = torch.autograd.grad(v, xs)
    xr = x.double().clone().requires_grad_(True)
    r = brute_force(xr.clamp(-1e300, 1e300), y, bandwidths=bandwidths_for(3, WAE_SCALES)).sum()
    (gr,) = torch.autograd.grad(r, xr)
    assert torch.isfinite(gx).all(), gx
    assert gx[3].abs().max() == 0 and gx[5].abs().max() == 0
    assert abs(v.item() - r.item()) <= 1e-5 * abs(r.item())
    assert float((gx.double() - gr).abs().max()) <= 1e-4 * float(gr.abs().max())


def test_validate_warns_when_the_weight_gradient_is_ill_conditioned():
    # two points of x, all but 1e-6 of the mass on one: the unbiased denominator is 2e-6 and the float32 weight
    # gradient of the self term a cancellation of parts ~1e6 (cpu: -1.0 where the truth is 0.034); float64 is fine
    import warnings

    skip_unless_usable("cpu", "cpu")
    x, y = torch.tensor([[0.0], [0.01]]), torch.tensor([[0.1], [0.105]])
    w = torch.tensor([1e-6, 1.0])
    with pytest.warns(RuntimeWarning, match=r"x_weights put nearly all the mass in one group .* 2e-06"):
        fast_imq_mmd(x, y, w, validate=True, backend="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast_imq_mmd(x.double(), y.double(), w.double(), validate=True, backend="cpu")
        fast_imq_mmd(x, y, torch.tensor([0.3, 1.0]), validate=True, backend="cpu")
        fast_imq_mmd(x, y, w, validate=True, unbiased=False, backend="cpu")
        fast_imq_mmd(x, y, w, validate=True, backend="reference")  # the reference computes in float64
