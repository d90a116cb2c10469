"""The first-use guard of GPU routes (gmwae_fast/guard.py), tested on the CPU by fault injection: the guarded set
is widened to CPU routes and a route is made wrong (a patched op set or Triton launcher) or made to raise."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import skip_unless_usable

import gmwae_fast
from gmwae_fast import backends, guard
from gmwae_fast.ops import imq_mmd as imq_ops


@pytest.fixture(autouse=True)
def _fresh_guard(monkeypatch):
    guard.reset()
    monkeypatch.delenv(guard.ENV, raising=False)
    yield
    guard.reset()


def _guard_on_cpu(monkeypatch, *routes):
    monkeypatch.setattr(guard, "GUARDED", {r: ("cpu",) for r in routes})


def _faulty_cpu_op_set(monkeypatch, factor=1.01):
    real = imq_ops.op_set

    def bad(backend):
        ops = real(backend)
        if backend != "cpu":
            return ops
        return ops._replace(cross_values=lambda *a: ops.cross_values(*a) * factor)

    monkeypatch.setattr(imq_ops, "op_set", bad)


def _case():
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, 6, generator=g), torch.randn(30, 6, generator=g)


def test_gpu_routes_only_are_guarded_by_default():
    skip_unless_usable("cpu", "cpu")
    x, y = _case()
    gmwae_fast.fast_imq_mmd(x, y)
    assert set(guard.GUARDED) == {
        ("cuda", "imq_mmd"),
        ("triton", "imq_mmd"),
        ("cuda", "gm_reparam"),
        ("triton", "gm_reparam"),
    }
    assert all(devs == ("cuda",) for devs in guard.GUARDED.values())
    assert guard.report() == {}


def test_a_passing_route_is_checked_once_and_kept(monkeypatch):
    skip_unless_usable("cpu", "cpu")
    _guard_on_cpu(monkeypatch, ("cpu", "imq_mmd"))
    calls = []
    real = guard._CHECKS["imq_mmd"]
    monkeypatch.setitem(guard._CHECKS, "imq_mmd", lambda *a: calls.append(a) or real(*a))
    x, y = _case()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            gmwae_fast.fast_imq_mmd(x, y)
    assert len(calls) == 1
    assert backends.last_backend("imq_mmd") == "cpu"
    assert guard.report() == {"cpu:imq_mmd@cpu": None}
    assert gmwae_fast.build_info()["guard"] == {"cpu:imq_mmd@cpu": None}


def test_a_wrong_route_is_disabled_with_one_warning_and_auto_falls_back(monkeypatch):
    skip_unless_usable("cpu", "cpu")
    _guard_on_cpu(monkeypatch, ("cpu", "imq_mmd"))
    _faulty_cpu_op_set(monkeypatch)
    x, y = _case()
    with pytest.warns(RuntimeWarning, match=r"the cpu imq_mmd route failed its first-use check on cpu \(values"):
        v = gmwae_fast.fast_imq_mmd(x, y)
    assert backends.last_backend("imq_mmd") == "reference"
    ref = gmwae_fast.fast_imq_mmd(x.double(), y.double(), backend="reference")
    assert v.item() == pytest.approx(ref.item(), rel=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning: later calls fall back silently
        gmwae_fast.fast_imq_mmd(x, y)
    reason = gmwae_fast.available_backends("cpu")["cpu"]
    assert "failed its first-use check" in reason and "relative to the float64 reference" in reason
    assert "off by" in gmwae_fast.build_info()["guard"]["cpu:imq_mmd@cpu"]
    with pytest.raises(RuntimeError, match="first-use check"):
        gmwae_fast.fast_imq_mmd(x, y, backend="cpu")


def test_a_route_that_raises_is_disabled_with_the_exception(monkeypatch):
    skip_unless_usable("cpu", "cpu")
    _guard_on_cpu(monkeypatch, ("cpu", "imq_mmd"))
    real = imq_ops.op_set

    def boom(backend):
        if backend == "cpu":
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        return real(backend)

    monkeypatch.setattr(imq_ops, "op_set", boom)
    x, y = _case()
    with pytest.warns(RuntimeWarning, match="illegal memory access"):
        gmwae_fast.fast_imq_mmd(x.requires_grad_(True), y)
    assert backends.last_backend("imq_mmd") == "reference"


def test_the_environment_variable_turns_the_guard_off(monkeypatch):
    skip_unless_usable("cpu", "cpu")
    _guard_on_cpu(monkeypatch, ("cpu", "imq_mmd"))
    _faulty_cpu_op_set(monkeypatch, factor=2.0)
    monkeypatch.setenv(guard.ENV, "0")
    x, y = _case()
    gmwae_fast.fast_imq_mmd(x, y)
    assert backends.last_backend("imq_mmd") == "cpu" and guard.report() == {}


def test_a_wrong_triton_launcher_is_caught(monkeypatch):
    skip_unless_usable("cpu", "triton")
    _guard_on_cpu(monkeypatch, ("triton", "imq_mmd"))
    from gmwae_fast import _kernel_modules

    kernels = _kernel_modules.load("imq_mmd")
    real = kernels.imq_cross_grad

    def bad(h, a, wa, b, wb, bw, b_grad=True):
        vals, da, dwa, db, dwb = real(h, a, wa, b, wb, bw, b_grad)
        return vals, da, dwa * 0.0, db, dwb  # a silent zero weight gradient

    monkeypatch.setattr(kernels, "imq_cross_grad", bad)
    x, y = _case()
    with pytest.warns(RuntimeWarning, match=r"the triton imq_mmd route failed .* \(d/dw"):
        with pytest.raises(RuntimeError, match=r"backend 'triton' cannot run .* first-use check on this device \(d/dw"):
            gmwae_fast.fast_imq_mmd(x[:5], y[:4], backend="triton")


def test_a_wrong_reparam_route_is_caught(monkeypatch):
    skip_unless_usable("cpu", "cpu", op="gm_reparam")
    monkeypatch.setattr(guard, "GUARDED", {("cpu", "gm_reparam"): ("cpu",)})
    from gmwae_fast.ops import gm_reparam as rep_ops

    real = rep_ops.op_set

    def bad(backend):
        ops = real(backend)
        if backend != "cpu":
            return ops
        return ops._replace(forward=lambda *a: tuple(t * 1.001 for t in ops.forward(*a)))

    monkeypatch.setattr(rep_ops, "op_set", bad)
    mu = torch.randn(4, 3, 2)
    with pytest.warns(RuntimeWarning, match=r"the cpu gm_reparam route failed .* \(z off by"):
        gmwae_fast.gm_reparameterize(mu, mu, mu[..., 0])
    assert backends.last_backend("gm_reparam") == "reference"


def test_only_the_tensor_core_route_is_turned_off_when_only_it_fails(monkeypatch):
    monkeypatch.delenv(guard._TC_ENV, raising=False)
    seen = []

    def case(backend, dev, d=10):
        seen.append((d, guard.os.environ.get(guard._TC_ENV)))
        return "values (d = 40) off by 0.5 relative" if guard.os.environ.get(guard._TC_ENV) != "0" else None

    monkeypatch.setattr(guard, "_imq_case", case)
    with pytest.warns(RuntimeWarning, match="tensor-core route failed .* the CUDA-core route passed"):
        guard._tensor_core_check(torch.device("cpu"))
    assert seen == [(40, None), (40, "0")]
    assert guard.os.environ[guard._TC_ENV] == "0"
    monkeypatch.delenv(guard._TC_ENV)
    assert guard.report() == {"cuda:imq_mmd:tensor_cores@cpu": "values (d = 40) off by 0.5 relative"}


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "func.grad"])
def test_a_first_call_in_any_autograd_mode_does_not_fail_the_check(monkeypatch, mode):
    # the check differentiates its own small case: a caller's no_grad / inference_mode must not make it fail (and
    # disable a good route); inside torch.func transforms it waits for a later call
    skip_unless_usable("cpu", "cpu")
    _guard_on_cpu(monkeypatch, ("cpu", "imq_mmd"))
    x, y = _case()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if mode == "no_grad":
            with torch.no_grad():
                gmwae_fast.fast_imq_mmd(x, y)
        elif mode == "inference_mode":
            with torch.inference_mode():
                gmwae_fast.fast_imq_mmd(x, y)
        else:  # inside a transform the check is deferred (nothing recorded), then runs at the next plain call
            torch.func.grad(lambda a: (guard.check("cpu", "imq_mmd", "cpu"), a.sum())[1])(x)
            assert guard.report() == {}
            gmwae_fast.fast_imq_mmd(x, y)
    assert guard.report() == {"cpu:imq_mmd@cpu": None}
    assert backends.last_backend("imq_mmd") == "cpu"
