"""Measurement helpers shared by the benchmark files, ``report.py`` and ``tests/test_benchmarks_smoke.py``.

Plain Python (no pytest import), so any benchmark file (``bench_*.py``) and the report can use it:

* :func:`device_info` / :func:`device_slug`: what the results were measured on (the slug names the result files,
  e.g. ``cpu-amd-epyc-2c``, ``nvidia-h100``).
* :func:`memory_budget`: the bytes a materialised baseline may use before it is recorded as too large
  (a fraction of the free RAM or of the free GPU memory).
* :func:`measure_peak_memory`: peak memory of one untimed call (method in its docstring).
* :func:`timed_call`, :func:`plan_rounds`: warm-up timing with a device sync, and how many rounds to run.
* :func:`sfu_bound_s`: the special-function-unit lower bound of a GPU for the IMQ MMD.
"""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
from typing import Optional

import torch

# One implementation of the memory and timing measurement, shared with ``python -m gmwae_fast.demo``.
from gmwae_fast._measure import measure_peak_memory, sync, timed_call  # noqa: F401

MODES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

#: MUFU (special function unit) reciprocal throughput per clock per SM. 16 on Volta..Hopper (sm_70 - sm_90).
MUFU_PER_CLK_PER_SM = {7: 16, 8: 16, 9: 16, 10: 16, 12: 16}


# ---------------------------------------------------------------------------------------------------------------
# what we run on
# ---------------------------------------------------------------------------------------------------------------


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", " ", text, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device_name: str, device_type: str, cores: Optional[int] = None) -> str:
    """File-name slug of a device: ``cpu-amd-epyc-2c``, ``nvidia-h100``, ``nvidia-rtx-4090``."""
    if device_type == "cuda":
        toks = [t for t in _slug(device_name.replace("-", " ")).split("-") if t not in ("geforce", "tesla")]
        out = []
        for t in toks:
            out.append(t)
            if any(ch.isdigit() for ch in t):  # keep the name up to the model number (h100, a100, 4090)
                break
        if not out or out[0] != "nvidia":
            out.insert(0, "nvidia")
        return "-".join(out)
    name = re.split(r"\bcpu\b|@|\bprocessor\b", device_name, flags=re.I)[0]
    name = re.sub(r"\b\d+-core\b", " ", name, flags=re.I)
    slug = _slug(name) or "cpu"
    cores = cores if cores is not None else cpu_count()
    return f"cpu-{slug}-{cores}c"


def _pkg_version(dist: str) -> Optional[str]:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_properties(device: torch.device) -> dict:
    """SM count, SM clock (MHz) and compute capability of a CUDA device (clock: torch, then nvidia-smi, then a
    table of boost clocks; ``clock_source`` says which)."""
    props = torch.cuda.get_device_properties(device)
    out = {
        "sm_count": props.multi_processor_count,
        "cc": f"{props.major}.{props.minor}",
        "major": props.major,
        "total_memory": props.total_memory,
        "name": props.name,
    }
    clock_mhz, source = None, None
    khz = getattr(props, "clock_rate", None)
    if khz:
        clock_mhz, source = khz / 1000.0, "torch device properties"
    if clock_mhz is None:
        try:
            idx = device.index if device.index is not None else torch.cuda.current_device()
            txt = subprocess.run(
                ["nvidia-smi", "-i", str(idx), "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
            clock_mhz, source = float(txt.splitlines()[0]), "nvidia-smi clocks.max.sm"
        except Exception:
            pass
    if clock_mhz is None:
        table = {
            "H200": 1980.0,
            "H100 PCIe": 1755.0,
            "H100": 1980.0,
            "A100": 1410.0,
            "L40S": 2520.0,
            "A10": 1695.0,
            "V100": 1530.0,
        }
        for key, mhz in table.items():
            if key in props.name:
                clock_mhz, source = mhz, f"boost-clock table ({key})"
                break
    out["sm_clock_mhz"], out["clock_source"] = clock_mhz, source
    return out


def device_info(device: torch.device) -> dict:
    """Device name, slug, core/SM count and the versions of everything that is measured."""
    import gmwae_fast

    info = {
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _pkg_version("triton"),
        "pykeops": _pkg_version("pykeops"),
        "python": platform.python_version(),
        "build_info": gmwae_fast.build_info(),
        "available_backends": gmwae_fast.available_backends(device),
        "cpu_model": cpu_model_name(),
        "cpu_cores": cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        gp = gpu_properties(device)
        info.update(device_name=gp["name"], gpu=gp)
        info["slug"] = device_slug(gp["name"], "cuda")
    else:
        info["device_name"] = f"{info['cpu_model']} ({info['cpu_cores']} cores)"
        info["slug"] = device_slug(info["cpu_model"], "cpu", info["cpu_cores"])
    return info


# ---------------------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------------------


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return 0


def memory_budget(device: torch.device, fraction: float = 0.5) -> int:
    """Bytes a materialised baseline may allocate: ``fraction`` of the free RAM (CPU) or free GPU memory."""
    return int(free_memory_bytes(device) * fraction)


# ---------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------


def plan_rounds(
    call_s: float, target_s: float, min_rounds: int, max_rounds: int, min_round_s: float = 1e-3
) -> tuple[int, int]:
    """``(rounds, iterations)``: iterations per round so one round lasts >= ``min_round_s``, rounds to fill
    ``target_s`` (at least ``min_rounds``, at most ``max_rounds``)."""
    call_s = max(call_s, 1e-7)
    iterations = max(1, min(1000, math.ceil(min_round_s / call_s)))
    rounds = math.ceil(target_s / (call_s * iterations))
    return max(min_rounds, min(max_rounds, rounds)), iterations


# ---------------------------------------------------------------------------------------------------------------
# work counts and hardware bound
# ---------------------------------------------------------------------------------------------------------------


def timing_info(stats, iterations: int) -> dict:
    """The ``extra_info`` fields every benchmark records from pytest-benchmark's stats."""
    return dict(
        median_s=stats.median,
        q1_s=stats.q1,
        q3_s=stats.q3,
        iqr_s=stats.iqr,
        mean_s=stats.mean,
        stddev_s=stats.stddev,
        min_s=stats.min,
        rounds=stats.rounds,
        iterations=iterations,
    )


def mmd_pairs(n: int, m: int) -> int:
    """Distinct kernel evaluations an unbiased MMD² needs: ``n(n-1)/2 + m(m-1)/2 + n m`` (self terms symmetric)."""
    return n * (n - 1) // 2 + m * (m - 1) // 2 + n * m


def sfu_bound_s(pairs: int, n_bandwidths: int, gpu: dict) -> Optional[float]:
    """Seconds the special function units need for ``pairs * n_bandwidths`` reciprocals:
    ``pairs * S / (MUFU/clk/SM * SMs * clock)``. The backward reuses the forward's reciprocal (``psi = -C r^2``),
    so the same bound applies to forward+backward. ``None`` when the clock is unknown."""
    if not gpu or not gpu.get("sm_clock_mhz"):
        return None
    per_clk = MUFU_PER_CLK_PER_SM.get(gpu.get("major"), 16)
    rate = per_clk * gpu["sm_count"] * gpu["sm_clock_mhz"] * 1e6
    return pairs * n_bandwidths / rate
