"""The CUDA kernels' tiling plan (host code of csrc/imq_mmd_cuda_kernels.cuh), checked on the CPU.

csrc/testing/imq_plan_dump.cpp prints the plan (panels, blocks, waves, slot workspace) for given (self, grad, N, M,
d, element size); it needs only a C++20 compiler.  The plan takes no device property (so the results are the same
bits on every GPU: tests/test_cpu_kernels.py::test_cuda_kernels_emulated checks that under the SIMT emulator);
here it must keep every SM of any GPU busy (each launch holds at least SMs x resident blocks, whenever there are
that many tile pairs) with the gradient slots of one launch within the 512 MiB budget, at any N and d.
"""

import json
import os
import subprocess

import pytest
from conftest import build_csrc_testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET = 512 * 1024 * 1024
# SM counts: A100, H100 PCIe, H100 SXM / H200, a 1g MIG slice, and a larger future part.
SMS = [16, 108, 114, 132, 170, 256]


@pytest.fixture(scope="module")
def plan_exe(tmp_path_factory):
    return build_csrc_testing("imq_plan_dump", tmp_path_factory.mktemp("plan"))


def plans(exe, cases):
    """cases: (self, grad, N, M, d, elem[, budget]) -> one dict per case."""
    text = "".join(" ".join(str(v) for v in c) + "\n" for c in cases)
    run = subprocess.run([exe], input=text, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(out) == len(cases)
    return out


GRID = [
    (self, grad, n, m, d, elem)
    for self in (1, 0)
    for grad in (1, 0)
    for elem in (4, 8)
    for n, m in ((1000, 700), (4096, 4096), (65536, 100), (65536, 65536), (1 << 20, 1 << 20))
    for d in (1, 10, 64, 512)
]


def test_plan_keeps_every_sm_busy_within_the_budget(plan_exe):
    for case, p in zip(GRID, plans(plan_exe, GRID)):
        self, grad, n, m, d, elem = case
        tag = f"{case}: {p}"
        assert p["contiguous"] and p["panels_ok"], tag
        assert p["blocks"] == (p["PI"] * (p["PI"] + 1) // 2 if self else p["PI"] * p["PJ"]), tag
        assert p["PI"] * p["PSI"] >= p["TI"] and (p["PI"] - 1) * p["PSI"] < p["TI"], tag
        if grad:
            assert p["slot_bytes"] <= BUDGET, tag
        else:
            assert p["waves"] == 1 and p["slot_bytes"] == 0, tag
        occupancy = 2 if elem == 4 else 1  # __launch_bounds__(256, 2) in float32, 1 in float64
        for sms in SMS:
            need = min(sms * occupancy, p["tile_pairs"])
            assert p["min_wave"] >= need and p["last_wave"] >= need, (sms, tag)


def test_review_cases(plan_exe):
    """The plans a review found collapsed (N = 65536, d = 64: 120 blocks; N = 2^20, d = 10: 15 blocks; N = 65536,
    d = 512: one block, with the 512 MiB cap no longer enforced) now give >= 512 blocks a launch within budget."""
    cases = [
        (1, 1, 65536, 0, 64, 4),
        (1, 1, 1 << 20, 0, 10, 4),
        (1, 1, 65536, 0, 512, 4),
        (0, 1, 65536, 65536, 512, 4),
        (1, 1, 65536, 0, 512, 8),
    ]
    for case, p in zip(cases, plans(plan_exe, cases)):
        assert min(p["min_wave"], p["last_wave"]) >= 500, (case, p)
        assert p["slot_bytes"] <= BUDGET, (case, p)


def test_plan_independent_of_b_grad_and_forced_waves(plan_exe):
    """A tiny budget forces many waves (as the SIMT-emulator cases do); they still cover every block once and each
    fold visits about as many rows as its blocks hold."""
    cases = [
        (1, 1, 300, 0, 10, 4, 2e4),
        (0, 1, 150, 260, 3, 4, 5e3),
        (1, 1, 195, 0, 40, 8, 1e5),
        (1, 1, 20000, 0, 64, 4, 2e7),
        (0, 1, 3000, 50000, 17, 4, 1e7),
    ]
    for case, p in zip(cases, plans(plan_exe, cases)):
        assert p["waves"] > 1 and p["contiguous"] and p["panels_ok"], (case, p)
        assert p["slot_bytes"] <= case[-1], (case, p)
        assert p["max_fold_ratio"] <= 2.0, (case, p)


# ---------------------------------------------------------------------------------------------------------------
# the tile kernel's bare reciprocal (rcp.approx, no Newton step) under the SIMT emulator
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", ["up", "down"])
def test_emulated_kernels_hold_the_contract_with_a_biased_reciprocal(tmp_path, bias):
    """csrc/testing/imq_cuda_emu_test.cpp, its `approx` cases (several panels, 2 chunks, far outliers, weight
    0.999 on one point, bandwidths 1e-8 .. 1e5: one scale per bandwidth), with every float reciprocal of the tile
    kernel moved one ulp up or down from the correctly rounded one (worse than the device's documented 1 ulp, and
    all of one sign): values within 2e-6 per bandwidth, gradients within 2e-5 of the float64 reference."""
    exe = build_csrc_testing("imq_cuda_emu_test", tmp_path)
    run = subprocess.run([exe, "approx", f"rcp={bias}"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "ALL PASSED" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
    assert f"one ulp {bias}" in run.stdout
    assert run.stdout.count(" ok ") >= 10  # the philox check and the 9 cases all ran
