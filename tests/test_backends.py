"""The backend registry (``gmwae_fast/backends.py``): names, ``auto`` order per device, the reason of each backend
per op family, and that both op families resolve through it and record the backend that ran."""

import os

import pytest
import torch

import gmwae_fast
from gmwae_fast import backends, reference

OPS = tuple(backends.OP_FAMILIES)


def _ext_with(monkeypatch, **have):
    """Pretend gmwae_fast._C has exactly the kernels ``have`` (``imq_mmd=("CPU",)``...); families not named: none."""
    monkeypatch.setattr(backends, "_compiled_kernel", lambda op, key: key in have.get(op, ()))


def _no_extension(monkeypatch, why="gmwae_fast._C is not here (test)"):
    monkeypatch.setattr(backends, "extension", lambda: None)
    monkeypatch.setattr(backends, "extension_error", lambda: why)


def _fake_cuda(monkeypatch):
    """A machine with a CUDA device, for the questions the registry asks (no tensor is made)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "_triton_import_error", lambda op: None)


def test_registry_names_are_the_real_backends():
    assert set(backends.REGISTRY) == set(backends.BACKENDS) == {"reference", "triton", "cpu", "cuda"}
    assert backends.backend_choices() == ("auto",) + backends.BACKENDS
    for name in backends.backend_choices():
        assert backends.check_backend_name(name) == name
    with pytest.raises(ValueError, match="unknown backend 'cpp'"):
        backends.check_backend_name("cpp")
    with pytest.raises(TypeError, match="backend must be a string"):
        backends.check_backend_name(None)


@pytest.mark.parametrize(
    "device, order",
    [
        ("cuda", ("cuda", "triton", "reference")),
        ("cuda:1", ("cuda", "triton", "reference")),
        ("cpu", ("cpu", "reference")),
        ("meta", ("reference",)),
    ],
)
def test_auto_order_per_device(device, order):
    assert backends.auto_order(device) == order


def test_auto_takes_the_first_usable_backend_of_the_order(monkeypatch):
    _fake_cuda(monkeypatch)
    _ext_with(monkeypatch, imq_mmd=("CPU", "CUDA"), gm_reparam=("CPU", "CUDA"))
    monkeypatch.setattr(backends, "extension", lambda: object())
    for op in OPS:
        assert backends.resolve_backend("auto", "cuda", op) == "cuda"
        assert backends.resolve_backend("auto", "cpu", op) == "cpu"
    _ext_with(monkeypatch, imq_mmd=("CPU",))  # no CUDA kernels: triton next on a GPU
    assert backends.resolve_backend("auto", "cuda") == "triton"
    monkeypatch.setattr(backends, "_triton_import_error", lambda op: "triton is not importable (test)")
    assert backends.resolve_backend("auto", "cuda") == "reference"


def test_reasons_per_backend_on_cpu(monkeypatch):
    _ext_with(monkeypatch, imq_mmd=("CPU",), gm_reparam=("CPU",))
    monkeypatch.setattr(backends, "extension", lambda: object())
    for op in OPS:
        reasons = backends.available_backends("cpu", op=op)
        assert list(reasons) == list(backends.BACKENDS)
        assert reasons["reference"] is None and reasons["cpu"] is None
        assert reasons["cuda"] == "the 'cuda' backend needs CUDA tensors, got 'cpu' tensors"
    assert "needs CPU tensors" in backends.unavailable_reason("cpu", "cuda")
    assert "does not support device type 'meta'" in backends.unavailable_reason("triton", "meta")
    assert backends.unavailable_reason("reference", "meta") is None


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(backends, "_triton_import_error", lambda op: None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in backends.unavailable_reason("triton", "cpu")
    assert backends.resolve_backend("auto", "cpu") != "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.unavailable_reason("triton", "cpu") is None
    assert backends.resolve_backend("auto", "cpu") != "triton"  # the interpreter is never picked by auto
    monkeypatch.setattr(backends, "_triton_import_error", lambda op: "triton is not importable (test)")
    assert backends.unavailable_reason("triton", "cpu") == "triton is not importable (test)"


@pytest.mark.parametrize("value", ["1", "0", "", "true", "TRUE", "on", "Yes", "y", "2", "off", " 1", "false"])
def test_interpreter_rule_is_tritons(monkeypatch, value):
    getenv_bool = pytest.importorskip("triton._C.libtriton").getenv_bool
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert backends.triton_interpreting() == getenv_bool("TRITON_INTERPRET", False)


def test_extension_missing_disables_compiled_backends_with_its_reason(monkeypatch):
    _no_extension(monkeypatch)
    for op in OPS:
        assert backends.unavailable_reason("cpu", "cpu", op) == "gmwae_fast._C is not here (test)"
        assert backends.resolve_backend("auto", "cpu", op) == "reference"
        with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run on cpu tensors .*not here \(test\)"):
            backends.resolve_backend("cpu", "cpu", op)


def test_extension_older_than_an_op_family(monkeypatch):
    # Built before gm_reparam existed: the MMD runs on the compiled kernels, the reparameterisation does not.
    monkeypatch.setattr(backends, "extension", lambda: object())
    _ext_with(monkeypatch, imq_mmd=("CPU", "CUDA"))
    reason = backends.unavailable_reason("cpu", "cpu", "gm_reparam")
    assert "built before the gm_reparam ops existed" in reason and "rebuild" in reason
    assert backends.unavailable_reason("cpu", "cpu", "imq_mmd") is None
    assert backends.resolve_backend("auto", "cpu", "gm_reparam") == "reference"
    assert backends.resolve_backend("auto", "cpu", "imq_mmd") == "cpu"
    with pytest.raises(RuntimeError, match=r"cannot run on cpu tensors \(gm_reparameterize\): gmwae_fast._C was"):
        backends.resolve_backend("cpu", "cpu", "gm_reparam")
    _fake_cuda(monkeypatch)
    assert backends.resolve_backend("auto", "cuda", "gm_reparam") == "triton"
    assert backends.resolve_backend("auto", "cuda", "imq_mmd") == "cuda"


def test_extension_built_without_cuda_kernels(monkeypatch):
    monkeypatch.setattr(backends, "extension", lambda: object())
    _ext_with(monkeypatch, imq_mmd=("CPU",), gm_reparam=("CPU",))
    _fake_cuda(monkeypatch)
    for op in OPS:
        assert f"built without the CUDA {op} kernels" in backends.unavailable_reason("cuda", "cuda", op)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown op family 'mmd'"):
        backends.resolve_backend("auto", "cpu", "mmd")
    with pytest.raises(ValueError, match="unknown op family"):
        backends.last_backend("nope")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        backends.resolve_backend("gpu", "cpu")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        backends.unavailable_reason("gpu", "cpu")
    with pytest.raises(TypeError, match="backend must be a string"):
        backends.resolve_backend(1, "cpu")


def _reparam_inputs():
    g = torch.Generator().manual_seed(3)
    mu, sr, lg = torch.randn(5, 3, 7, generator=g), torch.randn(5, 3, 7, generator=g), torch.randn(5, 3, generator=g)
    return mu, sr, lg, torch.randn(5, 3, 7, generator=g)


def _calls(monkeypatch):
    calls = []
    real = backends.select_backend

    def spy(requested, device, op):
        name = real(requested, device, op)
        calls.append((requested, str(device), op, name))
        return name

    monkeypatch.setattr(backends, "select_backend", spy)
    return calls


def test_both_op_families_resolve_through_the_registry(monkeypatch):
    calls = _calls(monkeypatch)
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randn(11, 3, dtype=torch.float64)
    gmwae_fast.fast_imq_mmd(x, y, backend="auto")
    assert calls[-1] == ("auto", "cpu", "imq_mmd", backends.resolve_backend("auto", "cpu", "imq_mmd"))
    assert backends.last_backend("imq_mmd") == calls[-1][3]
    mu, sr, lg, noise = _reparam_inputs()
    gmwae_fast.gm_reparameterize(mu, sr, lg, noise=noise)
    assert calls[-1] == ("auto", "cpu", "gm_reparam", backends.resolve_backend("auto", "cpu", "gm_reparam"))
    assert backends.last_backend("gm_reparam") == calls[-1][3]
    gmwae_fast.fast_imq_mmd(x, y, backend="reference")
    assert backends.last_backend("imq_mmd") == "reference"
    assert backends.last_backend("gm_reparam") == calls[-2][3]  # per op family


def test_last_backend_names_the_fallback_that_ran(monkeypatch):
    # An extension without gm_reparam kernels: auto runs the reference sequence and says so (not "cpu").
    if backends.resolve_backend("auto", "cpu", "imq_mmd") != "cpu":
        pytest.skip(f"the 'cpu' backend is unusable here: {backends.unavailable_reason('cpu', 'cpu')}")
    real = backends._compiled_kernel
    monkeypatch.setattr(backends, "_compiled_kernel", lambda op, key: op == "imq_mmd" and real(op, key))
    mu, sr, lg, noise = _reparam_inputs()
    z, pi = gmwae_fast.gm_reparameterize(mu, sr, lg, noise=noise)
    assert backends.last_backend("gm_reparam") == "reference"
    torch.testing.assert_close(z, mu + torch.nn.functional.softplus(sr) * noise)
    torch.testing.assert_close(pi, torch.softmax(lg, -1))
    gmwae_fast.fast_imq_mmd(mu, noise, x_weights=pi)
    assert backends.last_backend("imq_mmd") == "cpu"
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run on cpu tensors \(gm_reparameterize\)"):
        gmwae_fast.gm_reparameterize(mu, sr, lg, noise=noise, backend="cpu")


def test_triton_interpreted_call_is_recorded():
    if backends.unavailable_reason("triton", "cpu") is not None:
        pytest.skip(f"triton cannot run CPU tensors here: {backends.unavailable_reason('triton', 'cpu')}")
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    out = gmwae_fast.fast_imq_mmd(x, y, backend="triton")
    assert backends.last_backend("imq_mmd") == "triton"
    bws = reference.bandwidths_for(3, gmwae_fast.WAE_SCALES)
    torch.testing.assert_close(out, reference.imq_mmd_reference(x, y, bandwidths=bws))


def test_resolution_is_a_constant_under_torch_compile():
    backends._LAST.clear()
    x, y = torch.randn(9, 3), torch.randn(11, 3)

    def f(a, b):
        return gmwae_fast.fast_imq_mmd(a, b, backend="auto")

    want = backends.resolve_backend("auto", "cpu")
    got = torch.compile(f, backend="eager", fullgraph=True)(x, y)
    assert backends.last_backend("imq_mmd") == want
    torch.testing.assert_close(got, f(x, y))


def test_backends_module_does_not_import_the_package_top():
    path = os.path.join(os.path.dirname(backends.__file__), "backends.py")
    with open(path) as fh:
        text = fh.read()
    assert "from . import __version__" not in text and "import gmwae_fast\n" not in text
