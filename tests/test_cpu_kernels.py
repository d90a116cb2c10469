"""The fused CPU kernels of ``gmwae_fast._C`` (``torch.ops.gmwae_fast.imq_*``) against a float64 brute force.

The reference below is written here on purpose (independent of ``gmwae_fast.reference``): it materialises the
N x M distance matrix in float64 and gets every gradient from autograd.  The contract is docs/ARCHITECTURE.md.
Skipped, with the reason, when the extension cannot be imported (CI builds it, so these tests run there).

``test_cuda_kernels_emulated`` also runs the CUDA kernels' device code (csrc/imq_mmd_cuda_kernels.cuh) on the
CPU under the SIMT emulator of csrc/testing/ (needs only a C++20 compiler, no GPU, no extension).
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch

try:
    importlib.import_module("gmwae_fast._C")
    _IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the build
    _IMPORT_ERROR = f"gmwae_fast._C cannot be imported ({type(exc).__name__}: {exc})"

needs_ext = pytest.mark.skipif(_IMPORT_ERROR is not None, reason=_IMPORT_ERROR or "")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OPS = torch.ops.gmwae_fast
BW = torch.tensor([0.02, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0], dtype=torch.float64)  # groups of 3, 3 and 1


# ---------------------------------------------------------------------------------------------------------------
# float64 brute-force reference (autograd for the gradients)
# ---------------------------------------------------------------------------------------------------------------


def _kernel_sums(a, wa, b, wb, bw, mask=None):
    D = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)  # (N, M)
    K = bw[:, None, None] / (bw[:, None, None] + D)  # (S, N, M)
    W = wa[:, None] * wb[None, :]
    if mask is not None:
        W = W * mask
    return (K * W).sum((1, 2))


def ref_self(a, wa, bw, group, unbiased, h=None):
    a = a.detach().double().requires_grad_(h is not None)
    wa = wa.detach().double().requires_grad_(h is not None)
    n = a.shape[0]
    mask = None
    if unbiased:
        g = torch.arange(n) // group
        mask = (g[:, None] != g[None, :]).double()
    vals = _kernel_sums(a, wa, a, wa, bw.double(), mask)
    if h is None:
        return vals.detach()
    da, dwa = torch.autograd.grad((vals * h.double()).sum(), (a, wa))
    return vals.detach(), da, dwa


def ref_cross(a, wa, b, wb, bw, h=None):
    req = h is not None
    a, wa, b, wb = (t.detach().double().requires_grad_(req) for t in (a, wa, b, wb))
    vals = _kernel_sums(a, wa, b, wb, bw.double())
    if h is None:
        return vals.detach()
    grads = torch.autograd.grad((vals * h.double()).sum(), (a, wa, b, wb))
    return (vals.detach(), *grads)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def _points(n, d, dtype, seed, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


def _weights(n, dtype, seed):
    g = torch.Generator().manual_seed(seed + 7)
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.2
    return (w / w.sum()).to(dtype)


def _h(seed, s=len(BW)):
    g = torch.Generator().manual_seed(seed + 11)
    return torch.randn(s, generator=g, dtype=torch.float64) * 2.0  # random signs, != 1


def _close(got, ref, rtol, name, atol_frac=None):
    """|got - ref| <= rtol * |ref| + atol, atol = atol_frac * max|ref| (gradients: components may be ~0)."""
    ref = ref.double()
    got = got.double()
    atol = (atol_frac if atol_frac is not None else rtol) * float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# (rtol values, rtol grads, relative atol of grads) per input dtype; the reference uses the same (rounded) inputs
TOL = {
    torch.float64: (1e-11, 1e-10, 1e-11),
    torch.float32: (2e-6, 2e-4, 2e-5),
    torch.bfloat16: (2e-6, 2e-2, 1e-2),  # the point gradients come back in bfloat16
    torch.float16: (2e-6, 4e-3, 2e-3),
}

SIZES = [1, 5, 37, 70, 129]
DIMS = [1, 2, 3, 10, 17, 64]


def _check_self(n, d, group, unbiased, dtype, seed):
    ct = _compute_dtype(dtype)
    a = _points(n, d, dtype, seed)
    wa = _weights(n, ct, seed)
    h = _h(seed)
    rv, rg, ra = TOL[dtype]
    vals = OPS.imq_self(a, wa, BW, group, unbiased)
    vals2, da, dwa = OPS.imq_self_grad(h, a, wa, BW, group, unbiased)
    assert vals.dtype == torch.float64 and vals.shape == BW.shape
    assert da.dtype == a.dtype and da.shape == a.shape and dwa.dtype == wa.dtype and dwa.shape == wa.shape
    r_vals, r_da, r_dwa = ref_self(a, wa, BW, group, unbiased, h)
    tag = f"self n={n} d={d} G={group} unbiased={unbiased} {dtype}"
    _close(vals, r_vals, rv, tag + " values", atol_frac=1e-14)
    _close(vals2, r_vals, rv, tag + " values(grad op)", atol_frac=1e-14)
    _close(da, r_da, rg, tag + " da", ra)
    _close(dwa, r_dwa, rg, tag + " dwa", ra)


def _check_cross(n, m, d, dtype, seed):
    ct = _compute_dtype(dtype)
    a = _points(n, d, dtype, seed)
    b = _points(m, d, dtype, seed + 1, scale=1.3, offset=0.2)
    wa = _weights(n, ct, seed)
    wb = _weights(m, ct, seed + 1)
    h = _h(seed)
    rv, rg, ra = TOL[dtype]
    vals = OPS.imq_cross(a, wa, b, wb, BW)
    vals2, da, dwa, db, dwb = OPS.imq_cross_grad(h, a, wa, b, wb, BW)
    assert vals.dtype == torch.float64 and vals.shape == BW.shape
    for g, x in ((da, a), (dwa, wa), (db, b), (dwb, wb)):
        assert g.dtype == x.dtype and g.shape == x.shape
    r_vals, r_da, r_dwa, r_db, r_dwb = ref_cross(a, wa, b, wb, BW, h)
    tag = f"cross n={n} m={m} d={d} {dtype}"
    _close(vals, r_vals, rv, tag + " values", atol_frac=1e-14)
    _close(vals2, r_vals, rv, tag + " values(grad op)", atol_frac=1e-14)
    _close(da, r_da, rg, tag + " da", ra)
    _close(dwa, r_dwa, rg, tag + " dwa", ra)
    _close(db, r_db, rg, tag + " db", ra)
    _close(dwb, r_dwb, rg, tag + " dwb", ra)


# ---------------------------------------------------------------------------------------------------------------
# correctness
# ---------------------------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("group,unbiased", [(1, False), (1, True), (3, False), (3, True)])
@pytest.mark.parametrize("n", SIZES)
def test_self_float64(n, group, unbiased):
    for d in DIMS:  # N = n groups of `group` points
        _check_self(n * group, d, group, unbiased, torch.float64, seed=1000 * n + 10 * d + group)


@needs_ext
@pytest.mark.parametrize("n", SIZES)
def test_cross_float64(n):
    for i, m in enumerate(SIZES):
        for d in (DIMS[(i + SIZES.index(n)) % len(DIMS)], DIMS[(2 * i + 3) % len(DIMS)]):
            _check_cross(n, m, d, torch.float64, seed=100 * n + m + d)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_self_low_precision(dtype):
    for n, d, group, unbiased in [
        (129, 10, 1, True),
        (70, 3, 1, False),
        (37 * 3, 17, 3, True),
        (5, 64, 1, False),
        (1, 2, 1, False),
        (300, 64, 3, False),
    ]:
        _check_self(n, d, group, unbiased, dtype, seed=n + d)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cross_low_precision(dtype):
    for n, m, d in [(129, 70, 10), (37, 5, 64), (1, 129, 3), (70, 1, 17), (300, 257, 2)]:
        _check_cross(n, m, d, dtype, seed=n + m + d)


@needs_ext
def test_mixed_dtypes_cross():
    """A float64 operand makes the whole computation float64; each gradient comes back in its operand's dtype."""
    a = _points(37, 5, torch.float32, 1)
    b = _points(29, 5, torch.float64, 2)
    wa, wb = _weights(37, torch.float64, 1), _weights(29, torch.float64, 2)
    h = _h(3)
    vals, da, dwa, db, dwb = OPS.imq_cross_grad(h, a, wa, b, wb, BW)
    r = ref_cross(a, wa, b, wb, BW, h)
    assert da.dtype == torch.float32 and db.dtype == torch.float64
    _close(vals, r[0], 1e-11, "values")
    _close(db, r[3], 1e-10, "db", 1e-11)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_grad_without_column_side(dtype):
    """b_grad=False (the prior samples of a WAE need no gradient): the kernel skips the column side; values, da and
    dwa are bitwise those of the full pass, db and dwb are zeros of the right shapes and dtypes."""
    for n, m, d in [(129, 70, 10), (1, 129, 3), (300, 257, 2)]:
        a, b = _points(n, d, dtype, n), _points(m, d, dtype, m + 1)
        wa, wb = _weights(n, dtype, n), _weights(m, dtype, m + 1)
        h = _h(5)
        full = OPS.imq_cross_grad(h, a, wa, b, wb, BW)
        rows = OPS.imq_cross_grad(h, a, wa, b, wb, BW, False)
        for name, g, w in zip(("values", "da", "dwa"), rows[:3], full[:3]):
            assert torch.equal(g, w), f"{name} differs without the column side ({n}x{m}x{d})"
        assert rows[3].shape == b.shape and rows[3].dtype == b.dtype and not rows[3].any()
        assert rows[4].shape == wb.shape and rows[4].dtype == wb.dtype and not rows[4].any()


