"""``gmwae_fast.mmd_test``: the permutation statistics equal a float64 brute force over the same permutations, the
p-value is calibrated under H0 (a KS test over repeated draws) and has power against a shift."""

from __future__ import annotations

import pytest
import torch
from conftest import brute_force, skip_unless_usable
from scipy import stats

import gmwae_fast
from gmwae_fast import WAE_SCALES, mmd_test
from gmwae_fast.reference import bandwidths_for

CPU = ["reference", "cpu", "triton"]


@pytest.mark.parametrize(
    "method,backend,block", [("shared", "auto", 5), ("shared", "auto", 1024)] + [("separate", b, 0) for b in CPU]
)
@pytest.mark.parametrize("unbiased", [True, False])
def test_statistics_equal_the_brute_force_over_the_same_permutations(method, backend, block, unbiased):
    if method == "separate":
        skip_unless_usable("cpu", backend)
    kw = dict(method=method, backend=backend) | (dict(block=block) if block else {})
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(11, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    perms = torch.stack([torch.randperm(19, generator=g) for _ in range(7)])
    res = mmd_test(x, y, permutations=perms, unbiased=unbiased, **kw)
    bws = bandwidths_for(3, WAE_SCALES)
    z = torch.cat([x, y])
    want = torch.stack([brute_force(z[p[:11]], z[p[11:]], bandwidths=bws, unbiased=unbiased).sum() for p in perms])
    obs = brute_force(x, y, bandwidths=bws, unbiased=unbiased).sum()
    assert res.null_statistics.dtype == torch.float64 and res.null_statistics.shape == (7,)
    torch.testing.assert_close(res.null_statistics, want, rtol=1e-10, atol=1e-12)
    assert abs(res.statistic.item() - obs.item()) <= 1e-10 * abs(obs.item())
    assert res.p_value == (1 + int((want >= obs).sum())) / 8
    assert torch.equal(res.permutations, perms)


def test_p_values_are_uniform_under_h0_and_small_under_a_shift():
    skip_unless_usable("cpu", "cpu")
    g = torch.Generator().manual_seed(1)
    p_h0 = []
    for r in range(80):
        x, y = torch.randn(15, 2, generator=g), torch.randn(12, 2, generator=g)
        p_h0.append(mmd_test(x, y, permutations=49, seed=r, backend="cpu").p_value)
    # discrete p-values (multiples of 1/50): compare with the uniform on (0, 1] at a loose level
    assert stats.kstest(p_h0, "uniform").pvalue > 1e-3, sorted(p_h0)
    shifted = []
    for r in range(5):
        x, y = torch.randn(30, 2, generator=g), torch.randn(30, 2, generator=g) + 1.0
        shifted.append(mmd_test(x, y, permutations=99, seed=r).p_value)
    assert max(shifted) <= 0.02, shifted


@pytest.mark.parametrize("unbiased", [True, False])
def test_gaussian_statistics_equal_the_two_sample_formula(unbiased):
    # torch-two-sample's MMDStatistic (unbiased, k = sum_alpha exp(-alpha D)) written from its published math
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randn(9, 3, generator=g, dtype=torch.float64)
    alphas = [0.5, 2.0]
    perms = torch.stack([torch.randperm(19, generator=g) for _ in range(6)])

    def formula(a, b):
        def k(p, q):
            d2 = ((p[:, None] - q[None]) ** 2).sum(-1)
            return sum(torch.exp(-al * d2) for al in alphas)

        n, m = a.shape[0], b.shape[0]
        if unbiased:
            kaa, kbb = k(a, a).sum() - n * len(alphas), k(b, b).sum() - m * len(alphas)
            return kaa / (n * (n - 1)) + kbb / (m * (m - 1)) - 2 * k(a, b).sum() / (n * m)
        return k(a, a).sum() / n**2 + k(b, b).sum() / m**2 - 2 * k(a, b).sum() / (n * m)

    res = mmd_test(x, y, permutations=perms, kernel="gaussian", bandwidths=[1 / a for a in alphas], unbiased=unbiased)
    z = torch.cat([x, y])
    want = torch.stack([formula(z[p[:10]], z[p[10:]]) for p in perms])
    torch.testing.assert_close(res.null_statistics, want, rtol=1e-10, atol=1e-12)
    assert abs(res.statistic.item() - formula(x, y).item()) <= 1e-10 * abs(formula(x, y).item())


def test_shared_and_separate_agree_in_float32_with_groups_of_tiles_and_options():
    skip_unless_usable("cpu", "cpu")
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(37, 6, generator=g) + 100.0, torch.randn(29, 6, generator=g) + 100.2  # a common offset
    kw = dict(permutations=9, seed=2, bandwidths=[0.5, 4.0, 60.0])
    a = mmd_test(x, y, method="shared", block=16, **kw)
    b = mmd_test(x, y, method="separate", backend="cpu", **kw)
    scale = float(b.null_statistics.abs().max())
    assert float((a.null_statistics - b.null_statistics).abs().max()) <= 1e-5 * scale
    assert abs(a.statistic.item() - b.statistic.item()) <= 1e-5 * scale


def test_seed_reproduces_and_permutations_are_recorded():
    x, y = torch.randn(9, 2), torch.randn(7, 2)
    a = mmd_test(x, y, permutations=5, seed=3)
    b = mmd_test(x, y, permutations=5, seed=3)
    c = mmd_test(x, y, permutations=a.permutations)
    assert torch.equal(a.permutations, b.permutations) and a.permutations.shape == (5, 16)
    assert torch.equal(a.null_statistics, b.null_statistics) and a.p_value == b.p_value
    torch.testing.assert_close(c.null_statistics, a.null_statistics, rtol=0, atol=0)
    assert mmd_test(x, y, permutations=5).permutations.shape == (5, 16)  # seed=None: drawn, still recorded


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        (dict(permutations=0), ValueError, "int >= 1"),
        (dict(permutations=True), ValueError, "int >= 1"),
        (dict(permutations=torch.zeros(3, 16, dtype=torch.int64)), ValueError, "permutation of 0"),
        (dict(permutations=torch.arange(15).repeat(2, 1)), ValueError, r"\(P, 16\)"),
        (dict(permutations=torch.arange(16.0)[None]), ValueError, "int64"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(method="fast"), ValueError, "method"),
        (dict(block=0), ValueError, "block"),
        (dict(kernel="laplace"), ValueError, "kernel must be"),
        (dict(kernel="gaussian"), ValueError, "needs bandwidths="),
        (dict(kernel="gaussian", bandwidths=[1.0], method="separate"), ValueError, "fused IMQ"),
    ],
)
def test_bad_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        mmd_test(torch.randn(9, 2), torch.randn(7, 2), **kwargs)


