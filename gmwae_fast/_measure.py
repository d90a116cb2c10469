"""Peak-memory and timing measurement shared by ``python -m gmwae_fast.demo`` and the benchmark suite
(``benchmarks/_harness.py`` re-exports these), so both report the same figures for the same call.

* :func:`measure_peak_memory`: peak extra memory of one untimed call (method in its docstring).
* :func:`timed_call`: one call timed between two device synchronisations.
"""

from __future__ import annotations

import ctypes
import gc
import platform
import time
from typing import Callable, Optional

import torch

__all__ = ["sync", "measure_peak_memory", "timed_call"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[Optional[int], str]:
    """Peak extra memory of one (untimed) call of ``fn``: ``(bytes, method)``.

    * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory allocated
      before the call (tensors the call allocates, caching-allocator reuse included; not the allocator's slack).
    * CPU (Linux): the process's peak resident set. Freed heap memory is first returned to the OS
      (``malloc_trim(0)``) and the peak counter reset (``/proc/self/clear_refs`` ``5``), so every page the call
      touches is counted; result = ``VmHWM`` after the call minus ``VmRSS`` before it. Memory the call takes from
      what malloc still holds (small blocks) is missed, so this is a slight under-estimate for small sizes.
    * CPU elsewhere: ``resource.getrusage`` max RSS delta (only a growth of the process-lifetime peak shows).
    """
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base), "cuda max_memory_allocated - allocated before"
    _malloc_trim()
    if _reset_hwm():
        base = _proc_status_kib("VmRSS")
        fn()
        peak = _proc_status_kib("VmHWM")
        if base is not None and peak is not None:
            return max(0, (peak - base) * 1024), "cpu peak RSS delta (malloc_trim + clear_refs, VmHWM - VmRSS)"
    try:
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 1 if platform.system() == "Darwin" else 1024
        return max(0, (after - before) * scale), "cpu ru_maxrss growth (lower bound)"
    except ImportError:
        fn()
        return None, "unavailable"


def timed_call(fn: Callable[[], object], device: torch.device):
    """``(result, seconds)`` of one call, synchronised before starting and before stopping the clock."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0
