"""Tests of ``python -m gmwae_fast.selftest`` and of ``scripts/gpu_check.sh`` (the GPU validation in one command).

The selftest runs here on the CPU backends (``cpu``, ``reference``; ``triton`` under the interpreter on a tiny
case). A deliberately broken backend (monkeypatched: a value off by 1e-4, a gradient off by 1e-3, a weight gradient
that never arrives, a crash, a shifted reparameterisation) must make it fail with a non-zero exit status, so these
tests can fail. Without a GPU, gpu_check.sh must stop at once with a clear message; ``--dry-run`` lists its steps.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import gmwae_fast
from gmwae_fast import selftest as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_CHECK = os.path.join(ROOT, "scripts", "gpu_check.sh")
STEPS = ("build", "selftest", "sanitizer", "bench", "train", "tests")
ONE_MMD = ["mmd/plain/unbiased/fp32"]


def _run(**kw) -> st.SelftestReport:
    kw.setdefault("verbose", False)
    return st.selftest(**kw)


# ---------------------------------------------------------------------------------------------------------------
# the selftest passes on working backends
# ---------------------------------------------------------------------------------------------------------------


def test_cpu_backend_quick_passes_with_plain_progress(capsys):
    report = _run(device="cpu", backend="cpu", quick=True, verbose=True, progress=False)
    assert report.ok, report.table()
    names = {r.check for r in report.results}
    assert {
        "mmd/plain/unbiased/fp32/grad-xy",
        "mmd/grouped/unbiased/fp32/grad-x",
        "mmd/plain/unbiased/bf16/grad-xy",
        "mmd/grouped/biased/fp32/grad-xy",
        "reparam/noise/fp32/softplus",
        "reparam/seed/fp32",
    } <= names
    for r in report.results:
        assert r.status == "pass" and r.device == "cpu" and r.backend == "cpu"
        assert r.error is not None and 0.0 <= r.error <= r.tol
    out, err = capsys.readouterr()
    assert f"[1/{len(report.results)}] cpu/cpu " in err  # plain progress lines off a terminal
    assert "OK: " in out and "max error" in out


def test_reference_backend_passes():
    report = _run(device="cpu", backend="reference", quick=True, checks=["mmd/grouped/unbiased/fp32", "reparam/seed"])
    assert report.ok and len(report.results) == 2, report.table()


def test_triton_interpreter_tiny_case():
    reason = gmwae_fast.available_backends("cpu")["triton"]
    if reason is not None:
        pytest.skip(f"triton unusable on CPU tensors here: {reason}")
    report = _run(device="cpu", backend="triton", quick=True, checks=ONE_MMD + ["reparam/noise/fp32"])
    assert report.ok and len(report.results) == 2, report.table()


def test_full_list_covers_the_issue():
    names = [name for name, _ in st._checks(quick=False)]
    for part in ("plain", "grouped", "unbiased", "biased", "fp32", "bf16", "grad-x", "grad-y", "per-bandwidth"):
        assert any(f"/{part}" in n for n in names if n.startswith("mmd/")), part
    assert {"reparam/seed/fp32", "reparam/noise/fp32/exp", "reparam/noise/bf16/softplus"} <= set(names)
    assert len(names) == len(set(names))
    for sizes in (st._COMPILED, st._INTERPRETED):  # odd sizes: no power of two anywhere
        for v in (sizes.n, sizes.m, sizes.d, sizes.B, sizes.K, sizes.B2, sizes.K2, sizes.dg, *sizes.stat):
            assert v == 1 or v & (v - 1) != 0, sizes


def test_json_output(tmp_path):
    path = tmp_path / "selftest.json"
    report = _run(device="cpu", backend="cpu", quick=True, checks=["reparam/noise/fp32"], json_path=str(path))
    data = json.loads(path.read_text())
    assert data["ok"] is True and report.ok
    assert [r["check"] for r in data["results"]] == ["reparam/noise/fp32/softplus"]
    assert set(data["results"][0]) >= {"device", "backend", "check", "status", "error", "tol", "time_s", "what"}
    assert data["tolerances"]["value"]["fp32"] == 1e-5 and "build_info" in data


def test_nothing_run_is_not_ok_and_unusable_backends_are_listed():
    report = _run(device="cpu", checks=["no-such-check"])
    assert not report.results and not report.ok
    assert "cuda" in report.not_run["cpu/cuda"]


def test_availability_is_per_op_family(monkeypatch):
    """A backend that runs imq_mmd but not gm_reparam gets the MMD checks only, and the reason for the rest."""
    real = st.available_backends

    def fake(device=None, op="imq_mmd"):
        out = real(device, op=op)
        if op == "gm_reparam":
            out["cpu"] = "no gm_reparam kernel in this test"
        return out

    monkeypatch.setattr(st, "available_backends", fake)
    report = _run(device="cpu", backend="cpu", checks=["reparam/noise/fp32", *ONE_MMD])
    assert report.ok
    assert report.results and all(r.backend == "cpu" and r.check.startswith(ONE_MMD[0]) for r in report.results)
    assert report.not_run == {"cpu/cpu/gm_reparam": "no gm_reparam kernel in this test"}


def test_module_is_callable_from_the_package():
    report = gmwae_fast.selftest(device="cpu", backend="cpu", checks=["reparam/noise"], verbose=False)
    assert isinstance(report, st.SelftestReport) and report.ok


# ---------------------------------------------------------------------------------------------------------------
# a broken backend fails, with a non-zero exit status
# ---------------------------------------------------------------------------------------------------------------


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g * 1.001


def _broken_mmd(real, mode):
    def mmd(x, y, x_weights=None, y_weights=None, **kw):
        if kw.get("backend") != "cpu":
            return real(x, y, x_weights, y_weights, **kw)
        if mode == "crash":
            raise RuntimeError("kernel exploded")
        if mode == "grad":
            x = _ScaleGrad.apply(x)
        if mode == "weights" and x_weights is not None:
            x_weights = x_weights.detach()
        out = real(x, y, x_weights, y_weights, **kw)
        return out * (1 + 1e-4) if mode == "value" else out

    return mmd


@pytest.mark.parametrize(
    "mode,what",
    [
        ("value", "value"),
        ("grad", "grad x"),
        ("weights", "no gradient reached x_weights"),
        ("crash", "kernel exploded"),
    ],
)
def test_broken_mmd_backend_fails(monkeypatch, mode, what):
    monkeypatch.setattr(st, "fast_imq_mmd", _broken_mmd(st.fast_imq_mmd, mode))
    report = _run(device="cpu", backend="cpu", quick=True, checks=ONE_MMD)
    assert not report.ok
    (r,) = report.results
    assert r.status == "FAIL" and what in r.what, r
    if mode == "value":  # the same through the command line: exit status 1
        assert st.main(["--device", "cpu", "--backend", "cpu", "--quick", "--check", ONE_MMD[0]]) == 1


def test_broken_reparam_fails(monkeypatch):
    real = st.gm_reparameterize

    def shifted(*a, **kw):
        z, pi = real(*a, **kw)
        return z + 1e-3, pi

    monkeypatch.setattr(st, "gm_reparameterize", shifted)
    report = _run(device="cpu", backend="cpu", quick=True, checks=["reparam/noise/fp32"])
    assert not report.ok and report.results[0].what == "z"


def test_unseeded_noise_fails_the_seed_check(monkeypatch):
    """A backend whose seeded noise is not reproducible (or not regenerated in the backward) must fail."""
    real = st.gm_reparameterize
    calls = iter(range(1, 100))

    def reseeded(*a, seed=None, **kw):
        return real(*a, seed=None if seed is None else seed + next(calls), **kw)

    monkeypatch.setattr(st, "gm_reparameterize", reseeded)
    report = _run(device="cpu", backend="cpu", checks=["reparam/seed"])
    assert not report.ok and report.results[0].what == "same seed, same z (max |dz|)"


def test_bad_statistics_fail():
    eps = torch.randn(233, 7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert all(e <= t for _, e, t in st._noise_stats(eps))
    for bad in (eps + 0.2, eps * 1.2, eps.abs()):
        assert any(e > t for _, e, t in st._noise_stats(bad))


def test_unavailable_requests_fail(monkeypatch):
    if not torch.cuda.is_available():
        report = _run(device="cuda")
        assert not report.ok and "no CUDA device" in report.problems[0]
    monkeypatch.setattr(
        st,
        "available_backends",
        lambda dev, op="imq_mmd": {"reference": None, "triton": "no triton here", "cpu": None, "cuda": "no cuda here"},
    )
    report = _run(device="cpu", backend="triton")
    assert not report.ok and not report.results and "no triton here" in report.problems[0]
    with pytest.raises(ValueError, match="unknown device"):
        _run(device="tpu")


def test_command_line_exit_status(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable,
        "-m",
        "gmwae_fast.selftest",
        "--device",
        "cpu",
        "--backend",
        "cpu",
        "--quick",
        "--check",
        "reparam/noise/fp32",
        "--json",
        str(tmp_path / "r.json"),
    ]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK: 1/1 checks passed" in ok.stdout and (tmp_path / "r.json").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "gmwae_fast.selftest", "--device", "cpu", "--backend", "nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


# ---------------------------------------------------------------------------------------------------------------
# scripts/gpu_check.sh and its sanitizer driver
# ---------------------------------------------------------------------------------------------------------------

needs_bash = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils timeout"
)


@needs_bash
def test_gpu_check_dry_run_lists_the_steps(tmp_path):
    res = subprocess.run(
        ["bash", GPU_CHECK, "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, OUT=str(tmp_path / "out")),
    )
    assert res.returncode == 0, res.stderr
    lines = [ln.split() for ln in res.stdout.splitlines()[1 : 1 + len(STEPS)]]
    assert [ln[0] for ln in lines] == list(STEPS)
    # the plan fits a 600 s remote call with margin: every step's limit plus its 15 s of grace and bookkeeping
    worst = sum(int(ln[2]) + 15 for ln in lines)
    assert worst <= 480 and "total budget 480 s" in res.stdout
    assert f"worst case: limits + 15 s per step = {worst} s; the budget (480 s) fits" in res.stdout
    assert not (tmp_path / "out").exists()


@needs_bash
def test_gpu_check_finds_mnist_in_the_checkout_data_folder(tmp_path):
    """The GPU machine gets the checkout only: the .gz files in data/MNIST/raw (git-ignored) are found."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(GPU_CHECK, root / "scripts" / "gpu_check.sh")
    (root / "data" / "MNIST" / "raw").mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (root / "data" / "MNIST" / "raw" / f"{name}.gz").write_bytes(b"")
    res = subprocess.run(
        ["bash", str(root / "scripts" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "GMWAE_DATA"},
    )
    assert f"MNIST for the train step: {root}/data" in res.stdout
    ignored = subprocess.run(["git", "check-ignore", "-q", "data/MNIST/raw/x.gz"], cwd=ROOT)
    assert ignored.returncode == 0, "data/ must be git-ignored (the MNIST copy must not be committed)"


@needs_bash
def test_gpu_check_rejects_unknown_steps():
    res = subprocess.run(
        ["bash", GPU_CHECK, "--steps", "build,warp", "--dry-run"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2 and "unknown step 'warp'" in res.stderr


@needs_bash
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: gpu_check.sh would run")
def test_gpu_check_without_gpu_stops_at_once(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(
        ["bash", GPU_CHECK],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OUT=str(out), PYTHON=sys.executable),
    )
    assert res.returncode == 2
    assert "no GPU here" in res.stderr and "sees no CUDA device" in res.stderr
    assert not out.exists()  # nothing built, nothing written


def test_sanitizer_driver_calls_every_op_on_cpu():
    """The driver compute-sanitizer runs on the GPU, exercised here on the CPU kernels (float32 only)."""
    if gmwae_fast.available_backends("cpu")["cpu"] is not None:
        pytest.skip("the compiled CPU kernels are not available")
    spec = importlib.util.spec_from_file_location("gpu_sanitize", os.path.join(ROOT, "scripts", "gpu_sanitize.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod._mmd_calls("cpu", "cpu", torch.float32) == 48  # 12 calls for each of the 4 input shapes
    assert mod._reparam_calls("cpu", "cpu", torch.float32) == 16
    if not torch.cuda.is_available():
        assert mod.main([]) == 2  # the default 'cuda' backend cannot run here