@needs_ext
def test_isolated_and_single_bandwidths():
    """Bandwidths that cannot share a reciprocal (ratio > 1e4), groups of 1 and 2, and far-apart points."""
    bw = torch.tensor([1e-3, 50.0, 1e5, 3.0, 4.0], dtype=torch.float64)
    a = _points(70, 4, torch.float64, 5, scale=30.0)
    b = _points(33, 4, torch.float64, 6, scale=0.01, offset=100.0)
    wa, wb = _weights(70, torch.float64, 5), _weights(33, torch.float64, 6)
    h = _h(7, s=5)
    got = OPS.imq_cross_grad(h, a, wa, b, wb, bw)
    ref = ref_cross(a, wa, b, wb, bw, h)
    for g, r, name in zip(got, ref, ("values", "da", "dwa", "db", "dwb")):
        _close(g, r, 1e-10, name, 1e-12)
    got = OPS.imq_self_grad(h, a.float(), wa.float(), bw, 1, True)
    ref = ref_self(a.float(), wa.float(), bw, 1, True, h)
    for g, r, name in zip(got, ref, ("values", "da", "dwa")):
        _close(g, r, 2e-5 if name == "values" else 2e-4, name, 2e-5)


@needs_ext
def test_empty_and_degenerate():
    bw = BW
    h = _h(0)
    a0 = torch.zeros(0, 3)
    w0 = torch.zeros(0)
    a = _points(5, 3, torch.float32, 0)
    w = _weights(5, torch.float32, 0)
    assert torch.equal(OPS.imq_self(a0, w0, bw, 1, True), torch.zeros(len(bw), dtype=torch.float64))
    vals, da, dwa = OPS.imq_cross_grad(h, a0, w0, a, w, bw)[:3]
    assert torch.equal(vals, torch.zeros(len(bw), dtype=torch.float64)) and da.shape == (0, 3)
    # one point, biased: only the analytic diagonal w^2 k(0) = w^2
    one = torch.ones(1, 4)
    vals, da, dwa = OPS.imq_self_grad(h, one, torch.tensor([0.5]), bw, 1, False)
    torch.testing.assert_close(vals, torch.full((len(bw),), 0.25, dtype=torch.float64))
    torch.testing.assert_close(dwa, torch.tensor([2 * 0.5 * float(h.sum())], dtype=torch.float32))
    assert torch.equal(da, torch.zeros(1, 4))
    # no bandwidths
    vals, da, dwa = OPS.imq_self_grad(torch.zeros(0, dtype=torch.float64), a, w, bw[:0], 1, True)
    assert vals.shape == (0,) and torch.equal(da, torch.zeros_like(a))
    # d = 0: every distance is 0
    z = torch.zeros(6, 0)
    wz = torch.full((6,), 1 / 6)
    torch.testing.assert_close(OPS.imq_self(z, wz, bw, 1, False), torch.ones(len(bw), dtype=torch.float64))


