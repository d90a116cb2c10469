"""fast_imq_mmd: the bad-input table, backend dispatch, torch.library registration (opcheck) and torch.compile."""

import pytest
import torch
from conftest import skip_unless_usable

import gmwae_fast
from gmwae_fast import backends, fast_imq_mmd

X = torch.randn(8, 3)
Y = torch.randn(9, 3)

BAD_INPUTS = [
    # (description, args, kwargs, exception, message fragment)
    ("x not a tensor", ([[1.0, 2.0]], Y), {}, TypeError, "x must be a torch.Tensor"),
    ("x 1-D", (torch.randn(5), Y), {}, ValueError, "x must have shape"),
    ("y 4-D", (X, torch.randn(2, 2, 2, 3)), {}, ValueError, "y must have shape"),
    ("d mismatch", (X, torch.randn(9, 4)), {}, ValueError, "same feature dimension"),
    ("empty x", (torch.randn(0, 3), Y), {}, ValueError, "x is empty"),
    ("empty d", (torch.randn(4, 0), torch.randn(4, 0)), {}, ValueError, "is empty"),
    ("integer x", (torch.ones(8, 3, dtype=torch.int64), Y), {}, TypeError, "floating-point"),
    ("integer weights", (X, Y, torch.ones(8, dtype=torch.int64)), {}, TypeError, "x_weights must be a floating"),
    ("weights shape", (X, Y, torch.ones(7)), {}, ValueError, "x_weights must have the leading shape"),
    ("grouped weights shape", (torch.randn(4, 2, 3), Y, torch.ones(8)), {}, ValueError, "leading shape"),
    ("y weights not tensor", (X, Y, None, [1.0] * 9), {}, TypeError, "y_weights must be a torch.Tensor"),
    ("meta weights", (X, Y, torch.ones(8, device="meta")), {}, ValueError, "x_weights is on meta"),
    ("mixed devices", (X, torch.randn(9, 3, device="meta")), {}, ValueError, "put both on one device"),
    ("no scales", (X, Y), {"scales": ()}, ValueError, "scales is empty"),
    ("negative scale", (X, Y), {"scales": (1.0, -2.0)}, ValueError, "positive"),
    ("zero sigma2", (X, Y), {"sigma2": 0.0}, ValueError, "sigma2 must be a positive"),
    ("empty bandwidths", (X, Y), {"bandwidths": []}, ValueError, "bandwidths is empty"),
    ("zero bandwidth", (X, Y), {"bandwidths": [1.0, 0.0]}, ValueError, "positive"),
    ("unknown backend", (X, Y), {"backend": "tpu"}, ValueError, "unknown backend"),
    ("backend not str", (X, Y), {"backend": 3}, TypeError, "backend must be a string"),
    ("unknown reduction", (X, Y), {"reduction": "mean"}, ValueError, "unknown reduction"),
    ("one group unbiased", (torch.randn(1, 5, 3), Y), {}, ValueError, "at least 2 groups"),
    ("one point unbiased", (X, torch.randn(1, 3)), {}, ValueError, "at least 2 groups"),
    ("negative weights (validate)", (X, Y, -torch.ones(8)), {"validate": True}, ValueError, "negative"),
    ("zero weights (validate)", (X, Y, torch.zeros(8)), {"validate": True}, ValueError, "all zero"),
    ("inf input (validate)", (X.clone().fill_(float("inf")), Y), {"validate": True}, ValueError, "NaN or Inf"),
    ("nan weights (validate)", (X, Y, torch.full((8,), float("nan"))), {"validate": True}, ValueError, "NaN or Inf"),
    (
        "one-group mass (validate)",
        (torch.randn(3, 2, 3), Y, torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])),
        {"validate": True},
        ValueError,
        "one group",
    ),
]


