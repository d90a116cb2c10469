"""The mappings of ``docs/migrating.md``: three public WAE codes' MMD penalties, written here from their published
math as materialised float64 pairwise matrices, against the ``gmwae_fast`` options (values and gradients).

* schelotto/Wasserstein-AutoEncoders: 7 scales ``C = 2 d s``, U-statistic self terms, full cross term.
* 1Konny/WAE-pytorch: one ``C = 2 d z_var``, kernel ``C / (1e-9 + C + D)``, same estimator.
* AntixK/PyTorch-VAE: one ``C = 2 d latent_var``, kernel ``C / (1e-7 + C + D)``, every sum (cross included) over
  ``i != j`` and divided by ``n (n - 1)``.
"""

import pathlib
import re

import pytest
import torch
from conftest import interpreted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gmwae_fast
from gmwae_fast import GAUJAC2019_SCALES, PAPER_SCALES, WAE_SCALES, fast_imq_mmd, imq_mmd_terms

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "migrating.md"


# -- the client formulas, float64, materialised -------------------------------------------------------------------


def _sqdist(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def _offdiag_sum(k):
    return k.sum() - torch.diagonal(k).sum()


def schelotto_client(z, prior):
    """``imq_kernel(z, prior, h_dim=d) / n``: per scale, off-diagonal self sums over ``n - 1``, cross over ``n / 2``."""
    n, d = z.shape
    total = z.new_zeros(())
    for s in (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0):
        c = 2.0 * d * 1.0 * s
        self_sum = _offdiag_sum(c / (c + _sqdist(z, z))) + _offdiag_sum(c / (c + _sqdist(prior, prior)))
        total = total + self_sum / (n - 1) - 2.0 * (c / (c + _sqdist(z, prior))).sum() / n
    return total / n


def konny_client(z_tilde, z, z_var, eps=1e-9):
    n, d = z.shape
    c = 2.0 * d * z_var

    def kern(a, b):
        return c / (eps + c + _sqdist(a, b))

    return (_offdiag_sum(kern(z, z)) + _offdiag_sum(kern(z_tilde, z_tilde))) / (n * (n - 1)) - 2.0 * kern(
        z, z_tilde
    ).sum() / (n * n)


def antixk_client(z, prior, z_var=2.0, eps=1e-7):
    n, d = z.shape
    c = 2.0 * d * z_var

    def off(a, b):
        return _offdiag_sum(c / (eps + c + _sqdist(a, b)))

    return (off(prior, prior) + off(z, z) - 2.0 * off(prior, z)) / (n * (n - 1))


def full_cross_client(z, prior, z_var=2.0, eps=1e-7):
    """AntixK's kernel with the full cross term ``sum_{i,j} k / n^2`` (what ``fast_imq_mmd`` computes)."""
    n, d = z.shape
    c = 2.0 * d * z_var
    kern = c / (eps + c + _sqdist(z, prior))
    return antixk_client(z, prior, z_var, eps) + 2.0 * _offdiag_sum(kern) / (n * (n - 1)) - 2.0 * kern.sum() / n**2


# -- helpers --------------------------------------------------------------------------------------------------------


def _pair(n, d, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64) * 1.3 + 0.2
    prior = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return z.to(device), prior.to(device)


def _size(device, backend):
    return (11, 5) if interpreted(device, backend) else (37, 8)


def _check(after_fn, client_fn, z, prior, rtol=1e-11):
    """Value and gradients (both samples) of ``after_fn`` on ``z``'s device against ``client_fn`` on the CPU."""
    zc, pc = (t.detach().cpu().requires_grad_(True) for t in (z, prior))
    want = client_fn(zc, pc)
    want_g = torch.autograd.grad(want, (zc, pc))
    za, pa = (t.detach().requires_grad_(True) for t in (z, prior))
    got = after_fn(za, pa)
    got_g = torch.autograd.grad(got, (za, pa))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.detach().cpu(), want.detach(), rtol=rtol, atol=1e-14)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-9, atol=1e-12)


