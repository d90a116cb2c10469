"""``gmwae_fast.mmd2`` / ``MMDLoss``: the Gaussian kernel (tiled path) against a float64 brute force written from the
formula (values, point and weight gradients; grouped, weighted, biased and unbiased; several tiles; large
bandwidths), DAN's loss written from its published math, and the IMQ pass-through."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import flat_normalised

import gmwae_fast
from gmwae_fast import mmd2


def brute_gaussian(x, y, xw=None, yw=None, *, bandwidths, unbiased=True):
    """(S,) Gaussian MMD² per bandwidth, float64, materialised, complement form (no cancellation)."""
    a, wa, gx, b, wb, gy = flat_normalised(x, y, xw, yw)
    c = torch.tensor(bandwidths, dtype=torch.float64)[:, None, None]

    def comp(p, q):
        return -torch.expm1(-((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)[None] / c)

    def self_u(p, w, g):
        ids = torch.arange(p.shape[0]) // g
        keep = (ids[:, None] != ids[None, :]).double() if unbiased else torch.ones(p.shape[0], p.shape[0])
        wg = w.view(-1, g).sum(1)
        den = (wg[:, None] * wg[None, :] * (1 - torch.eye(wg.shape[0], dtype=torch.float64))).sum()
        den = den if unbiased else 1.0
        return (w[:, None] * w[None, :] * keep * comp(p, p)).sum((1, 2)) / den

    return 2 * (wa[:, None] * wb[None, :] * comp(a, b)).sum((1, 2)) - self_u(a, wa, gx) - self_u(b, wb, gy)


CASES = [
    ((23, 4), (17, 4), False, True),
    ((23, 4), (17, 4), True, False),
    ((7, 3, 5), (11, 5), True, True),
    ((7, 3, 5), (4, 2, 5), True, False),
    ((1, 2), (5, 2), False, False),
]


@pytest.mark.parametrize("xs,ys,weighted,unbiased", CASES)
@pytest.mark.parametrize("tile", [None, 37])
def test_gaussian_matches_the_brute_force(monkeypatch, xs, ys, weighted, unbiased, tile):
    if tile:
        monkeypatch.setattr(sys.modules["gmwae_fast.multi_kernel"], "_TILE", tile)  # many tiles, uneven ones
    g = torch.Generator().manual_seed(sum(xs))
    x = torch.randn(*xs, generator=g, dtype=torch.float64, requires_grad=True)
    y = (torch.randn(*ys, generator=g, dtype=torch.float64) + 0.3).requires_grad_(True)
    xw = (torch.rand(xs[:-1], generator=g, dtype=torch.float64) + 0.1).requires_grad_(True) if weighted else None
    bws = [0.3, 2.0, 11.0]
    v = mmd2(x, y, xw, kernel="gaussian", bandwidths=bws, unbiased=unbiased, reduction="none")
    r = brute_gaussian(x, y, xw, bandwidths=bws, unbiased=unbiased)
    torch.testing.assert_close(v, r, rtol=1e-12, atol=1e-14)
    h = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    leaves = [t for t in (x, y, xw) if t is not None]
    gv = torch.autograd.grad((v * h).sum(), leaves)
    gr = torch.autograd.grad((r * h).sum(), leaves)
    for a, b in zip(gv, gr):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_large_bandwidths_keep_relative_accuracy():
    # C = 1e12 x the spread: the three terms are ~1 and cancel to ~1e-13; the complement form keeps it
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 3, generator=g, dtype=torch.float64), torch.randn(25, 3, generator=g, dtype=torch.float64)
    v = mmd2(x, y + 0.5, kernel="gaussian", bandwidths=[1e12])
    r = brute_gaussian(x, y + 0.5, bandwidths=[1e12]).sum()
    assert abs(v.item() - r.item()) <= 1e-10 * abs(r.item())


def test_float32_inputs_give_float32_results_close_to_float64():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 6, generator=g), torch.randn(30, 6, generator=g) + 0.2
    v = mmd2(x, y, kernel="gaussian", bandwidths=[1.0, 10.0])
    assert v.dtype == torch.float32
    assert abs(v.item() - brute_gaussian(x, y, bandwidths=[1.0, 10.0]).sum().item()) <= 1e-6


def dan_client(s, t, kernel_mul=2.0, kernel_num=5):
    """DAN's mmd_rbf_noaccelerate from its published math: mean over all pairs of XX + YY - XY - YX, each a sum of
    exp(-D / bw) over its bandwidth list (base = sum of the pooled L2 matrix / (N^2 - N), divided by
    kernel_mul^(kernel_num // 2))."""
    total = torch.cat([s, t])
    n, b = total.shape[0], s.shape[0]
    l2 = ((total[:, None] - total[None]) ** 2).sum(-1)
    base = l2.detach().sum() / (n * n - n) / kernel_mul ** (kernel_num // 2)
    kern = sum(torch.exp(-l2 / (base * kernel_mul**i)) for i in range(kernel_num))
    return (kern[:b, :b] + kern[b:, b:] - kern[:b, b:] - kern[b:, :b]).mean()


def test_dan_loss_written_from_its_math():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(16, 5, generator=g, dtype=torch.float64)
    ours = mmd2(s, t, kernel="gaussian", bandwidths=gmwae_fast.dan_bandwidths(s, t), unbiased=False)
    dan = dan_client(s, t)
    assert abs(ours.item() - dan.item()) <= 1e-12 * abs(dan.item())


def test_the_guides_dan_block_reproduces_dan():
    import pathlib
    import re

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "migrating.md").read_text()
    (code,) = [
        c for c, name in re.findall(r"```python\n(# after: (\w+)\n.*?)```", doc, flags=re.DOTALL) if name == "dan"
    ]
    g = torch.Generator().manual_seed(6)
    s = torch.randn(24, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(24, 7, generator=g, dtype=torch.float64) + 0.2
    scope = {"source": s, "target": t}
    exec(compile(code, "docs/migrating.md[dan]", "exec"), scope)  # noqa: S102 (the guide's own code)
    ours, dan = scope["mmd_loss"], dan_client(s, t)
    assert abs(ours.item() - dan.item()) <= 1e-12 * abs(dan.item())
    (g1,) = torch.autograd.grad(ours, s)
    (g2,) = torch.autograd.grad(dan, s)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


def test_imq_passes_through_to_fast_imq_mmd_and_the_module():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(12, 3, generator=g), torch.randn(9, 3, generator=g)
    assert torch.equal(
        mmd2(x, y, eps=1e-3, backend="reference"), gmwae_fast.fast_imq_mmd(x, y, eps=1e-3, backend="reference")
    )
    loss = gmwae_fast.MMDLoss(kernel="gaussian", bandwidths=[1.0, 2.0], unbiased=False)
    assert torch.equal(loss(x, y), mmd2(x, y, kernel="gaussian", bandwidths=[1.0, 2.0], unbiased=False))
    assert "gaussian" in repr(loss)


def test_default_bandwidths_follow_the_wae_convention():
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    bws = gmwae_fast.bandwidths_for(x, gmwae_fast.WAE_SCALES)
    torch.testing.assert_close(mmd2(x, y, kernel="gaussian"), mmd2(x, y, kernel="gaussian", bandwidths=list(bws)))


def test_double_backward_raises():
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(
        mmd2(x, torch.randn(5, 2, dtype=torch.float64), kernel="gaussian"), x, create_graph=True
    )
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gx.pow(2).sum(), x)


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        (dict(kernel="laplace"), ValueError, "unknown kernel"),
        (dict(kernel="gaussian", eps=1e-3), ValueError, "takes no"),
        (dict(kernel="gaussian", backend="cpu"), ValueError, "backend 'tiled'"),
        (dict(kernel="gaussian", bandwidths=[-1.0]), ValueError, "bandwidth"),
        (dict(kernel="gaussian", reduction="mean"), ValueError, "reduction"),
    ],
)
def test_bad_options(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        mmd2(torch.randn(5, 2), torch.randn(4, 2), **kwargs)


# -- linear-time estimators ------------------------------------------------------------------------------------------


def _h(k, x1, x2, y1, y2):
    return k(x1, x2) + k(y1, y2) - k(x1, y2) - k(x2, y1)


@pytest.mark.parametrize("kernel", ["imq", "gaussian"])
@pytest.mark.parametrize("n", [2, 7, 10])
def test_linear_estimators_written_from_their_definitions(kernel, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n, 3, generator=g, dtype=torch.float64) + 0.4
    bws = [0.5, 3.0]

    def k(p, q):
        d2 = ((p - q) ** 2).sum()
        return sum((c / (c + d2)) if kernel == "imq" else torch.exp(-d2 / c) for c in bws)

    m2 = n // 2  # Gretton et al. 2012, Lemma 14: disjoint pairs
    gretton = sum(_h(k, x[2 * i], x[2 * i + 1], y[2 * i], y[2 * i + 1]) for i in range(m2)) / m2
    # DAN's mmd_rbf_accelerate: s1 = i, s2 = (i + 1) % n over every i
    dan = sum(_h(k, x[i], x[(i + 1) % n], y[i], y[(i + 1) % n]) for i in range(n)) / n
    for est, want in (("linear", gretton), ("linear-cyclic", dan)):
        got = mmd2(x, y, kernel=kernel, bandwidths=bws, estimator=est)
        assert abs(got.item() - want.item()) <= 1e-12 * max(1.0, abs(want.item()))
        (g1,) = torch.autograd.grad(got, x)
        (g2,) = torch.autograd.grad(want, x)
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    "args,kwargs,msg",
    [
        ((torch.randn(4, 2), torch.randn(5, 2)), {}, "n = m"),
        ((torch.randn(4, 2), torch.randn(4, 2), torch.rand(4)), {}, "unweighted"),
        ((torch.randn(2, 2, 2), torch.randn(4, 2)), {}, "unweighted"),
        ((torch.randn(4, 2), torch.randn(4, 2)), {"backend": "cpu"}, "plain PyTorch"),
        ((torch.randn(4, 2), torch.randn(4, 2)), {"estimator": "quadratic"}, "unknown estimator"),
    ],
)
def test_linear_estimator_bad_input(args, kwargs, msg):
    kwargs = {"estimator": "linear", **kwargs}
    with pytest.raises(ValueError, match=msg):
        mmd2(*args, **kwargs)


