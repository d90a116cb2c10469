"""The Triton IMQ MMD launchers (``kernels/imq_mmd.py``) against a float64 brute-force reference written here.

Without a CUDA device the kernels run on CPU tensors through the Triton interpreter (``TRITON_INTERPRET=1``, set
below before Triton is imported), so sizes are small (the n = 2048 float32 accuracy check is the largest). With a
CUDA device the same tests run on the GPU (the accuracy checks then with the default GPU tiles). Skipped when Triton
is not importable. Besides values and gradients: no host-device synchronisation in the launchers, accuracy at any
spread of the points, one far outlier, one-hot cotangents.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not importable")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("", "0", "false", "no", "off"):
    pytest.skip(
        "no CUDA device and TRITON_INTERPRET is disabled: the Triton kernels cannot run", allow_module_level=True
    )


from gmwae_fast import _kernel_modules  # noqa: E402

K = _kernel_modules.load("imq_mmd")
F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------------
# float64 brute force (materialised N x M x S, small sizes only)
# ---------------------------------------------------------------------------------------------------------------


def ref_terms(a, wa, b, wb, bw, allowed=None):
    """``sum_{i, j} wa_i wb_j [allowed_ij] C_s / (C_s + ||a_i - b_j||^2)`` in float64, differentiable."""
    a, wa, b, wb, bw = (t.to(F64) for t in (a, wa, b, wb, bw))
    dist = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    kern = bw[:, None, None] / (bw[:, None, None] + dist)
    w = wa[:, None] * wb[None, :]
    if allowed is not None:
        w = w * allowed
    return (kern * w).sum((1, 2))


def allowed_mask(n, group, unbiased):
    if not unbiased:
        return None
    g = torch.arange(n, device=DEVICE) // group
    return (g[:, None] != g[None, :]).to(F64)


def ref_self(a, wa, bw, group, unbiased):
    return ref_terms(a, wa, a, wa, bw, allowed_mask(a.shape[0], group, unbiased))


def ref_self_grad(h, a, wa, bw, group, unbiased):
    a64 = a.detach().to(F64).requires_grad_()
    w64 = wa.detach().to(F64).requires_grad_()
    vals = ref_self(a64, w64, bw, group, unbiased)
    (vals * h).sum().backward()
    return vals.detach(), a64.grad, w64.grad


def ref_cross_grad(h, a, wa, b, wb, bw):
    leaves = [t.detach().to(F64).requires_grad_() for t in (a, wa, b, wb)]
    vals = ref_terms(*leaves[:2], *leaves[2:], bw)
    (vals * h).sum().backward()
    return (vals.detach(),) + tuple(t.grad for t in leaves)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def make_inputs(n, m, d, s, dtype, seed, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    cdt = F64 if dtype == F64 else torch.float32
    a = (torch.randn(n, d, generator=gen, dtype=F64) + offset).to(dtype)
    b = (torch.randn(m, d, generator=gen, dtype=F64) * 1.3 + 0.2 + offset).to(dtype)
    wa = (torch.rand(n, generator=gen, dtype=F64) + 0.1).to(cdt)
    wb = (torch.rand(m, generator=gen, dtype=F64) + 0.1).to(cdt)
    wa, wb = wa / wa.sum(), wb / wb.sum()
    bw = 2.0 * max(d, 1) * torch.exp(torch.empty(s, dtype=F64).uniform_(-2.5, 2.5, generator=gen))
    h = torch.randn(s, generator=gen, dtype=F64)
    h[h.abs() < 0.2] += 0.7  # entries != 1 and != 0
    return tuple(t.to(DEVICE) for t in (a, wa, b, wb, bw, h))


def assert_close(got, want, rel, name, dtype=None):
    """``|got - want| <= rel * max|want|`` (plus a tiny floor), and the expected dtype / shape."""
    if dtype is not None:
        assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    err = (got.to(F64) - want.to(F64)).abs().max().item() if want.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    assert err <= rel * scale + 1e-300, f"{name}: max error {err:.3e} vs scale {scale:.3e} (rel {rel:g})"


SMALL = {"block_i": 32, "block_j": 16}  # several row blocks and column tiles at these sizes
CONFIGS = {"small-blocks": SMALL, "default-blocks": {}, "column-splits": dict(SMALL, col_splits=3)}

# (N, M, d, group): sizes not multiples of the blocks, N = 1, d from 1 to 64, groups of 3
CASES_F64 = [
    (1, 1, 1, 1),
    (1, 5, 2, 1),
    (5, 37, 3, 1),
    (37, 70, 17, 1),
    (37, 5, 64, 1),
    (3, 1, 1, 3),
    (36, 70, 2, 3),
    (69, 37, 10, 3),
]
CASES_LOW = [
    (37, 70, 10, 1, SMALL),
    (69, 5, 17, 3, {}),
    (70, 37, 64, 1, {}),
]
# compute-dtype tolerances: (values, gradients of points, gradients of weights), relative to the largest entry
TOL = {
    F64: (1e-11, 1e-10, 1e-11),
    torch.float32: (2e-6, 2e-5, 1e-5),
    torch.bfloat16: (2e-6, 1e-2, 1e-5),  # points rounded to bfloat16 (reference uses the same points), da stored bf16
    torch.float16: (2e-6, 2e-3, 1e-5),
}


def check_all(n, m, d, group, dtype, seed, cfg, s=4, offset=0.0):
    a, wa, b, wb, bw, h = make_inputs(n, m, d, s, dtype, seed, offset)
    tv, tda, tdw = TOL[dtype]
    for unbiased in (False, True):
        tag = f"self(unbiased={unbiased})"
        assert_close(K.imq_self(a, wa, bw, group, unbiased, **cfg), ref_self(a, wa, bw, group, unbiased), tv, tag, F64)
        vals, da, dwa = K.imq_self_grad(h, a, wa, bw, group, unbiased, **cfg)
        rv, rda, rdw = ref_self_grad(h, a, wa, bw, group, unbiased)
        assert_close(vals, rv, tv, tag + " grad values", F64)
        assert_close(da, rda, tda, tag + " da", a.dtype)
        assert_close(dwa, rdw, tdw, tag + " dwa", wa.dtype)
    assert_close(K.imq_cross(a, wa, b, wb, bw, **cfg), ref_terms(a, wa, b, wb, bw), tv, "cross", F64)
    got = K.imq_cross_grad(h, a, wa, b, wb, bw, **cfg)
    want = ref_cross_grad(h, a, wa, b, wb, bw)
    for name, g, w, tol, dt in zip(
        ("values", "da", "dwa", "db", "dwb"),
        got,
        want,
        (tv, tda, tdw, tda, tdw),
        (F64, a.dtype, wa.dtype, b.dtype, wb.dtype),
    ):
        assert_close(g, w, tol, "cross grad " + name, dt)
    rows_only = K.imq_cross_grad(h, a, wa, b, wb, bw, False, **cfg)  # b_grad=False: no column pass, zeros
    for name, g, w in zip(("values", "da", "dwa"), rows_only[:3], got[:3]):
        assert torch.equal(g, w), "cross grad (b_grad=False) " + name
    assert not rows_only[3].any() and not rows_only[4].any(), "cross grad (b_grad=False) db/dwb not zero"


# ---------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("n,m,d,group", CASES_F64)
def test_float64_matches_reference(n, m, d, group, cfg):
    check_all(n, m, d, group, F64, seed=n * 1000 + m * 10 + d, cfg=cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,m,d,group,cfg", CASES_LOW)
def test_low_precision_matches_reference(n, m, d, group, cfg, dtype):
    check_all(n, m, d, group, dtype, seed=7 + n + d, cfg=cfg)


def test_float16_and_many_bandwidths():
    check_all(37, 21, 5, 1, torch.float16, seed=3, cfg=SMALL, s=32)


def test_wide_features_split_over_programs():
    # d > the widest feature chunk of the gradient kernel (64; 32 for float64): da is split over a grid axis
    check_all(12, 9, 130, 3, F64, seed=11, cfg={}, s=2)
    check_all(12, 9, 130, 1, torch.float32, seed=12, cfg={}, s=2)


def test_other_blocks_and_warps():
    check_all(37, 70, 6, 1, F64, seed=5, cfg={"block_i": 64, "block_j": 32, "num_warps": 2})
    check_all(70, 37, 3, 1, torch.float32, seed=6, cfg={"block_i": 32, "block_j": 32, "num_warps": 1})


def test_large_common_offset_float32():
    # points around 1000: the distances and the gradients must not suffer from the offset
    check_all(37, 29, 4, 1, torch.float32, seed=9, cfg=SMALL, offset=1000.0)


@pytest.mark.parametrize("shift", [1e3, 1e5])
def test_far_outliers_float32(shift):
    """A few points far from the rest (pairs far beyond the centring distance are summed directly)."""
    gen = torch.Generator().manual_seed(13)
    a = torch.randn(70, 4, generator=gen)
    b = torch.randn(37, 4, generator=gen)
    a[:3] += shift
    b[-2:] -= shift
    a, b = a.to(DEVICE), b.to(DEVICE)
    wa = torch.full((70,), 1 / 70, device=DEVICE)
    wb = torch.full((37,), 1 / 37, device=DEVICE)
    bw = torch.tensor([0.05, 0.5, 5.0, 50.0], dtype=F64, device=DEVICE)
    h = torch.tensor([0.5, -1.0, 2.0, 1.5], dtype=F64, device=DEVICE)
    cases = [(K.imq_cross(a, wa, b, wb, bw, **SMALL), ref_terms(a, wa, b, wb, bw), "cross")]
    for unbiased in (False, True):
        cases.append((K.imq_self(a, wa, bw, 1, unbiased, **SMALL), ref_self(a, wa, bw, 1, unbiased), "self"))
        cases.append(
            (
                K.imq_self_grad(h, a, wa, bw, 1, unbiased, **SMALL)[0],
                ref_self(a, wa, bw, 1, unbiased),
                "self grad values",
            )
        )
    cases.append((K.imq_cross_grad(h, a, wa, b, wb, bw, **SMALL)[0], ref_terms(a, wa, b, wb, bw), "cross grad values"))
    for got, want, name in cases:
        rel = ((got - want).abs() / want.abs()).max().item()
        assert rel <= 1e-6, f"{name}: relative error {rel:.2e}"


def test_single_point_groups():
    a, wa, _, _, bw, h = make_inputs(1, 1, 3, 3, F64, seed=1)
    assert torch.equal(K.imq_self(a, wa, bw, 1, True), torch.zeros(3, dtype=F64, device=DEVICE))
    torch.testing.assert_close(K.imq_self(a, wa, bw, 1, False), wa[0] ** 2 * torch.ones(3, dtype=F64, device=DEVICE))
    vals, da, dwa = K.imq_self_grad(h, a, wa, bw, 1, True)
    assert torch.equal(vals, torch.zeros_like(vals)) and torch.equal(da, torch.zeros_like(da))
    assert torch.equal(dwa, torch.zeros_like(dwa))
    # one group holding every point: the unbiased self term is empty
    a, wa, _, _, bw, h = make_inputs(6, 1, 2, 2, torch.float32, seed=2)
    assert torch.equal(K.imq_self(a, wa, bw, 6, True, **SMALL), torch.zeros(2, dtype=F64, device=DEVICE))


def test_grad_is_deterministic():
    a, wa, b, wb, bw, h = make_inputs(70, 37, 5, 3, torch.float32, seed=4)
    first = K.imq_cross_grad(h, a, wa, b, wb, bw, **SMALL) + K.imq_self_grad(h, a, wa, bw, 1, True, **SMALL)
    second = K.imq_cross_grad(h, a, wa, b, wb, bw, **SMALL) + K.imq_self_grad(h, a, wa, bw, 1, True, **SMALL)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_input_checks():
    a, wa, b, wb, bw, h = make_inputs(6, 4, 3, 2, torch.float32, seed=0)
    with pytest.raises(TypeError, match="wa"):
        K.imq_self(a, wa.double(), bw, 1, True)
    with pytest.raises(TypeError, match="bw"):
        K.imq_self(a, wa, bw.float(), 1, True)
    with pytest.raises(TypeError, match="a must be"):
        K.imq_self(a.to(torch.int32), wa, bw, 1, True)
    with pytest.raises(ValueError, match="2-D"):
        K.imq_self(a[0], wa, bw, 1, True)
    with pytest.raises(ValueError, match="wa"):
        K.imq_self(a, wa[:5], bw, 1, True)
    with pytest.raises(ValueError, match="divide"):
        K.imq_self(a, wa, bw, 4, True)
    with pytest.raises(ValueError, match="group"):
        K.imq_self(a, wa, bw, 0, False)
    with pytest.raises(ValueError, match="contiguous"):
        K.imq_self(torch.randn(3, 6, device=DEVICE).t(), wa, bw, 1, True)
    with pytest.raises(ValueError, match="features"):
        K.imq_cross(a, wa, b[:, :2].contiguous(), wb, bw)
    with pytest.raises(TypeError, match="same dtype"):
        K.imq_cross(a, wa, b.double(), wb, bw)
    with pytest.raises(ValueError, match="h"):
        K.imq_cross_grad(h[:1], a, wa, b, wb, bw)
    with pytest.raises(TypeError, match="h"):
        K.imq_self_grad(h.float(), a, wa, bw, 1, False)
    with pytest.raises(ValueError, match="power of two"):
        K.imq_cross(a, wa, b, wb, bw, block_i=48)
    with pytest.raises(ValueError, match="must not exceed"):
        K.imq_self_grad(h, a, wa, bw, 1, True, block_i=32, block_j=64)


def _mmd2(x, y, w, bw, self_fn, cross_fn):
    den = 1.0 - (w.to(F64) ** 2).sum()
    return self_fn(x, w, bw) / den + self_fn(y, w, bw) / den - 2.0 * cross_fn(x, w, y, w, bw)


def _ref_terms_chunked(a, wa, b, wb, bw, unbiased_self=False, chunk=256):
    a, wa, b, wb = (t.to(F64) for t in (a, wa, b, wb))
    out = torch.zeros(bw.shape[0], dtype=F64, device=a.device)
    for i0 in range(0, a.shape[0], chunk):
        dist = ((a[i0 : i0 + chunk, None, :] - b[None]) ** 2).sum(-1)
        w = wa[i0 : i0 + chunk, None] * wb[None]
        if unbiased_self:
            rows = torch.arange(i0, min(i0 + chunk, a.shape[0]), device=a.device)
            w = w * (rows[:, None] != torch.arange(b.shape[0], device=a.device)[None]).to(F64)
        out += (bw[:, None, None] / (bw[:, None, None] + dist) * w).sum((1, 2))
    return out


def test_float32_mmd_accuracy_near_zero():
    """float32 points, two samples of one law (n = 2048, d = 10, 15 bandwidths, MMD2 ~ 1e-6 .. 2e-5, unbiased):
    relative error <= 1e-5 per bandwidth against float64 (measured in the interpreter: ~2e-6, about the error that
    float32 distances alone cause). On a GPU with the default configuration; the interpreter uses larger blocks
    (fewer, larger numpy steps)."""
    n, d = 2048, 10
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(DEVICE)
    y = torch.randn(n, d, generator=gen).to(DEVICE)
    w = torch.full((n,), 1.0 / n, device=DEVICE)
    bw = 2.0 * d * torch.logspace(-1.5, 1.5, 15, dtype=F64, device=DEVICE)
    cfg = {"block_i": 256, "block_j": 32} if DEVICE == "cpu" else {}
    got = _mmd2(
        x,
        y,
        w,
        bw,
        lambda p, q, c: K.imq_self(p, q, c, 1, True, **cfg),
        lambda p, q, r, t, c: K.imq_cross(p, q, r, t, c, **cfg),
    )
    want = _mmd2(x, y, w, bw, lambda p, q, c: _ref_terms_chunked(p, q, p, q, c, unbiased_self=True), _ref_terms_chunked)
    rel = ((got - want).abs() / want.abs()).max().item()
    assert rel <= 1e-5, f"MMD2 relative error {rel:.2e} (MMD2 = {want.tolist()})"


def test_float32_mmd_accuracy_grad_pass():
    """Same check for the values returned by the gradient (row-pass) kernels, at a smaller n."""
    n, d = 512, 10
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=gen).to(DEVICE)
    y = torch.randn(n, d, generator=gen).to(DEVICE)
    w = torch.full((n,), 1.0 / n, device=DEVICE)
    bw = 2.0 * d * torch.logspace(-1.5, 1.5, 15, dtype=F64, device=DEVICE)
    ones = torch.ones(15, dtype=F64, device=DEVICE)
    cfg = {"block_i": 128, "block_j": 64} if DEVICE == "cpu" else {}
    got = _mmd2(
        x,
        y,
        w,
        bw,
        lambda p, q, c: K.imq_self_grad(ones, p, q, c, 1, True, **cfg)[0],
        lambda p, q, r, t, c: K.imq_cross_grad(ones, p, q, r, t, c, **cfg)[0],
    )
    want = _mmd2(x, y, w, bw, lambda p, q, c: _ref_terms_chunked(p, q, p, q, c, unbiased_self=True), _ref_terms_chunked)
    rel = ((got - want).abs() / want.abs()).max().item()
    assert rel <= 1e-5, f"MMD2 relative error {rel:.2e} (MMD2 = {want.tolist()})"


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["fp64", "fp32"])
def test_grad_column_splits(dtype):
    """Row passes split over column ranges (partials summed on the host) give the same gradients."""
    a, wa, b, wb, bw, h = make_inputs(37, 70, 5, 3, dtype, seed=21)
    _, tda, tdw = TOL[dtype]
    cfg = dict(SMALL, col_splits=3)
    for unbiased in (False, True):  # symmetric self values over split column ranges
        assert_close(
            K.imq_self(a, wa, bw, 1, unbiased, **cfg), ref_self(a, wa, bw, 1, unbiased), TOL[dtype][0], "self values"
        )
    got = K.imq_cross_grad(h, a, wa, b, wb, bw, **cfg)
    want = ref_cross_grad(h, a, wa, b, wb, bw)
    for name, g, w, tol in zip(("values", "da", "dwa", "db", "dwb"), got, want, TOL[dtype] + (tda, tdw)):
        assert_close(g, w, tol, "cross grad " + name, w.dtype if name == "values" else None)
    # 36 points in groups of 3, six of them repeated in other groups (zero distances between allowed pairs)
    a6 = torch.cat([a[:30], a[:6]]).contiguous()
    w6 = wa[:36].contiguous()
    got = K.imq_self_grad(h, a6, w6, bw, 3, True, **cfg)
    want = ref_self_grad(h, a6, w6, bw, 3, True)
    for name, g, w, tol in zip(("values", "da", "dwa"), got, want, TOL[dtype]):
        assert_close(g, w, tol, "self grad " + name)
    with pytest.raises(ValueError, match="col_splits"):
        K.imq_cross_grad(h, a, wa, b, wb, bw, col_splits=0)


# ---------------------------------------------------------------------------------------------------------------
# no host-device synchronisation in the launchers
# ---------------------------------------------------------------------------------------------------------------

_SYNCING = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


class _SyncGuard:
    """Within ``with guard:``, the tensor methods that copy a device value to the host (``_SYNCING``) raise; a
    kernel launch made through :meth:`wrap` runs with them restored (the interpreter copies CPU tensors to numpy
    itself), so only the launcher's own host code is checked. On CUDA, ``torch.cuda.set_sync_debug_mode("error")``
    is on as well."""

    def __init__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in _SYNCING}

    def _raise(self, name):
        def method(*args, **kwargs):
            raise AssertionError(f"host-device synchronisation: Tensor.{name} called by the launcher")

        return method

    def _patch(self, on: bool):
        for name, orig in self.saved.items():
            setattr(torch.Tensor, name, self._raise(name) if on else orig)
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("error" if on else "default")

    def __enter__(self):
        self._patch(True)
        return self

    def __exit__(self, *exc):
        self._patch(False)

    def wrap(self, kernel):
        guard = self

        class Launch:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    guard._patch(False)
                    try:
                        return kernel[grid](*args, **kwargs)
                    finally:
                        guard._patch(True)

                return run

        return Launch()


def test_sync_guard_catches_a_host_read():
    """The guard of the next test is not vacuous: reading a device value in the launcher's code raises."""
    x = torch.ones(2, device=DEVICE)
    for read in (lambda: float(x.sum()), lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x[0] > 0)):
        with pytest.raises(AssertionError, match="synchronisation"):
            with _SyncGuard():
                read()
    assert float(x.sum()) == 2.0  # restored afterwards


