"""Tests of gm_reparameterize: noise stream, forward/backward against closed forms, gradcheck, opcheck, compile.

Every backend that can run here is tested (``conftest.DEVICE_BACKENDS``; unusable ones are skipped with the reason):
the C++ ``cpu`` kernels, Triton on CPU tensors through the interpreter (small sizes), ``reference`` (the unfused
PyTorch sequence), and on a GPU ``cuda`` and ``triton``.

The noise of a fused backend is read back exactly with ``sigma_activation="exp"``, ``mu = 0`` and
``sigma_raw = 0``: then ``z = 0 + exp(0) * eps = eps``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE_BACKENDS, interpreted, skip_unless_usable

import gmwae_fast
from gmwae_fast import gm_reparameterize
from gmwae_fast.ops import gm_reparam as reparam_ops

OP_FAMILY = "gm_reparam"  # the registry answers the device_backend fixture for this op family
FUSED = [(d, b) for d, b in DEVICE_BACKENDS if b != "reference"]
ACTS = ("softplus", "exp")


# ---------------------------------------------------------------------------------------------------------------
# An independent NumPy Philox4x32-10 + Box-Muller: the definition of the fused backends' stream.
# ---------------------------------------------------------------------------------------------------------------

_M0, _M1, _W0, _W1, _MASK = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in (c0, c1, c2, c3))
    k0, k1, mask = np.uint64(k0), np.uint64(k1), np.uint64(_MASK)
    for _ in range(10):
        p0 = c0 * np.uint64(_M0)  # < 2^64: no overflow
        p1 = c2 * np.uint64(_M1)
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask)
        k0 = (k0 + np.uint64(_W0)) & mask
        k1 = (k1 + np.uint64(_W1)) & mask
    return c0, c1, c2, c3


def philox_normals(seed: int, n: int) -> np.ndarray:
    """Elements 0 .. n-1 of the stream (float64 Box-Muller of the float32-exact uniforms)."""
    c = np.arange((n + 3) // 4, dtype=np.uint64)
    zero = np.zeros_like(c)
    xs = philox4x32_10(c & np.uint64(_MASK), c >> np.uint64(32), zero, zero, seed & _MASK, seed >> 32)
    u = [((x >> np.uint64(8)).astype(np.float64) + 0.5) * 2.0**-24 for x in xs]
    r01, t01 = np.sqrt(-2.0 * np.log(u[0])), 2.0 * np.pi * u[1]
    r23, t23 = np.sqrt(-2.0 * np.log(u[2])), 2.0 * np.pi * u[3]
    out = np.stack([r01 * np.cos(t01), r01 * np.sin(t01), r23 * np.cos(t23), r23 * np.sin(t23)], axis=1)
    return out.reshape(-1)[:n]


def test_numpy_philox_known_answers():
    """Random123's published known-answer vectors for Philox4x32-10."""
    assert [int(v) for v in philox4x32_10(0, 0, 0, 0, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ff = 0xFFFFFFFF
    assert [int(v) for v in philox4x32_10(ff, ff, ff, ff, ff, ff)] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    got = philox4x32_10(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0)
    assert [int(v) for v in got] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def _inputs(B, K, d, device, dtype=torch.float32, gen_seed=0, requires_grad=True, scale=1.0):
    g = torch.Generator().manual_seed(gen_seed)
    mu = torch.randn(B, K, d, generator=g, dtype=torch.float64) * scale
    sr = torch.randn(B, K, d, generator=g, dtype=torch.float64) * 2.0
    lg = torch.randn(B, K, generator=g, dtype=torch.float64) * 2.0
    return tuple(t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (mu, sr, lg))


def _noise_of(B, K, d, device, backend, seed=None, dtype=torch.float32):
    """The eps a backend uses for ``seed`` (exp activation, mu = sigma_raw = 0: z = eps exactly)."""
    zeros = torch.zeros(B, K, d, device=device, dtype=dtype)
    z, _ = gm_reparameterize(
        zeros, zeros, torch.zeros(B, K, device=device, dtype=dtype), seed=seed, sigma_activation="exp", backend=backend
    )
    return z


def _act(x, act):
    return F.softplus(x) if act == "softplus" else torch.exp(x)


def _act_grad(x, act):
    return torch.sigmoid(x) if act == "softplus" else torch.exp(x)


def _closed_form(mu, sr, lg, eps, act, gz, gpi):
    """float64 z, pi and the gradients for cotangents gz, gpi."""
    mu, sr, lg, eps, gz, gpi = (t.detach().double() for t in (mu, sr, lg, eps, gz, gpi))
    z = mu + _act(sr, act) * eps
    pi = torch.softmax(lg, -1)
    dsr = gz * eps * _act_grad(sr, act)
    dlg = pi * (gpi - (gpi * pi).sum(-1, keepdim=True))
    return z, pi, gz, dsr, dlg


def _small(device, backend):
    return (3, 4, 5) if interpreted(device, backend) else (16, 10, 12)


@pytest.fixture(params=FUSED, ids=[f"{d}-{b}" for d, b in FUSED])
def fused_backend(request):
    device, backend = request.param
    skip_unless_usable(device, backend, op="gm_reparam")
    return device, backend


# ---------------------------------------------------------------------------------------------------------------
# The noise stream
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 17, 2**63 - 1])
def test_stream_matches_philox_definition(fused_backend, seed):
    device, backend = fused_backend
    B, K, d = 5, 3, 7
    eps = _noise_of(B, K, d, device, backend, seed=seed)
    ref = torch.from_numpy(philox_normals(seed, B * K * d)).reshape(B, K, d)
    # cpu / cuda: float32 polynomials (~1 ulp); triton: tl.cos / tl.sin of 2 pi u rounded to float32.
    torch.testing.assert_close(eps.double().cpu(), ref, rtol=0, atol=5e-6)