@needs_ext
def test_nan_propagates():
    a = _points(20, 3, torch.float32, 3)
    a[4, 1] = float("nan")
    w = _weights(20, torch.float32, 3)
    b = _points(9, 3, torch.float32, 4)
    wb = _weights(9, torch.float32, 4)
    assert torch.isnan(OPS.imq_self(a, w, BW, 1, True)).all()
    assert torch.isnan(OPS.imq_cross(a, w, b, wb, BW)).all()
    assert torch.isnan(OPS.imq_cross_grad(_h(1), a, w, b, wb, BW)[3]).any()


# ---------------------------------------------------------------------------------------------------------------
# register tiles: rows go in tiles of 2 (generic, AVX2) or 4 (AVX-512) rows against one column block of 16..64
# columns; rows whose allowed columns start inside the block, and the rows left over, go one by one
# ---------------------------------------------------------------------------------------------------------------

TILE_DIMS = [1, 3, 63, 65]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d", TILE_DIMS)
def test_tiles_leftover_rows(d, dtype):
    """Row counts that are not multiples of the tile (1 .. 3 rows left over, row blocks of 16 split into tiles and
    a short last block) against column counts that leave a partial column block; biased self terms, whose
    diagonal falls inside the tiles."""
    for n, m in [(1, 3), (2, 65), (3, 33), (6, 17), (7, 64), (19, 130), (45, 97)]:
        _check_cross(n, m, d, dtype, seed=31 * n + m + d)
    for n in (2, 3, 7, 19, 45, 70):
        _check_self(n, d, 1, False, dtype, seed=7 * n + d)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("group", [1, 2, 3, 5, 7])
