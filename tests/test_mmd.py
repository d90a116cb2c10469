"""fast_imq_mmd on every backend against an independent float64 brute force: values and gradients (weights too)."""

import math

import pytest
import torch
from conftest import interpreted

import gmwae_fast
from gmwae_fast import PAPER_SCALES, WAE_SCALES, fast_imq_mmd, reference

# ----------------------------------------------------------------------------------------------------------------
# Independent float64 brute force: dense (n, m, S) tensors, explicit masks, no chunking, no shared code.
# ----------------------------------------------------------------------------------------------------------------


def brute_mmd(x, y, xw=None, yw=None, *, bandwidths, unbiased=True, reduction="sum"):
    def flat(t, w):
        g = 1 if t.dim() == 2 else t.shape[1]
        p = t.reshape(-1, t.shape[-1]).double()
        w = torch.ones(p.shape[0], dtype=torch.float64) if w is None else w.reshape(-1).double()
        return p, w / w.sum(), g

    a, wa, ga = flat(x, xw)
    b, wb, gb = flat(y, yw)
    c = torch.tensor(bandwidths, dtype=torch.float64)

    def kern(p, q):  # (n, m, S)
        d2 = ((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)
        return c / (c + d2[..., None])

    def self_term(p, w, g):
        k = kern(p, p) * (w[:, None] * w[None, :])[..., None]
        if unbiased:
            gid = torch.arange(p.shape[0]) // g
            k = k * (gid[:, None] != gid[None, :]).double()[..., None]
            return k.sum((0, 1)) / (1 - (w.view(-1, g).sum(1) ** 2).sum())
        return k.sum((0, 1))

    cross = (kern(a, b) * (wa[:, None] * wb[None, :])[..., None]).sum((0, 1))
    out = self_term(a, wa, ga) + self_term(b, wb, gb) - 2 * cross
    return out.sum() if reduction == "sum" else out


def bws(d, scales=PAPER_SCALES, sigma2=1.0):
    return [2.0 * d * sigma2 * s for s in scales]


TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 1e-4), torch.bfloat16: (2e-2, 5e-2)}


def _inputs(shape_x, shape_y, dtype, device, weighted, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape_x, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    y = (torch.randn(*shape_y, generator=g, dtype=torch.float64) * 0.7 + 0.3).to(dtype)
    xw = yw = None
    if weighted:
        xw = torch.rand(shape_x[:-1], generator=g, dtype=torch.float64) + 0.1
        yw = torch.rand(shape_y[:-1], generator=g, dtype=torch.float64) + 0.1
    x, y = x.to(device), y.to(device)
    xw = xw.to(device) if xw is not None else None
    yw = yw.to(device) if yw is not None else None
    return x, y, xw, yw


def _check_against_brute(
    device,
    backend,
    shape_x,
    shape_y,
    dtype,
    *,
    weighted,
    unbiased,
    reduction,
    scales=PAPER_SCALES,
    seed=0,
    grad_sides="xy",
):
    x, y, xw, yw = _inputs(shape_x, shape_y, dtype, device, weighted, seed)
    wants = [s in grad_sides for s in "xyxy"]  # x, y, x_weights, y_weights
    leaves = [t.clone().requires_grad_(w) if t is not None else None for t, w in zip((x, y, xw, yw), wants)]
    out = fast_imq_mmd(*leaves, scales=scales, unbiased=unbiased, reduction=reduction, backend=backend)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    d = shape_x[-1]
    # cotangent != 1
    gen = torch.Generator().manual_seed(seed + 1)
    cot = torch.rand(out.shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    (out.double() * cot.to(device)).sum().backward()

    ref_leaves = [t.detach().cpu().double().requires_grad_(True) if t is not None else None for t in (x, y, xw, yw)]
    ref = brute_mmd(*ref_leaves, bandwidths=bws(d, scales), unbiased=unbiased, reduction=reduction)
    (ref * cot).sum().backward()

    atol, rtol = TOL[dtype]
    scale = ref.detach().abs().max().item() + 1e-3
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), atol=atol * scale * 10, rtol=rtol)
    for name, got, want in zip(("x", "y", "x_weights", "y_weights"), leaves, ref_leaves):
        if got is None:
            continue
        if not got.requires_grad:
            assert got.grad is None, f"{name} needs no gradient but got one"
            continue
        gscale = want.grad.abs().max().item() + 1e-12
        torch.testing.assert_close(
            got.grad.detach().cpu().double(),
            want.grad,
            atol=atol * gscale * 10,
            rtol=rtol,
            msg=lambda m: f"gradient of {name}: {m}",
        )


