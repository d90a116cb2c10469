"""``gmwae_fast.mean_sq_distance`` and ``dan_bandwidths`` against the pairwise formulas they replace (written from
DAN's published math: ``L2_distance`` over the pooled ``(N, N)`` matrix, summed and divided by ``N^2 - N``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gmwae_fast
from gmwae_fast import dan_bandwidths, mean_sq_distance


def pairwise_mean(x, y=None):
    z = x.reshape(-1, x.shape[-1]).double()
    if y is not None:
        z = torch.cat([z, y.reshape(-1, y.shape[-1]).double()])
    d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    n = z.shape[0]
    return d2.sum() / (n * n - n)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    m=st.integers(0, 30),
    d=st.integers(1, 9),
    offset=st.sampled_from([0.0, 1.0, 1e4, -3e6]),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
    grouped=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_mean_sq_distance_is_the_pairwise_mean(n, m, d, offset, scale, grouped, seed):
    if n + m < 2:
        return
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, d, generator=g, dtype=torch.float64) if grouped else torch.randn(n, d, generator=g)
    x = x * scale + offset
    y = torch.randn(m, d, generator=g, dtype=x.dtype) * scale + offset if m else None
    got = mean_sq_distance(x, y)
    # the float64 brute force on exact differences (a - b formed directly) is the reference
    want = pairwise_mean(x, y)
    assert got.dtype == torch.float64 and got.shape == ()
    assert abs(got.item() - want.item()) <= 1e-12 * want.item() + 1e-300


def test_offset_costs_no_precision():
    # |a|^2 + |b|^2 - 2 a.b in float64 at an offset of 1e8 with unit spread loses everything; centring does not
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 4, generator=g, dtype=torch.float64) + 1e8
    z = x - 1e8
    assert abs(mean_sq_distance(x).item() - mean_sq_distance(z).item()) <= 1e-9 * mean_sq_distance(z).item()
    naive = (2 * x.pow(2).sum(1).mean() - 2 * x.mean(0).pow(2).sum()) * 300 / 299
    assert abs(naive.item() - mean_sq_distance(z).item()) > 1e-3 * mean_sq_distance(z).item()  # the trap it avoids


def test_gradient_matches_the_pairwise_formula():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(13, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    gx, gy = torch.autograd.grad(mean_sq_distance(x, y), (x, y))
    rx, ry = torch.autograd.grad(pairwise_mean(x, y), (x, y))
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gy, ry, rtol=1e-12, atol=1e-14)


def test_dan_bandwidths_follow_dan():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(32, 5, generator=g), torch.randn(32, 5, generator=g) + 0.5
    base = pairwise_mean(s, t).item()
    bws = dan_bandwidths(s, t)  # kernel_mul=2, kernel_num=5: base / 4 * 2^i
    assert len(bws) == 5
    for got, want in zip(bws, [base / 4 * 2**i for i in range(5)]):
        assert abs(got - want) <= 1e-12 * want
    assert dan_bandwidths(s, t, kernel_mul=3.0, kernel_num=2, fix_sigma=1.5) == (0.5, 1.5)
    assert all(isinstance(b, float) for b in bws)


@pytest.mark.parametrize(
    "call,exc,msg",
    [
        (lambda: mean_sq_distance(torch.randn(1, 3)), ValueError, "at least 2 points"),
        (lambda: mean_sq_distance(torch.randn(4, 3), torch.randn(4, 2)), ValueError, "same feature dimension"),
        (lambda: mean_sq_distance([[0.0, 1.0]]), TypeError, "torch.Tensor"),
        (lambda: mean_sq_distance(torch.randn(4)), ValueError, r"\(n, d\) or \(B, K, d\)"),
        (lambda: dan_bandwidths(torch.randn(4, 2), torch.randn(4, 2), kernel_num=0), ValueError, "kernel_num"),
        (lambda: dan_bandwidths(torch.randn(4, 2), torch.randn(4, 2), kernel_mul=-1), ValueError, "kernel_mul"),
        (lambda: dan_bandwidths(torch.randn(4, 2), torch.randn(4, 2), fix_sigma=0.0), ValueError, "fix_sigma"),
        (lambda: dan_bandwidths(torch.ones(4, 2), torch.ones(3, 2)), ValueError, "every point is the same"),
    ],
)
def test_bad_input(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_exported():
    assert gmwae_fast.mean_sq_distance is mean_sq_distance and "dan_bandwidths" in gmwae_fast.__all__


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(kernel_mul=float("inf")), "kernel_mul"),
        (dict(kernel_mul=True), "kernel_mul"),
        (dict(fix_sigma=float("inf")), "fix_sigma"),
        (dict(kernel_num=5000), "outside float64"),
    ],
)
def test_dan_bandwidths_refuse_non_finite_options(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        dan_bandwidths(torch.randn(4, 2), torch.randn(4, 2), **kwargs)


def test_dan_bandwidths_name_a_nan_sample():
    x = torch.randn(4, 2)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        dan_bandwidths(x, torch.randn(4, 2))