def _antixk_after(z, prior, z_var=2.0, backend="auto"):
    n, d = z.shape
    c = 2 * d * z_var
    t = imq_mmd_terms(z, prior, scales=(1.0,), sigma2=z_var, eps=1e-7, backend=backend)
    matched = (c / (c + 1e-7 + (z - prior).pow(2).sum(1).double())).sum()
    cross = (t.cross * n * n - matched) / (n * (n - 1))
    return (t.self_x / t.den_x + t.self_y / t.den_y - 2 * cross).sum()


# -- the mappings, every backend ------------------------------------------------------------------------------------


def test_schelotto_maps_with_wae_scales(device_backend):
    device, backend = device_backend
    z, prior = _pair(*_size(device, backend), seed=1, device=device)
    _check(lambda a, b: fast_imq_mmd(a, b, scales=WAE_SCALES, backend=backend), schelotto_client, z, prior)


@pytest.mark.parametrize("z_var", [1.0, 2])
def test_konny_maps_with_eps(device_backend, z_var):
    device, backend = device_backend
    z_tilde, z = _pair(*_size(device, backend), seed=2, device=device)
    _check(
        lambda a, b: fast_imq_mmd(a, b, scales=(1.0,), sigma2=z_var, eps=1e-9, backend=backend),
        lambda a, b: konny_client(a, b, z_var),
        z_tilde,
        z,
    )


def test_konny_maps_through_the_shifted_bandwidth(device_backend):
    """``C / (C + eps) * fast_imq_mmd(bandwidths=(C + eps,))``: the form without the ``eps`` option."""
    device, backend = device_backend
    z_tilde, z = _pair(*_size(device, backend), seed=3, device=device)
    c, eps = 2.0 * z.shape[1] * 2.0, 1e-9
    _check(
        lambda a, b: c / (c + eps) * fast_imq_mmd(a, b, bandwidths=(c + eps,), backend=backend),
        lambda a, b: konny_client(a, b, 2.0, eps),
        z_tilde,
        z,
    )


def test_antixk_rebuilt_from_terms(device_backend):
    device, backend = device_backend
    z, prior = _pair(*_size(device, backend), seed=4, device=device)
    _check(lambda a, b: _antixk_after(a, b, backend=backend), antixk_client, z, prior)


def test_antixk_kernel_with_full_cross_term(device_backend):
    device, backend = device_backend
    z, prior = _pair(*_size(device, backend), seed=5, device=device)
    _check(
        lambda a, b: fast_imq_mmd(a, b, scales=(1.0,), sigma2=2.0, eps=1e-7, backend=backend),
        full_cross_client,
        z,
        prior,
    )


def test_float32_inputs_stay_close_to_the_float64_client():
    z, prior = _pair(301, 8, seed=6)
    want = schelotto_client(z, prior)
    got = fast_imq_mmd(z.float(), prior.float(), scales=WAE_SCALES)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


# -- the code blocks of docs/migrating.md ---------------------------------------------------------------------------


def _doc_block(client):
    blocks = re.findall(r"```python\n(# after: (\w+)\n.*?)```", DOC.read_text(), flags=re.DOTALL)
    found = [code for code, name in blocks if name == client]
    assert len(found) == 1, f"docs/migrating.md must have exactly one '# after: {client}' block, found {len(found)}"
    return found[0]


@pytest.mark.parametrize(
    "client, inputs, client_fn",
    [
        ("schelotto", ("z_real", "z_fake"), schelotto_client),
        ("konny", ("z_tilde", "z"), lambda a, b: konny_client(a, b, 2.0)),
        ("antixk", ("z", "prior_z"), lambda a, b: 3.0 * antixk_client(a, b)),
    ],
)
def test_doc_after_blocks_reproduce_the_client(client, inputs, client_fn):
    code = _doc_block(client)

    def run(a, b):
        scope = {inputs[0]: a, inputs[1]: b, "z_var": 2.0, "lam": 3.0, "torch": torch}
        exec(compile(code, f"docs/migrating.md[{client}]", "exec"), scope)  # noqa: S102 (the guide's own code)
        return scope["mmd_loss"]

    _check(run, client_fn, *_pair(29, 6, seed=7))