CASES = [
    # shape_x, shape_y, weighted, unbiased
    ((7, 1), (5, 1), False, True),
    ((13, 2), (9, 2), True, True),
    ((6, 3, 3), (11, 3), True, True),  # grouped x, plain y
    ((37, 10), (29, 10), True, False),  # biased, weighted
    ((5, 4, 17), (3, 5, 17), True, True),  # both grouped, odd d
    ((70, 64), (67, 64), False, True),  # crosses 64-row tiles
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-w{int(c[2])}-u{int(c[3])}")
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_values_and_grads_float32(device_backend, case, reduction):
    device, backend = device_backend
    shape_x, shape_y, weighted, unbiased = case
    _check_against_brute(
        device, backend, shape_x, shape_y, torch.float32, weighted=weighted, unbiased=unbiased, reduction=reduction
    )


@pytest.mark.parametrize("grad_sides", ["x", "y"])
@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=lambda c: f"{c[0]}x{c[1]}-w{int(c[2])}-u{int(c[3])}")
def test_grads_of_one_side_only(device_backend, case, grad_sides):
    """Only x (the WAE case: y = prior samples) or only y needs a gradient: the fused path then skips the other
    side's gradient work (values-only self term, cross pass without the column side)."""
    device, backend = device_backend
    shape_x, shape_y, weighted, unbiased = case
    _check_against_brute(
        device,
        backend,
        shape_x,
        shape_y,
        torch.float32,
        weighted=weighted,
        unbiased=unbiased,
        reduction="sum",
        grad_sides=grad_sides,
    )


@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: f"{c[0]}x{c[1]}-w{int(c[2])}-u{int(c[3])}")
def test_values_and_grads_float64(device_backend, case):
    device, backend = device_backend
    shape_x, shape_y, weighted, unbiased = case
    _check_against_brute(
        device, backend, shape_x, shape_y, torch.float64, weighted=weighted, unbiased=unbiased, reduction="sum"
    )


@pytest.mark.parametrize("unbiased", [True, False])
def test_values_and_grads_bfloat16(device_backend, unbiased):
    device, backend = device_backend
    if backend == "reference":
        pytest.skip("the reference computes in float64 whatever the input dtype; covered by the float32 cases")
    _check_against_brute(
        device, backend, (3, 10, 10), (31, 10), torch.bfloat16, weighted=True, unbiased=unbiased, reduction="sum"
    )