# -- learnable bandwidths (Gaussian) --------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", [None, "linear"])
def test_bandwidth_gradient_matches_the_brute_force(estimator):
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(12, 3, generator=g, dtype=torch.float64)
    xw = torch.rand(12, generator=g, dtype=torch.float64) + 0.1 if estimator is None else None
    bw = torch.tensor([0.4, 2.5, 9.0], dtype=torch.float64, requires_grad=True)
    v = mmd2(x, y + 0.3, xw, kernel="gaussian", bandwidths=bw, estimator=estimator)
    (gv,) = torch.autograd.grad(v, bw)
    # finite differences of the float64 brute force (central, step 1e-6 relative)
    ref = []
    for s in range(3):
        step = 1e-6 * bw[s].item()
        vals = []
        for sign in (1, -1):
            b = bw.detach().clone()
            b[s] += sign * step
            vals.append(mmd2(x, y + 0.3, xw, kernel="gaussian", bandwidths=b.tolist(), estimator=estimator).item())
        ref.append((vals[0] - vals[1]) / (2 * step))
    torch.testing.assert_close(gv, torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=1e-10)
    assert torch.autograd.gradcheck(
        lambda b: mmd2(x, y + 0.3, xw, kernel="gaussian", bandwidths=b, estimator=estimator), (bw,)
    )