@pytest.mark.parametrize("desc,args,kwargs,exc,msg", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(desc, args, kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        fast_imq_mmd(*args, **kwargs)


def test_biased_allows_single_group():
    out = fast_imq_mmd(
        torch.randn(1, 4, 3, dtype=torch.float64),
        torch.randn(1, 3, dtype=torch.float64),
        unbiased=False,
        backend="reference",
    )
    assert torch.isfinite(out)


def test_unavailable_backend_raises_with_reason():
    reasons = gmwae_fast.available_backends("cpu")
    assert reasons["reference"] is None
    assert reasons["cuda"] is not None
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu tensors"):
        fast_imq_mmd(X, Y, backend="cuda")


def test_auto_picks_fused_cpu_backend_when_built():
    want = "cpu" if gmwae_fast.available_backends("cpu")["cpu"] is None else "reference"
    assert backends.resolve_backend("auto", "cpu") == want
    if torch.cuda.is_available():
        assert backends.resolve_backend("auto", "cuda") in ("cuda", "triton")


def test_build_info_keys():
    info = gmwae_fast.build_info()
    for key in ("torch", "triton", "cpu_compiled", "cuda_compiled", "cuda_arch_list", "version"):
        assert key in info
    assert isinstance(info["cpu_compiled"], bool) and isinstance(info["cuda_compiled"], bool)


# ----------------------------------------------------------------------------------------------------------------
# torch.library: opcheck on every primitive op and on the fused ops, torch.compile(fullgraph=True).
# ----------------------------------------------------------------------------------------------------------------


def _op_args(device, dtype=torch.float32, n=11, m=6, d=5, group=1, s=4):
    gen = torch.Generator().manual_seed(0)
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    a = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(m, d, generator=gen).to(device=device, dtype=dtype)
    wa = (torch.rand(n, generator=gen) + 0.1).to(device=device, dtype=wdt)
    wb = (torch.rand(m, generator=gen) + 0.1).to(device=device, dtype=wdt)
    bw = torch.tensor([0.3, 1.0, 4.0, 20.0][:s], dtype=torch.float64, device=device)
    h = torch.tensor([1.0, -0.5, 2.0, 0.25][:s], dtype=torch.float64, device=device)
    return a, wa, b, wb, bw, h


OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device_backend, dtype):
    device, backend = device_backend
    if backend == "reference":
        pytest.skip("the reference backend is plain PyTorch, not a custom op")
    from gmwae_fast.ops import imq_mmd as ops

    op = ops.op_set(backend)
    a, wa, b, wb, bw, h = _op_args(device, dtype)
    ga = a.clone().requires_grad_(True)
    gwa = wa.clone().requires_grad_(True)
    gb = b.clone().requires_grad_(True)
    gwb = wb.clone().requires_grad_(True)
    a3 = torch.randn(12, 5, dtype=dtype, device=device)
    w3 = torch.rand(12, dtype=wa.dtype, device=device) + 0.1
    cases = [
        (op.self_values, (ga, gwa, bw, 1, True)),
        (op.self_values, (a3.requires_grad_(True), w3.requires_grad_(True), bw, 3, True)),
        (op.self_values, (ga, gwa, bw, 1, False)),
        (op.cross_values, (ga, gwa, gb, gwb, bw)),
        (op.self_grad, (h, a, wa, bw, 3 if a.shape[0] % 3 == 0 else 1, True)),
        (op.cross_grad, (h, a, wa, b, wb, bw)),
        (op.cross_grad, (h, a, wa, b, wb, bw, False)),
        (ops.imq_self_total, (h, ga, gwa, bw, 1, True, backend)),
        (ops.imq_cross_total, (h, ga, gwa, gb, gwb, bw, backend)),
        (ops.imq_cross_total, (h, ga, gwa, b, wb, bw, backend, False)),
    ]
    for fn, args in cases:
        torch.library.opcheck(fn, args, test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_torch_compile_fullgraph(device_backend, reduction):
    device, backend = device_backend
    if backend == "reference":
        pytest.skip("the reference backend uses activation checkpointing; compile is tested on the fused backends")
    torch._dynamo.reset()
    x = torch.randn(4, 3, 6, device=device, requires_grad=True)
    logits = torch.randn(4, 3, device=device, requires_grad=True)
    y = torch.randn(10, 6, device=device)

    def loss_fn(x, logits, y):
        pi = torch.softmax(logits, -1)
        mmd = fast_imq_mmd(x, y, x_weights=pi, backend=backend, reduction=reduction)
        return (mmd * torch.arange(1, mmd.numel() + 1, device=mmd.device)).sum() + (x**2).mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    eager = loss_fn(x, logits, y)
    gx_e, gl_e = torch.autograd.grad(eager, (x, logits))
    out = compiled(x, logits, y)
    gx_c, gl_c = torch.autograd.grad(out, (x, logits))
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(gx_c, gx_e)
    torch.testing.assert_close(gl_c, gl_e)


def test_torch_compile_inductor_cpu():
    """Full inductor compile on CPU around the fused op (needs the compiled 'cpu' backend)."""
    skip_unless_usable("cpu", "cpu")
    torch._dynamo.reset()
    x = torch.randn(20, 4, requires_grad=True)
    y = torch.randn(15, 4)

    def f(x, y):
        return fast_imq_mmd(torch.tanh(x), y, backend="cpu") * 3.0

    out = torch.compile(f, fullgraph=True)(x, y)
    (g,) = torch.autograd.grad(out, x)
    ref = f(x, y)
    (g_ref,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)