def test_gradcheck_float64(device_backend):
    device, backend = device_backend
    x, y, xw, yw = _inputs((4, 2, 3), (5, 3), torch.float64, device, weighted=True, seed=3)
    args = [t.requires_grad_(True) for t in (x, y, xw, yw)]

    def f(*a):
        return fast_imq_mmd(*a, scales=(0.1, 1.0, 10.0), backend=backend, reduction="none")

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)

    def g(*a):
        return fast_imq_mmd(*a, scales=(0.1, 1.0, 10.0), backend=backend, unbiased=False)

    assert torch.autograd.gradcheck(g, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_fp32_accuracy_same_law(device_backend):
    """MMD² is a small difference of large sums: float32 inputs must still give 1e-5 relative error."""
    device, backend = device_backend
    n = 256 if interpreted(device, backend) else 2048
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(n, 10, generator=gen)
    y = torch.randn(n, 10, generator=gen)
    exact = brute_mmd_chunked(x.double(), y.double(), bws(10))
    got = fast_imq_mmd(x.to(device), y.to(device), scales=PAPER_SCALES, backend=backend).item()
    assert abs(exact) < 1e-2 * 15  # the two samples are of one law: MMD² is tiny against the sums
    assert abs(got - exact) <= 1e-5 * abs(exact), (got, exact)


def brute_mmd_chunked(x, y, c):
    """Unbiased uniform MMD² in float64 with exact differences, chunked over rows (for n = 2048)."""
    c = torch.tensor(c, dtype=torch.float64)

    def ksum(p, q, drop_diag):
        tot = torch.zeros((), dtype=torch.float64)
        for i in range(0, p.shape[0], 256):
            d2 = ((p[i : i + 256, None, :] - q[None]) ** 2).sum(-1)
            tot = tot + (c / (c + d2[..., None])).sum()
        return tot - (p.shape[0] * c.numel() if drop_diag else 0)

    n, m = x.shape[0], y.shape[0]
    return (
        ksum(x, x, True) / (n * (n - 1)) + ksum(y, y, True) / (m * (m - 1)) - 2 * ksum(x, y, False) / (n * m)
    ).item()


# ----------------------------------------------------------------------------------------------------------------
# Drop-in: the classic WAE penalty.
# ----------------------------------------------------------------------------------------------------------------


def client_imq_penalty(z, z_prior, h_dim):
    """A WAE client's penalty as popular PyTorch WAE code writes it (sum over scales, scaled by the batch size)."""
    batch = z.size(0)
    nx = z.pow(2).sum(1, keepdim=True)
    ny = z_prior.pow(2).sum(1, keepdim=True)
    dxx = nx + nx.t() - 2 * z @ z.t()
    dyy = ny + ny.t() - 2 * z_prior @ z_prior.t()
    dxy = nx + ny.t() - 2 * z @ z_prior.t()
    total = 0
    for scale in [0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]:
        c = 2 * h_dim * 1.0 * scale
        same = (c / (c + dxx) + c / (c + dyy)) * (1 - torch.eye(batch, dtype=z.dtype))
        total = total + same.sum() / (batch - 1) - (c / (c + dxy)).sum() * 2.0 / batch
    return total / batch


def test_drop_in_replaces_client_penalty(device_backend):
    device, backend = device_backend
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(48, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    prior = torch.randn(48, 8, generator=gen, dtype=torch.float64)
    before = client_imq_penalty(z, prior, h_dim=8)
    (g_before,) = torch.autograd.grad(before, z)
    zz = z.detach().to(device).requires_grad_(True)
    after = fast_imq_mmd(zz, prior.to(device), scales=WAE_SCALES, backend=backend)
    (g_after,) = torch.autograd.grad(after, zz)
    torch.testing.assert_close(after.cpu(), before.detach(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(g_after.cpu(), g_before, atol=1e-9, rtol=1e-8)


def test_matches_materialised_formulas():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(33, 6, generator=gen, dtype=torch.float64)
    want = brute_mmd(x, y, bandwidths=bws(6))
    torch.testing.assert_close(reference.mmd_per_bandwidth(x, y, PAPER_SCALES), want)
    torch.testing.assert_close(reference.mmd_vectorised(x, y, torch.tensor(bws(6), dtype=torch.float64)), want)
    torch.testing.assert_close(fast_imq_mmd(x, y, scales=PAPER_SCALES, backend="reference"), want)


def test_reference_chunks_and_grads_match_brute():
    x, y, xw, yw = _inputs((9, 4, 5), (23, 5), torch.float64, "cpu", weighted=True, seed=2)
    leaves = [t.clone().requires_grad_(True) for t in (x, y, xw, yw)]
    out = reference.imq_mmd_reference(*leaves, bandwidths=bws(5), chunk=7)  # 36 rows: several ragged chunks
    out.backward()
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, y, xw, yw)]
    want = brute_mmd(*ref_leaves, bandwidths=bws(5))
    want.backward()
    torch.testing.assert_close(out, want)
    for got, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, ref.grad)


def test_bandwidths_override_scales():
    x, y, _, _ = _inputs((10, 3), (12, 3), torch.float64, "cpu", weighted=False)
    a = fast_imq_mmd(x, y, scales=(0.5, 2.0), sigma2=3.0, backend="reference")
    b = fast_imq_mmd(x, y, bandwidths=[2 * 3 * 3.0 * 0.5, 2 * 3 * 3.0 * 2.0], scales=(9.0,), backend="reference")
    torch.testing.assert_close(a, b)


def test_paper_scales():
    assert len(PAPER_SCALES) == 15
    assert sorted(PAPER_SCALES) == list(PAPER_SCALES)
    want = sorted(m * 10.0**j for j in range(-2, 3) for m in (1, 2, 5))
    assert all(math.isclose(a, b) for a, b in zip(PAPER_SCALES, want))
    assert WAE_SCALES == (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def test_module_matches_functional(device_backend):
    device, backend = device_backend
    x, y, xw, yw = _inputs((6, 3, 4), (10, 4), torch.float32, device, weighted=True)
    loss = gmwae_fast.IMQMMDLoss(scales=WAE_SCALES, reduction="none", backend=backend)
    torch.testing.assert_close(
        loss(x, y, xw, yw), fast_imq_mmd(x, y, xw, yw, scales=WAE_SCALES, reduction="none", backend=backend)
    )
    assert "reduction='none'" in repr(loss)


def test_no_grad_path_equals_grad_path(device_backend):
    """The fused value+gradient pass (reduction='sum' with grad) and the value-only pass agree."""
    device, backend = device_backend
    x, y, xw, yw = _inputs((5, 3, 6), (17, 6), torch.float32, device, weighted=True)
    with torch.no_grad():
        v0 = fast_imq_mmd(x, y, xw, yw, backend=backend)
    v1 = fast_imq_mmd(x.requires_grad_(True), y, xw, yw, backend=backend)
    torch.testing.assert_close(v0, v1.detach(), atol=1e-6, rtol=1e-5)


def test_nan_propagates_without_validate(device_backend):
    device, backend = device_backend
    x, y, _, _ = _inputs((6, 3), (7, 3), torch.float32, device, weighted=False)
    x[2, 1] = float("nan")
    assert torch.isnan(fast_imq_mmd(x, y, backend=backend))
    with pytest.raises(ValueError, match="NaN"):
        fast_imq_mmd(x, y, backend=backend, validate=True)