def test_tiles_self_group_boundaries(group, dtype):
    """Unbiased self terms: the first allowed column of a row (after its own group) falls at every offset inside
    the row tiles, the row blocks and the column blocks (N spans several column blocks)."""
    for d, ngroups in [(1, 29), (3, 23), (63, 19), (65, 13)]:
        _check_self(group * ngroups, d, group, True, dtype, seed=100 * group + d)
    _check_self(group * 11, 3, group, False, dtype, seed=group)


# ---------------------------------------------------------------------------------------------------------------
# determinism and float32 accuracy
# ---------------------------------------------------------------------------------------------------------------


@needs_ext
def test_deterministic():
    a = _points(700, 10, torch.float32, 21)
    b = _points(515, 10, torch.float32, 22)
    wa, wb = _weights(700, torch.float32, 21), _weights(515, torch.float32, 22)
    h = _h(23)
    r1 = OPS.imq_self_grad(h, a, wa, BW, 1, True) + OPS.imq_cross_grad(h, a, wa, b, wb, BW)
    r2 = OPS.imq_self_grad(h, a, wa, BW, 1, True) + OPS.imq_cross_grad(h, a, wa, b, wb, BW)
    for x, y in zip(r1, r2):
        assert torch.equal(x, y)


def _chunked_ref_terms(x, y, bw, chunk=256):
    """float64 self(x) (unbiased, uniform weights), self(y), cross(x, y) without N x M x S in memory."""

    def total(p, q, same):
        acc = torch.zeros(len(bw), dtype=torch.float64)
        for i in range(0, p.shape[0], chunk):
            D = ((p[i : i + chunk, None, :] - q[None, :, :]) ** 2).sum(-1)
            if same:
                idx = torch.arange(i, min(i + chunk, p.shape[0]))
                D[idx - i, idx] = float("inf")  # excluded diagonal: k = 0
            for s, c in enumerate(bw.tolist()):
                acc[s] += (c / (c + D)).sum()
        return acc / (p.shape[0] * q.shape[0])

    return total(x, x, True), total(y, y, True), total(x, y, False)