def test_triton_and_cpu_streams_agree():
    skip_unless_usable("cpu", "cpu", op="gm_reparam")
    skip_unless_usable("cpu", "triton", op="gm_reparam")
    a = _noise_of(4, 5, 6, "cpu", "cpu", seed=77)
    b = _noise_of(4, 5, 6, "cpu", "triton", seed=77)
    torch.testing.assert_close(a, b, rtol=0, atol=5e-6)


def test_cpu_and_cuda_streams_identical():
    skip_unless_usable("cuda", "cuda", op="gm_reparam")
    skip_unless_usable("cpu", "cpu", op="gm_reparam")
    a = _noise_of(33, 10, 17, "cpu", "cpu", seed=2024)
    b = _noise_of(33, 10, 17, "cuda", "cuda", seed=2024).cpu()
    # same Philox bits and the same float32 operations; only FMA contraction may differ (a few ulp at most)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _stat_size(device, backend):
    return (64, 8, 128)  # 65536 values; the interpreter handles this in a few programs


def test_noise_statistics(device_backend):
    device, backend = device_backend
    B, K, d = _stat_size(device, backend)
    eps = _noise_of(B, K, d, device, backend, seed=123).double().cpu()
    x = eps.reshape(-1)
    n = x.numel()
    tol = 5.0 / math.sqrt(n)  # 5 standard errors
    assert abs(x.mean().item()) < tol
    assert abs(x.var().item() - 1.0) < 5.0 * math.sqrt(2.0 / n)
    # distribution: Kolmogorov-Smirnov distance to N(0, 1) (1% critical value 1.63 / sqrt(n))
    xs = x.sort().values
    cdf = 0.5 * (1.0 + torch.special.erf(xs / math.sqrt(2.0)))
    emp = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (emp - cdf).abs().max().item() < 1.63 / math.sqrt(n) + 1.0 / n
    # neighbouring elements (lags 1..4 cover the four lanes of one Philox counter, lag 4 the next counter)
    for lag in (1, 2, 3, 4, 5):
        c = torch.corrcoef(torch.stack([x[:-lag], x[lag:]]))[0, 1].item()
        assert abs(c) < tol, f"lag {lag}: correlation {c}"
        c2 = torch.corrcoef(torch.stack([x[:-lag] ** 2, x[lag:] ** 2]))[0, 1].item()
        assert abs(c2) < tol, f"lag {lag}: correlation of squares {c2}"
    # independence across modes k and inputs b
    ck = torch.corrcoef(torch.stack([eps[:, :-1].reshape(-1), eps[:, 1:].reshape(-1)]))[0, 1].item()
    cb = torch.corrcoef(torch.stack([eps[:-1].reshape(-1), eps[1:].reshape(-1)]))[0, 1].item()
    assert abs(ck) < tol and abs(cb) < tol
    # per-mode means are all consistent with 0 (no mode shares or offsets its noise)
    per_mode = eps.mean(dim=(0, 2))
    assert per_mode.abs().max().item() < 5.0 / math.sqrt(B * d)


