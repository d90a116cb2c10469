"""Ahead-of-time compile check of the Triton MMD kernels for sm_90, without a GPU (``benchmarks/triton_aot.py``).

Every float32 variant of the values and row-pass kernels that a GM-WAE training step launches (d = 10, 15
bandwidths, 1000 points in groups of 10 against 100) and the same at d = 64 is compiled with the launchers' own
arguments, and ``ptxas -v`` must report no register spills. Runs ``benchmarks/triton_aot.py --quick`` in a
subprocess (the compile needs Triton outside interpreter mode, which ``tests/conftest.py`` turns on without a GPU).
Skipped when Triton or its bundled ptxas is missing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not importable")

ROOT = Path(__file__).resolve().parents[1]


def _ptxas_available() -> bool:
    try:
        from triton import knobs

        path = knobs.nvidia.ptxas.path
    except Exception:  # noqa: BLE001 - any failure to locate it means: cannot run this check
        return False
    return bool(path) and os.path.exists(path)


@pytest.fixture(scope="module")
def rows():
    if not _ptxas_available():
        pytest.skip("triton's NVIDIA backend (ptxas) is not available")
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "triton_aot.py"), "--quick", "--json", "-"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert res.returncode == 0, f"triton_aot.py failed:\n{res.stderr[-4000:]}"
    return json.loads(res.stdout)


def test_covers_every_float32_hot_loop(rows):
    seen = {(r["name"], r["variant"].split(" ")[1]) for r in rows}
    for name in ("_imq_values_kernel", "_imq_rowpass_kernel"):
        for d in ("d=10", "d=64"):
            assert (name, d) in seen, f"{name} at {d} was not compiled"
    variants = {r["variant"] for r in rows}
    assert len(variants) == 12, sorted(variants)  # 6 launch kinds x 2 sizes
    for r in rows:
        assert r["arch"] == 90 and r["regs"] > 0, r
        assert r["signature"]["aT_ptr"] == "*fp32", r["signature"]
        if r["name"] == "_imq_values_kernel" or r["name"] == "_imq_rowpass_kernel":
            assert r["constexprs"]["FAST_RCP"] is True  # as launched on CUDA


def test_no_register_spills_float32(rows):
    spilled = [
        f"{r['name']} [{r['variant']}]: {r['regs']} registers, {r['spill_bytes']} bytes spilled, "
        f"{r['stack']} bytes stack"
        for r in rows
        if r["spill_bytes"] or r["stack"]
    ]
    assert not spilled, "register spills:\n" + "\n".join(spilled)