def test_launchers_do_not_synchronise(monkeypatch):
    """Values and row passes (self, cross, with and without column splits) read nothing back to the host."""
    a, wa, b, wb, bw, h = make_inputs(37, 21, 5, 3, torch.float32, seed=31)
    guard = _SyncGuard()
    for name in ("_imq_values_kernel", "_imq_rowpass_kernel"):
        monkeypatch.setattr(K, name, guard.wrap(getattr(K, name)))
    with guard:
        out = [
            K.imq_self(a, wa, bw, 1, True, **SMALL),
            K.imq_cross(a, wa, b, wb, bw, **SMALL),
            *K.imq_self_grad(h, a, wa, bw, 1, False, **SMALL),
            *K.imq_cross_grad(h, a, wa, b, wb, bw, col_splits=2, **SMALL),
        ]
    assert_close(out[0], ref_self(a, wa, bw, 1, True), TOL[torch.float32][0], "self")
    assert_close(out[1], ref_terms(a, wa, b, wb, bw), TOL[torch.float32][0], "cross")
    assert all(torch.isfinite(t).all() for t in out)


# ---------------------------------------------------------------------------------------------------------------
# accuracy at any spread, far outliers, one-hot cotangents
# ---------------------------------------------------------------------------------------------------------------


def normwise(got, want):
    return ((got.to(F64) - want.to(F64)).norm() / want.to(F64).norm()).item()