def test_bandwidth_tensor_bad_values():
    with pytest.raises(ValueError, match="positive, finite"):
        mmd2(torch.randn(4, 2), torch.randn(4, 2), kernel="gaussian", bandwidths=torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError, match="1-D float tensor"):
        mmd2(torch.randn(4, 2), torch.randn(4, 2), kernel="gaussian", bandwidths=torch.ones(2, 2))


def test_the_guides_mmdvae_block_reproduces_compute_mmd():
    import pathlib
    import re

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "migrating.md").read_text()
    blocks = re.findall(r"```python\n(# after: (\w+)\n.*?)```", doc, flags=re.DOTALL)
    (code,) = [c for c, name in blocks if name == "mmdvae"]
    g = torch.Generator().manual_seed(9)
    z = torch.randn(20, 6, generator=g, dtype=torch.float64, requires_grad=True)
    true_samples = torch.randn(25, 6, generator=g, dtype=torch.float64)

    def compute_kernel(x, y):  # InfoVAE's, written from its math: (n, m, d) tiles, mean over d, divided by d
        d = x.shape[1]
        tx = x[:, None, :].expand(x.shape[0], y.shape[0], d)
        ty = y[None, :, :].expand(x.shape[0], y.shape[0], d)
        return torch.exp(-(tx - ty).pow(2).mean(2) / float(d))

    def compute_mmd(x, y):
        return compute_kernel(x, x).mean() + compute_kernel(y, y).mean() - 2 * compute_kernel(x, y).mean()

    scope = {"z": z, "true_samples": true_samples}
    exec(compile(code, "docs/migrating.md[mmdvae]", "exec"), scope)  # noqa: S102 (the guide's own code)
    want = compute_mmd(true_samples, z)
    assert abs(scope["mmd_loss"].item() - want.item()) <= 1e-12 * abs(want.item())
    (g1,) = torch.autograd.grad(scope["mmd_loss"], z)
    (g2,) = torch.autograd.grad(want, z)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


