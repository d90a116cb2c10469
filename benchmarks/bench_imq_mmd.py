"""Multi-bandwidth IMQ MMD²: ``fast_imq_mmd`` against what users run today, per (n, d, mode, dtype).

One test per ``(provider, n, d, mode, dtype)`` case (``conftest.SWEEPS``), benchmark group ``n=.. d=.. mode dtype``.
Per case, outside the timed region:

1. unusable provider, estimated footprint over the memory budget, or a baseline whose call time extrapolated
   from a smaller n exceeds ``--bench-max-call-s``: recorded and skipped with the reason;
2. first call timed with a device sync (compile / autotune / KeOps code generation included): ``warmup_s``;
3. its value checked against the float64 reference (``n <= --bench-check-max-n``);
4. one more call for the peak memory (``_harness.measure_peak_memory``), a few to estimate the call time;
5. ``benchmark.pedantic``: ``rounds x iterations`` calls, each ending with a device sync.
"""

from __future__ import annotations

import gc
import math
import time

import _harness
import _providers
import pytest
import torch

import gmwae_fast

S = len(gmwae_fast.PAPER_SCALES)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(exc).lower()
    return any(
        k in text for k in ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")
    )


def _failure(provider: str, exc: Exception) -> tuple[str, str]:
    """``(status, reason)`` of a failed call to record, or re-raise: an error of a fused kernel is a bug."""
    if _is_oom(exc):
        return "oom", f"out of memory: {type(exc).__name__}: {str(exc)[:200]}"
    if provider in _providers.BASELINES:
        return "error", f"{_providers.LABELS[provider]} raised {type(exc).__name__}: {str(exc)[:300]}"
    raise exc


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sfu_model(S: int, gpu: dict) -> str:
    mufu = _harness.MUFU_PER_CLK_PER_SM.get(gpu["major"], 16)
    return (
        f"{S} reciprocals/pair, {mufu}/clk/SM x {gpu['sm_count']} SMs x {gpu['sm_clock_mhz']} MHz "
        f"({gpu['clock_source']})"
    )


def _check_oracle(settings, x, y, n, m, d, dtype_name):
    """``(reference value, oracle name)`` or ``(None, why not)``; cached per input set."""
    key = (n, m, d, dtype_name, 0)
    if key in settings.ref_cache:
        return settings.ref_cache[key]
    if n <= settings.check_max_n and m <= settings.check_max_n:
        out = (_providers.reference_value(x, y), "float64 reference (gmwae_fast.reference)")
    elif settings.device.type == "cuda":
        avail = gmwae_fast.available_backends(settings.device)
        backend = next((b for b in ("cuda", "triton") if avail[b] is None), None)
        if backend is None:
            out = (None, f"not checked: n > {settings.check_max_n} and no fused GPU backend for a float64 oracle")
        else:
            try:
                with torch.no_grad():
                    v = gmwae_fast.fast_imq_mmd(x.double(), y.double(), backend=backend)
                out = (float(v), f"float64 fast_imq_mmd backend={backend} (n > {settings.check_max_n})")
            except Exception as exc:  # noqa: BLE001 - the check is a sanity check, not the measurement
                out = (
                    None,
                    f"not checked: the float64 oracle (backend={backend}) raised "
                    f"{type(exc).__name__}: {str(exc)[:200]}",
                )
            _free(settings.device)
    else:
        out = (
            None,
            f"not checked: n > --bench-check-max-n={settings.check_max_n} on a CPU (float64 reference too slow)",
        )
    settings.ref_cache[key] = out
    return out