@pytest.mark.parametrize("std,d,n,m", [(3.0, 10, 40, 33), (30.0, 10, 40, 33), (85.7, 30, 28, 67)])
def test_gradients_at_any_spread_float32(std, d, n, m):
    """Biased self terms (the diagonal pair has the largest psi of all) and cross terms of widely spread points:
    float32 gradients within 1e-5 (normwise) of float64, for a mixed and a one-hot cotangent."""
    gen = torch.Generator().manual_seed(int(std * 10) + d)
    a = (torch.randn(n, d, generator=gen) * std).to(DEVICE)
    b = (torch.randn(m, d, generator=gen) * std).to(DEVICE)
    wa, wb = torch.full((n,), 1 / n, device=DEVICE), torch.full((m,), 1 / m, device=DEVICE)
    bw = 2.0 * d * torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0], dtype=F64, device=DEVICE)
    for h in (
        torch.tensor([1.0, -0.5, 2.0, 1.0, 0.7], dtype=F64, device=DEVICE),
        torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0], dtype=F64, device=DEVICE),
    ):
        for unbiased in (False, True):
            got = K.imq_self_grad(h, a, wa, bw, 1, unbiased, **SMALL)
            want = ref_self_grad(h, a, wa, bw, 1, unbiased)
            for name, g, w in zip(("values", "da", "dwa"), got, want):
                err = normwise(g, w)
                assert err <= 1e-5, f"self(unbiased={unbiased}) {name}: {err:.2e} (h = {h.tolist()})"
        got = K.imq_cross_grad(h, a, wa, b, wb, bw, **SMALL)
        want = ref_cross_grad(h, a, wa, b, wb, bw)
        for name, g, w in zip(("values", "da", "dwa", "db", "dwb"), got, want):
            err = normwise(g, w)
            assert err <= 1e-5, f"cross {name}: {err:.2e} (h = {h.tolist()})"