# -- the pitfalls the guide names -----------------------------------------------------------------------------------


def test_default_scales_are_the_original_wae_code():
    # a drop-in swap keeps a 7-scale WAE code's penalty; the paper's 15 scales are a named, explicit choice
    z, prior = _pair(37, 8, seed=0)
    default = fast_imq_mmd(z, prior)
    torch.testing.assert_close(default, schelotto_client(z, prior), rtol=1e-11, atol=0)
    assert gmwae_fast.IMQMMDLoss()(z, prior).item() == default.item()
    assert len(GAUJAC2019_SCALES) == 15 and len(WAE_SCALES) == 7 and PAPER_SCALES is GAUJAC2019_SCALES
    paper = fast_imq_mmd(z, prior, scales=GAUJAC2019_SCALES)
    assert abs(float(paper) / float(default) - 1) > 0.05


def test_sigma2_and_eps_accept_one_element_tensors():
    z, prior = _pair(23, 4, seed=8)
    want = konny_client(z, prior, 2.0)
    for sigma2 in (2, 2.0, torch.tensor(2.0), torch.tensor([2.0], dtype=torch.float64)):
        got = fast_imq_mmd(z, prior, scales=(1.0,), sigma2=sigma2, eps=torch.tensor(1e-9))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    with pytest.raises(TypeError, match="sigma2"):
        fast_imq_mmd(z, prior, sigma2=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="eps"):
        fast_imq_mmd(z, prior, eps=-1e-9)


def test_eps_is_exact_for_every_bandwidth():
    """``C / (C + D + eps)`` per bandwidth against a materialised float64 sum, biased and unbiased."""
    z, prior = _pair(19, 3, seed=9)
    eps = 0.37
    for unbiased in (True, False):
        got = fast_imq_mmd(z, prior, scales=WAE_SCALES, eps=eps, unbiased=unbiased, reduction="none")
        n = z.shape[0]
        for s, g in zip(WAE_SCALES, got):
            c = 2.0 * 3 * s
            kzz, kpp = c / (c + eps + _sqdist(z, z)), c / (c + eps + _sqdist(prior, prior))
            kzp = c / (c + eps + _sqdist(z, prior))
            if unbiased:
                want = (_offdiag_sum(kzz) + _offdiag_sum(kpp)) / (n * (n - 1)) - 2 * kzp.mean()
            else:
                want = kzz.mean() + kpp.mean() - 2 * kzp.mean()
            torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-15)


# -- what the off-diagonal cross term estimates ---------------------------------------------------------------------


def test_offdiagonal_penalty_is_fused_minus_matched_pair_correction():
    """``AntixK = fused - 2/(n-1) * (A/n^2 - T/n)``, ``A`` all pairs, ``T`` the matched pairs."""
    z, prior = _pair(31, 7, seed=10)
    n, c = z.shape[0], 2.0 * 7 * 2.0
    k = c / (1e-7 + c + _sqdist(z, prior))
    a_mean, t_mean = k.mean(), torch.diagonal(k).mean()
    fused = fast_imq_mmd(z, prior, scales=(1.0,), sigma2=2.0, eps=1e-7)
    torch.testing.assert_close(
        antixk_client(z, prior), fused - 2.0 / (n - 1) * (a_mean - t_mean), rtol=1e-11, atol=1e-15
    )
    assert abs(float(a_mean - t_mean)) > 1e-4  # the two estimators differ on this batch