@needs_ext
def test_float32_mmd_accuracy():
    """MMD2 of two samples of one law (near zero: the hard case) from float32 vs float64, rel err <= 1e-5.

    15 bandwidths C = 2 d s, s in {1, 2, 5} x 10^{-2..2}; MMD2 = self_x / den + self_y / den - 2 cross with
    den = 1 - sum_g W_g^2.  Per bandwidth for one pair of samples, and summed over bandwidths for three.  (The
    reference sees the same float32-rounded points: the test measures the kernels, not the input rounding.)
    Near-zero terms have an absolute error floor of ~1e-11 (float32 rounding of the distances, random): a
    single bandwidth's MMD2 of ~1e-6 is at 1e-5 relative; the summed MMD2 is at 1e-7 .. 2e-6.
    """
    n, d = 2048, 10
    bw = torch.tensor([2.0 * d * m * 10.0**j for j in range(-2, 3) for m in (1, 2, 5)], dtype=torch.float64)
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    den = 1.0 - float((w**2).sum())  # group = 1
    ones = torch.ones(len(bw), dtype=torch.float64)
    for k, (sx_seed, sy_seed) in enumerate([(31, 32), (5, 9), (7, 8)]):
        x = _points(n, d, torch.float32, sx_seed)
        y = _points(n, d, torch.float32, sy_seed)
        x64, y64 = x.double(), y.double()
        if k == 0:  # brute force
            sx, sy, cxy = _chunked_ref_terms(x64, y64, bw)
        else:  # the float64 kernels (checked against the brute force above and in the float64 tests)
            sx, sy, cxy = (
                OPS.imq_self(x64, w, bw, 1, True),
                OPS.imq_self(y64, w, bw, 1, True),
                OPS.imq_cross(x64, w, y64, w, bw),
            )
        mmd_ref = sx / den + sy / den - 2 * cxy
        w32 = w.float()
        mmd32 = (
            OPS.imq_self(x, w32, bw, 1, True) / den
            + OPS.imq_self(y, w32, bw, 1, True) / den
            - 2 * OPS.imq_cross(x, w32, y, w32, bw)
        )
        # the same through the fused value+gradient ops
        mmd32g = (
            OPS.imq_self_grad(ones, x, w32, bw, 1, True)[0] / den
            + OPS.imq_self_grad(ones, y, w32, bw, 1, True)[0] / den
            - 2 * OPS.imq_cross_grad(ones, x, w32, y, w32, bw)[0]
        )
        for got in (mmd32, mmd32g):
            rel_sum = abs(float(got.sum() - mmd_ref.sum())) / abs(float(mmd_ref.sum()))
            assert rel_sum <= 1e-5, (rel_sum, mmd_ref.tolist(), got.tolist())
            if k == 0:
                rel = ((got - mmd_ref).abs() / mmd_ref.abs()).max().item()
                assert rel <= 1e-5, (rel, mmd_ref.tolist(), got.tolist())


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


@needs_ext
def test_bad_inputs_raise():
    a = torch.randn(6, 3)
    w = torch.full((6,), 1 / 6)
    h = torch.ones(len(BW), dtype=torch.float64)
    cases = [
        (lambda: OPS.imq_self(a[0], w, BW, 1, True), "2-D"),
        (lambda: OPS.imq_self(a, w[:5], BW, 1, True), "entries"),
        (lambda: OPS.imq_self(a, w, BW, 4, True), "divisible"),
        (lambda: OPS.imq_self(a, w, BW, 0, True), "group"),
        (lambda: OPS.imq_self(a.int(), w, BW, 1, True), "float32"),
        (lambda: OPS.imq_self(a, w, -BW, 1, True), "bandwidth"),
        (lambda: OPS.imq_self(a, w, BW.reshape(1, -1), 1, True), "1-D"),
        (lambda: OPS.imq_self_grad(h[:2], a, w, BW, 1, True), "entries"),
        (lambda: OPS.imq_cross(a, w, torch.randn(4, 2), torch.full((4,), 0.25), BW), "columns"),
        (lambda: OPS.imq_cross_grad(h, a, w, torch.randn(4, 3), torch.full((5,), 0.2), BW), "entries"),
    ]
    for fn, needle in cases:
        with pytest.raises(RuntimeError, match=needle):
            fn()


# ---------------------------------------------------------------------------------------------------------------
# the other instruction-set variants (the dispatcher picks one per process: check the others in subprocesses)
# ---------------------------------------------------------------------------------------------------------------