@pytest.mark.parametrize("outlier", [1e6, 1e10, 1e14, 1e30])
# 1e30: the float32 squared distances overflow to inf on purpose; the interpreter's numpy says so.
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
def test_one_far_point_float32(outlier):
    """One point far from all others (its distances up to ~1e29, or infinite in float32 for 1e30): finite values
    and gradients, the other points unaffected (the pairs are evaluated one by one, nothing global is centred)."""
    gen = torch.Generator().manual_seed(17)
    a = torch.randn(40, 5, generator=gen)
    a[0] = outlier
    b = torch.randn(30, 5, generator=gen) + 0.3
    a, b = a.to(DEVICE), b.to(DEVICE)
    wa, wb = torch.full((40,), 1 / 40, device=DEVICE), torch.full((30,), 1 / 30, device=DEVICE)
    bw = 2.0 * 5 * torch.tensor([0.01, 0.2, 1.0, 5.0, 100.0], dtype=F64, device=DEVICE)
    h = torch.tensor([1.0, -0.5, 2.0, 1.0, 0.7], dtype=F64, device=DEVICE)
    for unbiased in (False, True):
        got = K.imq_self_grad(h, a, wa, bw, 1, unbiased, **SMALL)
        want = ref_self_grad(h, a, wa, bw, 1, unbiased)
        for name, g, w in zip(("values", "da", "dwa"), got, want):
            assert torch.isfinite(g).all(), f"self {name}: not finite"
            assert normwise(g, w) <= 1e-6, f"self(unbiased={unbiased}) {name}: {normwise(g, w):.2e}"
        vals = K.imq_self(a, wa, bw, 1, unbiased, **SMALL)
        assert normwise(vals, want[0]) <= 1e-6, f"self values: {normwise(vals, want[0]):.2e}"
    got = K.imq_cross_grad(h, a, wa, b, wb, bw, **SMALL)
    want = ref_cross_grad(h, a, wa, b, wb, bw)
    for name, g, w in zip(("values", "da", "dwa", "db", "dwb"), got, want):
        assert torch.isfinite(g).all(), f"cross {name}: not finite"
        assert normwise(g, w) <= 1e-6, f"cross {name}: {normwise(g, w):.2e}"
    assert normwise(K.imq_cross(a, wa, b, wb, bw, **SMALL), want[0]) <= 1e-6