def test_torch_two_sample_statistic_mapping():
    # MMDStatistic (unbiased): a00 (sum K_xx - n) + a11 (sum K_yy - m) + 2 a01 sum K_xy, k = sum_alpha exp(-alpha D)
    g = torch.Generator().manual_seed(10)
    x, y = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randn(11, 4, generator=g, dtype=torch.float64)
    alphas = [0.3, 1.7]

    def k(p, q):
        d2 = ((p[:, None] - q[None]) ** 2).sum(-1)
        return sum(torch.exp(-a * d2) for a in alphas)

    n, m = 9, 11
    ts = (k(x, x).sum() - n * 2) / (n * (n - 1)) + (k(y, y).sum() - m * 2) / (m * (m - 1)) - 2 * k(x, y).sum() / (n * m)
    ours = mmd2(x, y, kernel="gaussian", bandwidths=[1 / a for a in alphas])
    assert abs(ours.item() - ts.item()) <= 1e-12 * abs(ts.item())


def test_gaussian_validate_and_tiny_bandwidth_gradient():
    x, y, w = torch.randn(6, 2), torch.randn(5, 2), torch.rand(6)
    w[0] = -1.0
    with pytest.raises(ValueError, match="negative"):
        mmd2(x, y, w, kernel="gaussian", validate=True)
    bad = x.clone()
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        mmd2(bad, y, kernel="gaussian", validate=True)
    # C = 1e-200: C^2 underflows; the gradient must stay finite (0 here: every pair is far beyond the bandwidth)
    bw = torch.tensor([1e-200, 1.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(mmd2(x.double(), y.double(), kernel="gaussian", bandwidths=bw), bw)
    assert torch.isfinite(g).all(), g


def test_mmdloss_registers_a_learnable_bandwidth():
    bw = torch.nn.Parameter(torch.tensor([0.5, 3.0], dtype=torch.float64))
    loss_fn = gmwae_fast.MMDLoss(kernel="gaussian", bandwidths=bw)
    assert list(loss_fn.parameters()) == [bw] and "bandwidths" in loss_fn.state_dict()
    x, y = torch.randn(10, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64) + 1.0
    opt = torch.optim.SGD(loss_fn.parameters(), lr=0.1)
    before = bw.detach().clone()
    (-loss_fn(x, y)).backward()  # maximise the MMD over the bandwidths
    opt.step()
    assert not torch.equal(bw.detach(), before)
    fixed = gmwae_fast.MMDLoss(kernel="gaussian", bandwidths=torch.tensor([1.0]))
    assert list(fixed.parameters()) == [] and "bandwidths" in fixed.state_dict()
