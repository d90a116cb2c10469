"""The eager one-node route of ``fast_imq_mmd`` (``mmd._OneNodeTotal``): an unweighted ``reduction="sum"`` call with
a point gradient runs the fused passes with the normalisation folded into their factors, as one autograd node. It
must give what the general route (``mmd._fused_total``: one node per term plus scalar arithmetic) and the float64
brute force give, on every fused backend, for every side that needs a gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import brute_force, skip_unless_usable

import gmwae_fast
from gmwae_fast import WAE_SCALES, fast_imq_mmd, mmd
from gmwae_fast.reference import bandwidths_for

BACKENDS = ["cpu", "triton"]


def _general_route(monkeypatch):
    monkeypatch.setattr(mmd, "_one_node_ok", lambda c: False)


def _grads(x, y, xw, yw, backend, **kw):
    xs, ys = x.clone().requires_grad_(x.requires_grad), y.clone().requires_grad_(y.requires_grad)
    v = fast_imq_mmd(xs, ys, xw, yw, backend=backend, **kw)
    live = [t for t in (xs, ys) if t.requires_grad]
    return v, v.grad_fn, torch.autograd.grad(v, live)


CASES = [  # (x shape, y shape, weights, which sides need a gradient, options)
    ((37, 5), (29, 5), False, (True, False), {}),
    ((37, 5), (29, 5), False, (False, True), {}),
    ((37, 5), (29, 5), False, (True, True), {"eps": 0.3}),
    ((9, 4, 3), (21, 3), False, (True, True), {}),
    ((9, 4, 3), (5, 3, 3), False, (True, False), {"unbiased": False}),
    ((9, 4, 3), (21, 3), True, (True, True), {}),  # weighted: the general route (checked against the brute force)
    ((1, 3), (6, 3), False, (True, True), {"unbiased": False, "bandwidths": [0.5, 40.0]}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-11)])
@pytest.mark.parametrize("xs,ys,weighted,needs,kw", CASES)
def test_one_node_matches_general_route_and_brute_force(monkeypatch, backend, dtype, tol, xs, ys, weighted, needs, kw):
    skip_unless_usable("cpu", backend)
    g = torch.Generator().manual_seed(sum(xs) + 7 * sum(ys))
    x = torch.randn(*xs, generator=g, dtype=dtype).requires_grad_(needs[0])
    y = (torch.randn(*ys, generator=g, dtype=dtype) + 0.4).requires_grad_(needs[1])
    xw = torch.rand(xs[:-1], generator=g, dtype=dtype) ** 3 + 1e-3 if weighted else None
    yw = torch.rand(ys[:-1], generator=g, dtype=dtype) + 0.1 if weighted else None
    v, node, grads = _grads(x, y, xw, yw, backend, **kw)
    assert (type(node).__name__ == "_OneNodeTotalBackward") == (not weighted)  # the route under test ran
    with monkeypatch.context() as m:
        _general_route(m)
        v2, node2, grads2 = _grads(x, y, xw, yw, backend, **kw)
    assert type(node2).__name__ != "_OneNodeTotalBackward"
    assert v.dtype == v2.dtype == dtype
    bws = kw.get("bandwidths") or bandwidths_for(xs[-1], WAE_SCALES)
    eps = kw.get("eps", 0.0)
    x64 = x.detach().double().requires_grad_(needs[0])
    y64 = y.detach().double().requires_grad_(needs[1])
    w64 = [None if w is None else w.double() for w in (xw, yw)]
    r = brute_force(x64, y64, *w64, bandwidths=[c for c in bws], eps=eps, unbiased=kw.get("unbiased", True)).sum()
    rg = torch.autograd.grad(r, [t for t in (x64, y64) if t.requires_grad])
    scale = float(max(t.abs().max() for t in rg))
    assert abs(v.item() - r.item()) <= tol * max(abs(r.item()), 1e-3)
    assert abs(v.item() - v2.item()) <= tol * max(abs(r.item()), 1e-3)
    for a, b, ref in zip(grads, grads2, rg):
        assert a.dtype == dtype and a.shape == ref.shape
        assert float((a.double() - ref).abs().max()) <= 10 * tol * scale
        assert float((a.double() - b.double()).abs().max()) <= 10 * tol * scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_node_is_not_used_with_weights(backend):
    # with weights the folded factor h / pairs can overflow float32 (a subnormal pair mass; found by
    # tests/test_accuracy_contract.py), and a weight gradient needs the normalisation's own
    skip_unless_usable("cpu", backend)
    x = torch.randn(8, 2, requires_grad=True)
    for w in (torch.rand(8, requires_grad=True), torch.rand(8)):
        v = fast_imq_mmd(x, torch.randn(7, 2), w, backend=backend)
        assert type(v.grad_fn).__name__ != "_OneNodeTotalBackward"
        assert torch.autograd.grad(v, x)[0] is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_node_double_backward_raises(backend):
    skip_unless_usable("cpu", backend)
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 3, dtype=torch.float64)
    v = fast_imq_mmd(x, y, backend=backend)
    assert type(v.grad_fn).__name__ == "_OneNodeTotalBackward"
    (gx,) = torch.autograd.grad(v, x, create_graph=True)
    (gr,) = torch.autograd.grad(brute_force(x, y, bandwidths=bandwidths_for(3, WAE_SCALES)).sum(), x)
    assert float((gx.detach() - gr).abs().max()) <= 1e-10 * float(gr.abs().max())
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gx.pow(2).sum(), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_node_half_precision_and_clamped_outliers(backend):
    skip_unless_usable("cpu", backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 4, generator=g).to(torch.bfloat16).requires_grad_(True)
    y = torch.randn(10, 4, generator=g)
    v = fast_imq_mmd(x, y, backend=backend)
    (gx,) = torch.autograd.grad(v, x)
    assert v.dtype == torch.float32 and gx.dtype == torch.bfloat16 and gx.shape == x.shape
    xr = x.detach().double().requires_grad_(True)
    (gr,) = torch.autograd.grad(brute_force(xr, y.double(), bandwidths=bandwidths_for(4, WAE_SCALES)).sum(), xr)
    assert float((gx.double() - gr).abs().max()) <= 1e-2 * float(gr.abs().max())
    # an entry the half-range clamp changes gets the clamp's gradient, 0, also on a three-dimensional input
    far = torch.randn(3, 4, 2, generator=g)
    far[1, 2, 0] = 3e38
    far.requires_grad_(True)
    (gf,) = torch.autograd.grad(fast_imq_mmd(far, y[:, :2], backend=backend), far)
    assert torch.isfinite(gf).all() and gf[1, 2].abs().max() == 0 and gf.abs().sum() > 0


def test_one_node_skips_inside_torch_func():
    # torch.func transforms need setup_context; the general route's custom ops keep working there as before
    x, y = torch.randn(6, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)

    def ok(a):
        return mmd._one_node_ok(mmd._prepare(a, y, None, None, WAE_SCALES, 1.0, None, True, "reference", False, 0.0))

    assert ok(x)
    seen = []

    def f(a):
        seen.append(ok(a))
        return a.sum()

    torch.func.grad(f)(x)
    assert seen == [False]
    assert gmwae_fast.fast_imq_mmd  # the public name the route serves