def test_different_seeds_give_different_noise(device_backend):
    device, backend = device_backend
    B, K, d = _small(device, backend)
    a = _noise_of(B, K, d, device, backend, seed=1).double().cpu().reshape(-1)
    b = _noise_of(B, K, d, device, backend, seed=2).double().cpu().reshape(-1)
    assert not torch.equal(a, b)
    assert (a != b).double().mean().item() > 0.99
    if backend != "reference":  # long streams: uncorrelated
        a = _noise_of(64, 8, 32, device, backend, seed=2**32 + 1).double().cpu().reshape(-1)
        b = _noise_of(64, 8, 32, device, backend, seed=1).double().cpu().reshape(-1)  # same low key word
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5.0 / math.sqrt(a.numel())


def test_same_seed_same_z(device_backend):
    device, backend = device_backend
    mu, sr, lg = _inputs(*_small(device, backend), device)
    z1, p1 = gm_reparameterize(mu, sr, lg, seed=42, backend=backend)
    z2, p2 = gm_reparameterize(mu, sr, lg, seed=42, backend=backend)
    assert torch.equal(z1, z2) and torch.equal(p1, p2)
    z3, _ = gm_reparameterize(mu, sr, lg, seed=torch.tensor(42), backend=backend)
    assert torch.equal(z1, z3)
    if backend != "reference":
        z4, _ = gm_reparameterize(mu, sr, lg, seed=torch.tensor([42], device=device), backend=backend)
        assert torch.equal(z1, z4)


def test_seed_none_follows_torch_manual_seed(device_backend):
    device, backend = device_backend
    mu, sr, lg = _inputs(*_small(device, backend), device)
    torch.manual_seed(7)
    z1, _ = gm_reparameterize(mu, sr, lg, backend=backend)
    z2, _ = gm_reparameterize(mu, sr, lg, backend=backend)
    torch.manual_seed(7)
    z3, _ = gm_reparameterize(mu, sr, lg, backend=backend)
    assert torch.equal(z1, z3)
    assert not torch.equal(z1, z2)


def test_noise_replays_the_seeded_sample(fused_backend):
    device, backend = fused_backend
    B, K, d = _small(device, backend)
    mu, sr, lg = _inputs(B, K, d, device)
    eps = _noise_of(B, K, d, device, backend, seed=9)
    z_seed, _ = gm_reparameterize(mu, sr, lg, seed=9, backend=backend)
    z_noise, _ = gm_reparameterize(mu, sr, lg, noise=eps, backend=backend)
    assert torch.equal(z_seed, z_noise)


# ---------------------------------------------------------------------------------------------------------------
# Forward and gradients against the closed form
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("use_seed", [False, True], ids=["noise", "seed"])
def test_forward_and_gradients_closed_form(device_backend, act, use_seed):
    device, backend = device_backend
    B, K, d = _small(device, backend)
    mu, sr, lg = _inputs(B, K, d, device)
    if use_seed:
        eps = _noise_of(B, K, d, device, backend, seed=31)
        z, pi = gm_reparameterize(mu, sr, lg, seed=31, sigma_activation=act, backend=backend)
    else:
        eps = torch.randn(B, K, d, device=device)
        z, pi = gm_reparameterize(mu, sr, lg, noise=eps, sigma_activation=act, backend=backend)
    assert z.dtype == torch.float32 and pi.dtype == torch.float32 and z.shape == mu.shape and pi.shape == lg.shape
    gz = torch.randn_like(z)
    gpi = torch.randn_like(pi)
    dmu, dsr, dlg = torch.autograd.grad([z, pi], [mu, sr, lg], [gz, gpi])
    rz, rpi, rdmu, rdsr, rdlg = _closed_form(mu, sr, lg, eps, act, gz, gpi)
    for got, want in ((z, rz), (pi, rpi), (dmu, rdmu), (dsr, rdsr), (dlg, rdlg)):
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)