def test_nan_points_give_nan():
    """A NaN coordinate is not clamped away: the values are NaN, as in the reference."""
    a, wa, b, wb, bw, h = make_inputs(9, 7, 3, 2, torch.float32, seed=41)
    a[2, 1] = float("nan")
    assert torch.isnan(K.imq_cross(a, wa, b, wb, bw)).all()
    assert torch.isnan(K.imq_self_grad(h, a, wa, bw, 1, False)[0]).all()


def _public_api():
    gmwae_fast = pytest.importorskip("gmwae_fast")
    if gmwae_fast.available_backends(DEVICE).get("triton") is not None:
        pytest.skip(f"triton backend unusable: {gmwae_fast.available_backends(DEVICE)['triton']}")
    return gmwae_fast


def _mmd_and_grads(gmwae_fast, x, y, backend, **kw):
    x, y = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    v = gmwae_fast.fast_imq_mmd(x, y, backend=backend, **kw)
    v.backward(torch.zeros_like(v).index_fill_(0, torch.tensor([0], device=v.device), 1.0) if v.dim() else None)
    return v.detach(), x.grad, y.grad


@pytest.mark.parametrize("case", ["spread", "outlier", "one-hot-none"])
def test_issue_cases_through_fast_imq_mmd(case):
    """The reported cases end to end (``backend="triton"`` against ``backend="reference"`` in float64): widely
    spread points with ``unbiased=False``, one point at 1e10, and ``reduction="none"`` with a one-hot cotangent on
    the smallest bandwidth."""
    gmwae_fast = _public_api()
    gen = torch.Generator().manual_seed(0)
    kw = {}
    if case == "spread":
        x, y = torch.randn(28, 30, generator=gen) * 85.7, torch.randn(67, 30, generator=gen) * 85.7
        kw["unbiased"] = False
    elif case == "outlier":
        x, y = torch.randn(40, 5, generator=gen), torch.randn(30, 5, generator=gen) + 0.3
        x[0] = 1e10
    else:
        x, y = torch.randn(40, 10, generator=gen) * 10, torch.randn(30, 10, generator=gen) * 10
        kw["reduction"] = "none"
    x, y = x.to(DEVICE), y.to(DEVICE)
    got = _mmd_and_grads(gmwae_fast, x, y, "triton", **kw)
    want = _mmd_and_grads(gmwae_fast, x.double(), y.double(), "reference", **kw)
    for name, g, w in zip(("value", "dx", "dy"), got, want):
        assert torch.isfinite(g).all(), f"{case} {name}: not finite"
        assert normwise(g, w) <= 1e-5, f"{case} {name}: normwise relative error {normwise(g, w):.2e}"