def test_imq_mmd(benchmark, mmd_case, bench_settings, record_skip):
    provider, n, d, mode, dtype_name = mmd_case
    s = bench_settings
    dev = s.device
    dtype = _harness.DTYPES[dtype_name]
    m = n
    group = f"n={n} d={d} {mode} {dtype_name}"
    benchmark.group = group
    case = {
        "kind": "imq_mmd",
        "provider": provider,
        "n": n,
        "m": m,
        "d": d,
        "mode": mode,
        "dtype": dtype_name,
        "group": group,
        "device": dev.type,
    }

    reason = _providers.unavailable_reason(provider, dev, dtype)
    if reason is not None:
        record_skip("unavailable", reason, **case)
    est = _providers.footprint_bytes(provider, n, m, S, mode, dtype)
    if est:
        _free(dev)
        budget = _harness.memory_budget(dev, s.mem_fraction)
        if est > budget:
            record_skip(
                "too-large",
                f"would materialise ~{est / 2**30:.1f} GiB (estimated) > "
                f"budget {budget / 2**30:.1f} GiB ({s.mem_fraction:g} of free {dev.type} memory)",
                est_bytes=est,
                budget_bytes=budget,
                **case,
            )
    series = (provider, d, mode, dtype_name)
    forced = (n, d, mode, dtype_name) in s.force  # a target configuration: every provider runs
    if provider in _providers.BASELINES and s.max_call_s > 0 and series in s.call_times and not forced:
        n0, t0 = s.call_times[series]
        predicted = t0 * (n / n0) ** 2
        if n > n0 and predicted > s.max_call_s:
            record_skip(
                "too-slow",
                f"predicted {predicted:.0f} s per call (n^2 from {t0:.3g} s at n={n0}) > "
                f"--bench-max-call-s={s.max_call_s:g}",
                predicted_call_s=predicted,
                **case,
            )

    x, y = _providers.make_inputs(n, d, dtype, dev, m=m)
    ref, oracle = _check_oracle(s, x, y, n, m, d, dtype_name)

    runner = None
    failure = None
    try:
        runner = _providers.make_runner(provider, x, y, mode)
        value, warmup_s = _harness.timed_call(runner.run, dev)
        value = float(value)
        t_mem = time.perf_counter()
        peak, mem_method = _harness.measure_peak_memory(runner.run, dev)
        t_mem = time.perf_counter() - t_mem
        estimates = [t_mem] if t_mem > 1.0 else []  # slow calls: the memory call is the estimate, no extra call
        while len(estimates) < 3 and sum(estimates) < 0.5:  # steady state, allocator re-warmed after the peak run
            estimates.append(_harness.timed_call(runner.run, dev)[1])
        call_s = min(estimates)
    except Exception as exc:  # noqa: BLE001 - sorted below
        failure = _failure(provider, exc)
    # skip outside the except block: the exception's traceback would keep the failed call's tensors alive
    if failure is not None:
        runner = None
        _free(dev)
        record_skip(*failure, **case)

    info = benchmark.extra_info
    info.update(case)
    info.update(
        label=_providers.LABELS[provider],
        S=S,
        device_name=s.info["device_name"],
        slug=s.info["slug"],
        torch=s.info["torch"],
        triton=s.info["triton"],
        pykeops=s.info["pykeops"],
        gmwae_fast=s.info["build_info"].get("version"),
        build_info=s.info["build_info"],
        torch_threads=torch.get_num_threads(),
        warmup_s=warmup_s,
        steady_call_s=call_s,
        peak_mem_bytes=peak,
        mem_method=mem_method,
        footprint_est_bytes=est or None,
        value=value,
        ref_value=ref,
        oracle=oracle,
    )

    if ref is not None:
        rel, tol = _providers.check_value(provider, value, ref, dtype)
        info.update(rel_err=rel, rel_tol=tol, value_check="ok" if tol is None or rel <= tol else "FAILED")
        if tol is None:
            info["value_check"] = "recorded (low-precision baseline, not asserted)"
        assert tol is None or rel <= tol, (
            f"{provider} value {value!r} differs from the float64 oracle {ref!r} by {rel:.3g} relative (> {tol:g})"
        )
    else:
        info.update(rel_err=None, rel_tol=None, value_check=oracle)

    min_rounds = 3 if call_s > 2.0 else s.min_rounds
    rounds, iterations = _harness.plan_rounds(call_s, s.target_s, min_rounds, s.max_rounds)

    def target():
        runner.run()
        _harness.sync(dev)

    try:
        benchmark.pedantic(target, rounds=rounds, iterations=iterations, warmup_rounds=0)
    except Exception as exc:  # noqa: BLE001
        failure = _failure(provider, exc)
    if failure is not None:
        runner = None
        _free(dev)
        record_skip(*failure, **case)

    stats = benchmark.stats.stats if benchmark.stats is not None else None
    if stats is not None and stats.rounds:
        med = stats.median
        pairs = _harness.mmd_pairs(n, m)
        info.update(
            _harness.timing_info(stats, iterations),
            pairs=pairs,
            pairs_per_s=pairs / med if med > 0 else None,
        )
        if dev.type == "cuda":
            bound = _harness.sfu_bound_s(pairs, S, s.info.get("gpu"))
            info.update(
                sfu_bound_s=bound,
                sfu_fraction=(bound / med) if bound and med > 0 else None,
                sfu_model=_sfu_model(S, s.info["gpu"]),
            )
        s.call_times[series] = (n, med)
    else:
        s.call_times[series] = (n, call_s)
    runner = None  # release the inputs before the next case
    _free(dev)
    if not math.isfinite(value):
        pytest.fail(f"{provider} returned a non-finite value {value}")