_ISA_SCRIPT = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("tck", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
import gmwae_fast._C as C
for dt in (torch.float64, torch.float32):
    m._check_self(37 * 3, 17, 3, True, dt, seed=5)
    m._check_self(70, 3, 1, False, dt, seed=6)
    m._check_cross(129, 37, 10, dt, seed=7)
    m._check_cross(5, 70, 64, dt, seed=8)
    m._check_cross(19, 130, 65, dt, seed=9)
    m._check_self(5 * 29, 63, 5, True, dt, seed=10)
    m._check_self(45, 1, 1, False, dt, seed=11)
print("ISA", C.CPU_ISA)
"""


@needs_ext
@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_isa_variants(isa):
    env = dict(os.environ, GMWAE_FAST_CPU_ISA=isa)
    r = subprocess.run(
        [sys.executable, "-c", _ISA_SCRIPT, os.path.abspath(__file__)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ran = r.stdout.split("ISA")[-1].strip()
    assert ran in ("generic", isa), ran  # capped at what the CPU supports


# ---------------------------------------------------------------------------------------------------------------
# the CUDA kernels' device code, run on the CPU
# ---------------------------------------------------------------------------------------------------------------


def test_cuda_kernels_emulated(tmp_path):
    """csrc/testing/imq_cuda_emu_test.cpp: the CUDA tile/finalize kernels under the SIMT emulator vs float64."""
    from conftest import build_csrc_testing  # here: the ISA-variant subprocess imports this module without tests/

    exe = build_csrc_testing("imq_cuda_emu_test", tmp_path)
    run = subprocess.run([exe, "quick"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "ALL PASSED" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# a far outlier: the other points' gradients must not feel it (psi keeps decaying however far the pair is)
# ---------------------------------------------------------------------------------------------------------------


def _normwise(got, ref):
    return float((got.double() - ref).norm() / ref.norm())


@needs_ext
@pytest.mark.parametrize("outlier", [1e6, 1e12, 1e23, 1e25, 1e30, 3e38, -3e38])
def test_float32_gradients_with_a_far_outlier(outlier):
    """x[0] far away (float32 distance up to overflow): values and the normal points' gradients (x and y) within
    ~1e-5 normwise of the float64 reference, the outlier's own gradient finite."""
    from gmwae_fast import fast_imq_mmd

    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 5, generator=g)
    y = torch.randn(30, 5, generator=g)
    x[0] = outlier

    def run(xx, yy, backend):
        xx, yy = xx.clone().requires_grad_(), yy.clone().requires_grad_()
        v = fast_imq_mmd(xx, yy, backend=backend)
        v.backward()
        return v.detach(), xx.grad, yy.grad

    v, gx, gy = run(x, y, "cpu")
    rv, rgx, rgy = run(x.double(), y.double(), "reference")
    assert abs(float(v) - float(rv)) <= 1e-6 * abs(float(rv)), (float(v), float(rv))
    assert torch.isfinite(gx).all() and torch.isfinite(gy).all(), (gx[0], gy.abs().max())
    assert _normwise(gx[1:], rgx[1:]) <= 1e-5, (_normwise(gx[1:], rgx[1:]), (gx[1:].double() - rgx[1:]).abs().max())
    assert _normwise(gy, rgy) <= 1e-5, _normwise(gy, rgy)
    assert float(gx[0].abs().max()) <= 1e-3 * float(rgx[1:].abs().max())  # true value ~ C / |x0|^3 ~ 0


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_far_pairs_keep_relative_accuracy(dtype):
    """Every pair far beyond the bandwidths (x = D / R above 2^40): values and gradients still relative-accurate
    (the far branch of csrc/imq_math.h, k = c / x; a clamp of x would freeze them)."""
    a = _points(20, 3, dtype, 40) + 1e9
    b = _points(17, 3, dtype, 41) - 1e9
    wa, wb = _weights(20, _compute_dtype(dtype), 40), _weights(17, _compute_dtype(dtype), 41)
    bw = torch.tensor([1e-3, 0.02, 0.5], dtype=torch.float64)
    h = _h(42, s=3)
    got = OPS.imq_cross_grad(h, a, wa, b, wb, bw)
    ref = ref_cross(a, wa, b, wb, bw, h)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for gv, rv, name in zip(got, ref, ("values", "da", "dwa", "db", "dwb")):
        _close(gv, rv, tol, name, atol_frac=tol)