def test_gradient_of_z_only_and_pi_only(device_backend):
    device, backend = device_backend
    mu, sr, lg = _inputs(*_small(device, backend), device)
    z, pi = gm_reparameterize(mu, sr, lg, seed=3, backend=backend)
    (dlg,) = torch.autograd.grad(z.sum(), [lg], allow_unused=True, materialize_grads=True, retain_graph=True)
    assert torch.count_nonzero(dlg) == 0
    dmu, dsr = torch.autograd.grad((pi * pi).sum(), [mu, sr], allow_unused=True, materialize_grads=True)
    assert torch.count_nonzero(dmu) == 0 and torch.count_nonzero(dsr) == 0


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_float64(device_backend, act):
    device, backend = device_backend
    mu, sr, lg = _inputs(2, 3, 4, device, dtype=torch.float64)

    def f(m, s, l):
        return gm_reparameterize(m, s, l, seed=5, sigma_activation=act, backend=backend)

    assert torch.autograd.gradcheck(f, (mu, sr, lg), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(device_backend, dtype):
    device, backend = device_backend
    B, K, d = _small(device, backend)
    mu, sr, lg = _inputs(B, K, d, device, dtype=dtype)
    eps = torch.randn(B, K, d, device=device, dtype=dtype)
    z, pi = gm_reparameterize(mu, sr, lg, noise=eps, backend=backend)
    assert z.dtype == dtype and pi.dtype == dtype
    gz, gpi = torch.randn_like(z), torch.randn_like(pi)
    dmu, dsr, dlg = torch.autograd.grad([z, pi], [mu, sr, lg], [gz, gpi])
    assert dmu.dtype == dtype and dsr.dtype == dtype and dlg.dtype == dtype
    # float32 math on the rounded inputs: the only error is the final rounding to dtype
    rz, rpi, _, rdsr, rdlg = _closed_form(mu, sr, lg, eps, "softplus", gz, gpi)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    for got, want in ((z, rz), (pi, rpi), (dsr, rdsr), (dlg, rdlg)):
        torch.testing.assert_close(got.double(), want, **tol)
    # seeded: same stream as float32 (the noise is generated in float32)
    z16, _ = gm_reparameterize(mu, sr, lg, seed=8, sigma_activation="exp", backend=backend)
    z32, _ = gm_reparameterize(mu.float(), sr.float(), lg.float(), seed=8, sigma_activation="exp", backend=backend)
    if backend != "reference":
        torch.testing.assert_close(z16.double(), z32.double(), **tol)


def test_mixed_dtypes_promote(device_backend):
    device, backend = device_backend
    B, K, d = _small(device, backend)
    mu, _, lg = _inputs(B, K, d, device, dtype=torch.float16)
    sr = torch.zeros(B, K, d, device=device, requires_grad=True)
    z, pi = gm_reparameterize(mu, sr, lg, seed=1, backend=backend)
    assert z.dtype == torch.float32 and pi.dtype == torch.float16
    z.sum().backward()
    assert mu.grad.dtype == torch.float16 and sr.grad.dtype == torch.float32


def test_extreme_values(device_backend):
    device, backend = device_backend
    vals = torch.tensor([-100.0, -30.0, -20.5, -1e-3, 0.0, 1e-3, 19.9, 20.1, 30.0, 80.0], dtype=torch.float64)
    sr = vals.reshape(1, 1, -1).to(device).float().requires_grad_()
    mu = torch.zeros_like(sr, requires_grad=True)
    lg = torch.tensor([[0.0]], device=device, requires_grad=True)
    eps = torch.ones_like(sr)
    for act in ACTS:
        z, pi = gm_reparameterize(mu, sr, lg, noise=eps, sigma_activation=act, backend=backend)
        (dsr,) = torch.autograd.grad(z.sum(), [sr])
        want = _act(vals, act)
        torch.testing.assert_close(z.double().cpu().reshape(-1), want, rtol=1e-6, atol=1e-30)
        torch.testing.assert_close(dsr.double().cpu().reshape(-1), _act_grad(vals, act), rtol=1e-6, atol=1e-30)
        assert torch.equal(pi.cpu(), torch.ones(1, 1))
    # extreme logits: softmax stays finite and exact
    lg = torch.tensor([[0.0, 1000.0, -1000.0], [-float("inf"), 0.0, 1.0]], device=device)
    _, pi = gm_reparameterize(
        torch.zeros(2, 3, 1, device=device), torch.zeros(2, 3, 1, device=device), lg, seed=0, backend=backend
    )
    torch.testing.assert_close(pi.cpu(), torch.softmax(lg.cpu(), -1))


# ---------------------------------------------------------------------------------------------------------------
# torch.library: opcheck, torch.compile
# ---------------------------------------------------------------------------------------------------------------


def _op_args(device, dtype=torch.float32, with_noise=False, seed_device=None):
    mu, sr, lg = _inputs(2, 3, 5, device, dtype=dtype)
    seed = None if with_noise else torch.tensor(11, device=seed_device or device)
    noise = torch.randn(2, 3, 5, device=device, dtype=dtype) if with_noise else None
    return mu, sr, lg, seed, noise


@pytest.mark.parametrize("variant", ["seed", "noise", "cpu_seed", "exp_f64"])
def test_opcheck(fused_backend, variant):
    device, backend = fused_backend
    ops = reparam_ops.op_set(backend)
    dtype = torch.float64 if variant == "exp_f64" else torch.float32
    mu, sr, lg, seed, noise = _op_args(
        device, dtype=dtype, with_noise=variant == "noise", seed_device="cpu" if variant == "cpu_seed" else None
    )
    act = "exp" if variant == "exp_f64" else "softplus"
    torch.library.opcheck(ops.forward, (mu, sr, lg, seed, noise, act))
    gz = torch.randn_like(mu.detach())
    gpi = torch.randn_like(lg.detach())
    torch.library.opcheck(ops.backward, (gz, gpi, sr.detach(), lg.detach(), seed, noise, act))


@pytest.mark.parametrize("seeded", [False, True], ids=["seed_none", "seed_tensor"])
def test_compile_fullgraph(device_backend, seeded):
    device, backend = device_backend
    if seeded and backend == "reference":
        pytest.skip("the reference backend seeds a torch.Generator, which torch.compile does not trace")
    torch._dynamo.reset()
    mu, sr, lg = _inputs(*_small(device, backend), device)

    if seeded:

        def f(m, s, l, seed):
            z, pi = gm_reparameterize(m, s, l, seed=seed, backend=backend)
            return (z * z).sum() + (pi * torch.arange(pi.shape[1], device=pi.device)).sum(), z

        seed = torch.tensor(1234)
        loss_c, z_c = torch.compile(f, fullgraph=True)(mu, sr, lg, seed)
        loss_e, z_e = f(mu, sr, lg, seed)
        assert torch.equal(z_c, z_e)
    else:

        def f(m, s, l):
            z, pi = gm_reparameterize(m, s, l, backend=backend)
            return (z * z).sum() + (pi * torch.arange(pi.shape[1], device=pi.device)).sum(), z

        cf = torch.compile(f, fullgraph=True)
        torch.manual_seed(0)
        loss_c, z_c = cf(mu, sr, lg)
        torch.manual_seed(0)
        _, z_c2 = cf(mu, sr, lg)
        _, z_c3 = cf(mu, sr, lg)
        assert torch.equal(z_c, z_c2) and not torch.equal(z_c, z_c3)
    grads = torch.autograd.grad(loss_c, [mu, sr, lg])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------------------------------------------------------
# The GM-WAE usage pattern
# ---------------------------------------------------------------------------------------------------------------


def test_gmwae_usage_with_imq_mmd(device_backend):
    device, backend = device_backend
    B, K, d = (6, 3, 4) if interpreted(device, backend) else (32, 10, 8)
    mu, sr, lg = _inputs(B, K, d, device, scale=0.5)
    prior = torch.randn(64, d, device=device)
    z, pi = gm_reparameterize(mu, sr, lg, seed=17, backend=backend)
    mmd = gmwae_fast.fast_imq_mmd(z, prior, x_weights=pi, backend="reference")
    grads = torch.autograd.grad(mmd, [mu, sr, lg])
    assert torch.isfinite(mmd) and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    # the same loss through the unfused sequence with the same noise has the same gradients
    eps = _noise_of(B, K, d, device, backend, seed=17)
    mu2, sr2, lg2 = (t.detach().clone().requires_grad_() for t in (mu, sr, lg))
    z2 = mu2 + F.softplus(sr2) * eps
    mmd2 = gmwae_fast.fast_imq_mmd(z2, prior, x_weights=torch.softmax(lg2, -1), backend="reference")
    torch.testing.assert_close(mmd, mmd2, rtol=1e-5, atol=1e-7)
    for g, g2 in zip(grads, torch.autograd.grad(mmd2, [mu2, sr2, lg2])):
        torch.testing.assert_close(g, g2, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def _good():
    return torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(mu=torch.zeros(2, 3)), ValueError, r"mu must have shape \(B, K, d\)"),
        (dict(mu=[[0.0]]), TypeError, "mu must be a torch.Tensor"),
        (dict(mu=torch.zeros(2, 3, 4, dtype=torch.int64)), TypeError, "mu must be a floating-point"),
        (dict(sigma_raw=torch.zeros(2, 3, 5)), ValueError, "sigma_raw must have the shape of mu"),
        (dict(sigma_raw=torch.zeros(2, 3, 4, dtype=torch.int32)), TypeError, "sigma_raw must be a floating-point"),
        (dict(logits=torch.zeros(2, 4)), ValueError, r"logits must have shape \(B, K\)"),
        (dict(logits=torch.zeros(2, 3, dtype=torch.bool)), TypeError, "logits must be a floating-point"),
        (dict(logits=torch.zeros(2, 3, device="meta")), ValueError, "logits is on meta"),
        (
            dict(mu=torch.zeros(0, 3, 4), sigma_raw=torch.zeros(0, 3, 4), logits=torch.zeros(0, 3)),
            ValueError,
            "mu is empty",
        ),
        (dict(sigma_activation="relu"), ValueError, "unknown sigma_activation 'relu'"),
        (dict(backend="fast"), ValueError, "unknown backend 'fast'"),
        (dict(backend=3), TypeError, "backend must be a string"),
        (dict(noise=torch.zeros(2, 3, 5)), ValueError, "noise must have the shape of mu"),
        (dict(noise=torch.zeros(2, 3, 4, dtype=torch.int64)), TypeError, "noise must be a floating-point"),
        (dict(noise=torch.zeros(2, 3, 4), seed=1), ValueError, "either seed or noise"),
        (dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*63\)"),
        (dict(seed=2**63), ValueError, r"seed must be in \[0, 2\*\*63\)"),
        (dict(seed=1.5), TypeError, "seed must be None, an int or an integer tensor"),
        (dict(seed=True), TypeError, "seed must be None, an int or an integer tensor"),
        (dict(seed=torch.tensor(1.0)), TypeError, "seed must be an int or an integer tensor"),
        (dict(seed=torch.tensor([1, 2])), ValueError, "seed must be a single value"),
    ],
)
def test_bad_input(change, exc, match):
    mu, sr, lg = _good()
    kwargs = dict(mu=mu, sigma_raw=sr, logits=lg)
    kwargs.update(change)
    args = (kwargs.pop("mu"), kwargs.pop("sigma_raw"), kwargs.pop("logits"))
    with pytest.raises(exc, match=match):
        gm_reparameterize(*args, **kwargs)


def test_unusable_backend_says_why():
    mu, sr, lg = _good()
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu tensors"):
        gm_reparameterize(mu, sr, lg, backend="cuda")


def test_mixed_devices():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    mu, sr, lg = _good()
    with pytest.raises(ValueError, match="sigma_raw is on"):
        gm_reparameterize(mu.cuda(), sr, lg.cuda())
    with pytest.raises(ValueError, match="noise is on"):
        gm_reparameterize(mu.cuda(), sr.cuda(), lg.cuda(), noise=torch.zeros(2, 3, 4))