def test_bad_samples():
    with pytest.raises(ValueError, match=r"\(n, d\) and \(m, d\)"):
        mmd_test(torch.randn(3, 2, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="same feature dimension"):
        mmd_test(torch.randn(3, 2), torch.randn(4, 3))
    assert gmwae_fast.mmd_test is mmd_test


def test_non_finite_inputs_mixed_dtypes_and_argument_conflicts():
    x, y = torch.randn(9, 2), torch.randn(7, 2)
    bad = x.clone()
    bad[0, 0] = float("nan")  # a NaN statistic compares False with every null: p would be 1 / (P + 1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        mmd_test(bad, y, permutations=5, seed=0)
    with pytest.raises(ValueError, match="not both"):
        mmd_test(x, y, permutations=torch.arange(16)[None], seed=1)
    with pytest.raises(ValueError, match="unknown backend"):
        mmd_test(x, y, permutations=5, backend="gpu")
    # mixed dtypes are promoted (as fast_imq_mmd does), never cast down to x's dtype
    xx, yy = torch.randn(30, 2).half(), torch.randn(30, 2, dtype=torch.float64) * 1e-3 + 3.0001
    got = mmd_test(xx, yy, bandwidths=[1e-5], unbiased=False, permutations=3, seed=0, method="separate")
    want = gmwae_fast.fast_imq_mmd(xx, yy, bandwidths=[1e-5], unbiased=False, backend="reference")
    assert abs(got.statistic.item() - want.item()) <= 1e-9 * abs(want.item())
