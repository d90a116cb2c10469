"""Quick checks of the benchmark suite (no timing assertions): every benchmark provider computes the same MMD² and
gradient as the float64 reference on a tiny size, and ``benchmarks/report.py`` turns a pytest-benchmark JSON into
the json / markdown / png report."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

# tests/conftest.py has set TRITON_INTERPRET=1 on a machine without a GPU, so the Triton provider runs (interpreted).
BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
if BENCH_DIR not in sys.path:
    sys.path.append(BENCH_DIR)  # appended: "conftest" must keep resolving to tests/conftest.py

import _harness  # noqa: E402
import _providers  # noqa: E402
import report  # noqa: E402

import gmwae_fast  # noqa: E402
from gmwae_fast import PAPER_SCALES, reference  # noqa: E402

DEVICES = ["cpu", "cuda"]


def _reference_value_and_grad(x, y):
    xd = x.detach().double().requires_grad_(True)
    v = reference.imq_mmd_reference(xd, y.double(), bandwidths=reference.bandwidths_for(x.shape[1], PAPER_SCALES))
    v.backward()
    return float(v.detach()), xd.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", _providers.PROVIDERS)
def test_provider_matches_reference(provider, device):
    dev = torch.device(device)
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    reason = _providers.unavailable_reason(provider, dev, torch.float32, allow_interpreter=True)
    if reason is not None:
        pytest.skip(reason)
    n, d = (24, 10) if provider == "fused_triton" and device == "cpu" else (40, 10)  # interpreter: small
    x, y = _providers.make_inputs(n, d, torch.float32, dev, m=n + 8, seed=3)
    ref, ref_grad = _reference_value_and_grad(x, y)
    assert abs(_providers.reference_value(x, y) - ref) <= 1e-12 * abs(ref)

    # forward + backward: value and gradient (one compile for torch.compile)
    runner = _providers.make_runner(provider, x, y, "fwd+bwd")
    value = float(runner.run())
    rel, tol = _providers.check_value(provider, value, ref, torch.float32)
    assert rel <= tol, f"{provider}: value {value} vs reference {ref} (rel {rel:.2e})"
    grad = runner.grad()
    assert grad is not None and grad.shape == x.shape
    err = (grad.double().cpu() - ref_grad.cpu()).abs().max() / ref_grad.abs().max()
    assert err <= 1e-3, f"{provider}: gradient differs from the reference by {float(err):.2e} (max-norm relative)"

    if provider != "compiled":  # the compiled forward-only graph is a second compilation: not worth the time here
        fwd = _providers.make_runner(provider, x, y, "fwd")
        v2 = fwd.run()
        assert not v2.requires_grad
        rel2, tol2 = _providers.check_value(provider, float(v2), ref, torch.float32)
        assert rel2 <= tol2


def test_triton_is_not_benchmarked_in_the_interpreter():
    reason = _providers.unavailable_reason("fused_triton", torch.device("cpu"), torch.float32)
    assert reason is not None and "interpreter" in reason


def test_footprint_and_budget_helpers():
    assert _providers.footprint_bytes("fused_cpu", 65536, 65536, 15, "fwd+bwd", torch.float32) == 0
    assert _providers.footprint_bytes("keops", 65536, 65536, 15, "fwd+bwd", torch.float32) == 0
    big = _providers.footprint_bytes("vectorised", 65536, 65536, 15, "fwd+bwd", torch.float32)
    assert big >= 65536 * 65536 * 15 * 4
    assert big > _harness.memory_budget(torch.device("cpu"))  # recorded as too large on any machine of today
    assert _harness.mmd_pairs(4, 4) == 6 + 6 + 16
    gpu = {"sm_count": 132, "sm_clock_mhz": 1980.0, "major": 9}
    assert _harness.sfu_bound_s(10**9, 15, gpu) == pytest.approx(15e9 / (16 * 132 * 1980e6))
    assert _harness.plan_rounds(1e-5, 1.0, 5, 200)[1] >= 100  # tiny calls: many iterations per round
    assert _harness.plan_rounds(3.0, 1.0, 3, 200) == (3, 1)


def test_peak_memory_sees_a_large_allocation():
    keep = []
    peak, method = _harness.measure_peak_memory(lambda: keep.append(torch.ones(16 * 2**20 // 4)), torch.device("cpu"))
    assert peak is not None and method
    if method.startswith("cpu peak RSS delta"):
        assert peak >= 12 * 2**20


@pytest.mark.parametrize(
    "name, kind, cores, slug",
    [
        ("NVIDIA H100 80GB HBM3", "cuda", None, "nvidia-h100"),
        ("NVIDIA H200", "cuda", None, "nvidia-h200"),
        ("NVIDIA A100-SXM4-80GB", "cuda", None, "nvidia-a100"),
        ("NVIDIA GeForce RTX 4090", "cuda", None, "nvidia-rtx-4090"),
        ("AMD EPYC", "cpu", 2, "cpu-amd-epyc-2c"),
        ("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "cpu", 8, "cpu-intel-xeon-platinum-8375c-8c"),
        ("AMD EPYC 7B13 64-Core Processor", "cpu", 2, "cpu-amd-epyc-7b13-2c"),
    ],
)
def test_device_slug(name, kind, cores, slug):
    assert _harness.device_slug(name, kind, cores) == slug


# ---------------------------------------------------------------------------------------------------------------
# report.py on a fake pytest-benchmark JSON
# ---------------------------------------------------------------------------------------------------------------


def _bench(name, group, median, extra):
    stats = {
        "min": median * 0.9,
        "max": median * 1.3,
        "mean": median * 1.05,
        "stddev": median * 0.1,
        "rounds": 7,
        "median": median,
        "iqr": median * 0.1,
        "q1": median * 0.95,
        "q3": median * 1.05,
        "iqr_outliers": 0,
        "stddev_outliers": 1,
        "outliers": "1;0",
        "ld15iqr": median * 0.9,
        "hd15iqr": median * 1.3,
        "ops": 1 / median,
        "total": 7 * median,
        "iterations": 1,
    }
    return {
        "group": group,
        "name": name,
        "fullname": f"benchmarks/x.py::{name}",
        "params": None,
        "param": None,
        "extra_info": extra,
        "options": {},
        "stats": stats,
    }


def _fake_json(path):
    benches = []
    times = {"per_bandwidth": 2.0, "vectorised": 1.0, "compiled": 0.2, "keops": 0.5, "fused_cpu": 0.05}
    for n in (1024, 4096):
        for mode in ("fwd", "fwd+bwd"):
            for p, t in times.items():
                grp = f"n={n} d=10 {mode} fp32"
                extra = {
                    "kind": "imq_mmd",
                    "provider": p,
                    "n": n,
                    "m": n,
                    "d": 10,
                    "mode": mode,
                    "dtype": "fp32",
                    "group": grp,
                    "peak_mem_bytes": 1e6 * (n / 1024) ** 2,
                    "warmup_s": 0.5,
                    "pairs_per_s": 1e8,
                    "slug": "cpu-fake-2c",
                    "device_name": "Fake CPU (2 cores)",
                }
                benches.append(_bench(f"test_imq_mmd[{p}-n{n}-d10-{mode}-fp32]", grp, t * (n / 1024) ** 2, extra))
    for p, t in (("fused", 0.1), ("reference", 0.4)):
        benches.append(
            _bench(
                f"test_gmwae_train_step[{p}]",
                "train-step B=100 K=10 d=10",
                t,
                {
                    "kind": "train_step",
                    "provider": p,
                    "B": 100,
                    "K": 10,
                    "d": 10,
                    "m": 1000,
                    "mmd_backend": "cpu" if p == "fused" else "reference",
                    "model": "stand-in",
                    "peak_mem_bytes": 1e7,
                },
            )
        )
    benches.append(_bench("test_gm_reparam[cpu]", "gm_reparam B=100 K=10 d=10", 1e-4, {"backend": "cpu"}))
    skipped = [
        {
            "nodeid": "benchmarks/bench_imq_mmd.py::test_imq_mmd[vectorised-n65536-d10-fwd+bwd-fp32]",
            "status": "too-large",
            "reason": "would materialise ~1.4e+03 GiB",
            "kind": "imq_mmd",
            "provider": "vectorised",
            "n": 65536,
            "m": 65536,
            "d": 10,
            "mode": "fwd+bwd",
            "dtype": "fp32",
        },
        {
            "nodeid": "benchmarks/bench_imq_mmd.py::test_imq_mmd[fused_cuda-n1024-d10-fwd-fp32]",
            "status": "unavailable",
            "reason": "no CUDA",
            "kind": "imq_mmd",
            "provider": "fused_cuda",
            "n": 1024,
            "m": 1024,
            "d": 10,
            "mode": "fwd",
            "dtype": "fp32",
        },
    ]
    benches.append(
        _bench(
            "test_imq_mmd[fused_cpu-n65536-d10-fwd+bwd-fp32]",
            "n=65536 d=10 fwd+bwd fp32",
            20.0,
            {
                "kind": "imq_mmd",
                "provider": "fused_cpu",
                "n": 65536,
                "m": 65536,
                "d": 10,
                "mode": "fwd+bwd",
                "dtype": "fp32",
                "peak_mem_bytes": 5e6,
            },
        )
    )
    raw = {
        "machine_info": {"cpu": {"brand_raw": "Fake CPU", "count": 2}},
        "commit_info": {"id": "abc"},
        "benchmarks": benches,
        "datetime": "2026-01-01T00:00:00",
        "version": "5.2.3",
        "gmwae_fast": {
            "settings": {"sweep": "small"},
            "skipped": skipped,
            "device": {
                "slug": "cpu-fake-2c",
                "device_name": "Fake CPU (2 cores)",
                "device_type": "cpu",
                "build_info": {"version": "0.1.0"},
            },
        },
    }
    with open(path, "w") as f:
        json.dump(raw, f)


def test_report_writes_json_markdown_and_png(tmp_path):
    raw = tmp_path / "raw.json"
    _fake_json(raw)
    out = report.build_report([str(raw)], str(tmp_path / "results"))
    assert sorted(os.path.basename(p) for p in out.values()) == [
        "cpu-fake-2c.json",
        "cpu-fake-2c.md",
        "cpu-fake-2c.png",
    ]
    with open(out["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(open(out["json"]).read())
    assert summary["slug"] == "cpu-fake-2c"
    sp = {(r["n"], r["mode"]): r for r in summary["speedups"]}
    assert sp[(4096, "fwd+bwd")]["fused"] == "fused_cpu"
    assert sp[(4096, "fwd+bwd")]["vs_compiled"] == pytest.approx(4.0)
    assert sp[(4096, "fwd+bwd")]["vs_per_bandwidth"] == pytest.approx(40.0)
    targets = {t["target"]: t for t in summary["targets"]}
    assert targets[">= 2x torch.compile at n=4096 d=10 fwd+bwd"]["status"] == "met"
    assert targets[">= 50x per-bandwidth at n=2048 (d=10 fwd+bwd)"]["status"] == "not measured"
    md = open(out["md"]).read()
    for text in (
        "## Key configurations",
        "## Targets",
        "| n=4096 d=10 fwd+bwd fp32 |",
        "too large",
        "GM-WAE training step",
        "4x",
        "Other benchmarks",
        "test_gm_reparam[cpu]",
        "cpu-fake-2c.png",
    ):
        assert text in md, text
    assert report.main([str(raw), "--out", str(tmp_path / "r2"), "--slug", "mine"]) == 0
    assert (tmp_path / "r2" / "mine.md").exists()


def test_every_target_is_a_key_config_that_the_gpu_check_measures():
    """A target on a configuration nobody benchmarks would only ever read "not run"."""
    import re

    for device, targets in report.TARGETS.items():
        for desc, cfg, *_ in targets:
            assert cfg in report.KEY_CONFIGS[device], (device, desc)
    here = os.path.dirname(os.path.abspath(__file__))
    script = open(os.path.join(here, "..", "scripts", "gpu_check.sh")).read()
    ns = [int(v) for v in re.search(r"--bench-n ([0-9,]+)", script).group(1).split(",")]
    ds = [int(v) for v in re.search(r"--bench-d ([0-9,]+)", script).group(1).split(",")]
    excluded = re.findall(r"not (n\d+-d\d+)", script)
    for desc, (n, d, mode, dtype), *_ in report.TARGETS["cuda"]:
        assert n in ns and d in ds and f"n{n}-d{d}" not in excluded and mode == "fwd+bwd", desc


def test_small_batch_benchmark_providers_agree_and_the_script_prints_its_table():
    """``benchmarks/bench_small_batch.py``: both providers compute the same 7-scale WAE penalty and gradient as the
    float64 reference, and the script mode prints one table row per case (no timing asserted)."""
    import subprocess

    import bench_small_batch as sb

    if gmwae_fast.available_backends("cpu")["cpu"] is not None:
        pytest.skip("the fused CPU backend is not built")
    z, prior = sb.inputs(37, 9)
    zd = z.double().requires_grad_(True)
    r = reference.imq_mmd_reference(zd, prior.double(), bandwidths=reference.bandwidths_for(9, gmwae_fast.WAE_SCALES))
    (gr,) = torch.autograd.grad(r, zd)
    for provider in sb.PROVIDERS:
        zz = z.clone().requires_grad_(True)
        v = sb.provider_fn(provider)(zz, prior)
        (g,) = torch.autograd.grad(v, zz)
        assert abs(v.item() - r.item()) <= 1e-4, provider
        assert float((g.double() - gr).abs().max()) <= 1e-4 * float(gr.abs().max()), provider
    out = subprocess.run(
        [sys.executable, os.path.join(BENCH_DIR, "bench_small_batch.py"), "--n", "16", "--d", "8", "--rounds", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| 16 | 8 |")]
    assert len(rows) == 1 and rows[0].rstrip().endswith("x |"), out