def test_averaging_over_cyclic_repairings_gives_the_full_cross_term():
    """The full cross term is the off-diagonal one averaged over the ``n`` pairings ``p_i -> p_{i+s}``."""
    z, prior = _pair(13, 4, seed=11)
    n = z.shape[0]
    averaged = sum(antixk_client(z, torch.roll(prior, s, dims=0)) for s in range(n)) / n
    torch.testing.assert_close(
        averaged, fast_imq_mmd(z, prior, scales=(1.0,), sigma2=2.0, eps=1e-7), rtol=1e-12, atol=1e-15
    )
    single = [float(antixk_client(z, torch.roll(prior, s, dims=0))) for s in range(n)]
    assert max(single) - min(single) > 1e-4  # the pairing changes AntixK's value


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 23),
    d=st.integers(1, 9),
    z_var=st.floats(0.05, 20.0),
    eps=st.sampled_from([0.0, 1e-7, 0.3]),
    shift=st.floats(-3.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_property_offdiagonal_rebuild_and_identities(n, d, z_var, eps, shift, seed):
    """For any size (n >= 2): the rebuild equals the client, and the two identities of the guide hold."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64) + shift
    prior = torch.randn(n, d, generator=gen, dtype=torch.float64)
    c = 2.0 * d * z_var
    t = imq_mmd_terms(z, prior, scales=(1.0,), sigma2=z_var, eps=eps)
    matched = (c / (c + eps + (z - prior).pow(2).sum(1))).sum()
    rebuilt = (t.self_x / t.den_x + t.self_y / t.den_y - 2 * (t.cross * n * n - matched) / (n * (n - 1))).sum()
    client = antixk_client(z, prior, z_var, eps)
    torch.testing.assert_close(rebuilt, client, rtol=1e-10, atol=1e-13)
    fused = fast_imq_mmd(z, prior, scales=(1.0,), sigma2=z_var, eps=eps)
    k = c / (eps + c + _sqdist(z, prior))
    correction = 2.0 / (n - 1) * (k.mean() - torch.diagonal(k).mean())
    torch.testing.assert_close(client, fused - correction, rtol=1e-10, atol=1e-13)
    averaged = sum(antixk_client(z, torch.roll(prior, s, 0), z_var, eps) for s in range(n)) / n
    torch.testing.assert_close(averaged, fused, rtol=1e-10, atol=1e-13)


def test_terms_mmd_equals_fast_imq_mmd():
    z, prior = _pair(17, 5, seed=12)
    t = imq_mmd_terms(z, prior, scales=WAE_SCALES, eps=1e-7)
    torch.testing.assert_close(
        t.mmd(), fast_imq_mmd(z, prior, scales=WAE_SCALES, eps=1e-7, reduction="none"), rtol=1e-12, atol=1e-15
    )
    n = z.shape[0]
    torch.testing.assert_close(t.den_x, torch.tensor(1 - 1 / n, dtype=torch.float64), rtol=1e-15, atol=0)
    assert gmwae_fast.mmd.bandwidths_for(z, WAE_SCALES) == pytest.approx([2 * 5 * s for s in WAE_SCALES])


def test_benchmark_measures_the_client_forms():
    """``benchmarks/bench_migrating.py`` times what these tests check: its client forms and mappings agree."""
    import importlib.util

    path = DOC.parents[1] / "benchmarks" / "bench_migrating.py"
    spec = importlib.util.spec_from_file_location("bench_migrating", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    z, prior = _pair(21, 6, seed=13)
    pairs = [
        (bench.schelotto_like, schelotto_client),
        (bench.konny_like, lambda a, b: konny_client(a, b, 2.0)),
        (bench.antixk_like, antixk_client),
        (bench.schelotto_fused, schelotto_client),
        (bench.konny_fused, lambda a, b: konny_client(a, b, 2.0)),
        (bench.antixk_fused_exact, antixk_client),
        (bench.antixk_fused_ustat, full_cross_client),
    ]
    for got_fn, want_fn in pairs:
        torch.testing.assert_close(got_fn(z, prior), want_fn(z, prior), rtol=1e-10, atol=1e-14)
