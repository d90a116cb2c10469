"""pytest-benchmark configuration of the ``gmwae_fast`` benchmarks.

    pytest benchmarks --benchmark-only                         # small sweep on a CPU-only machine, full on a GPU
    pytest benchmarks --benchmark-only --sweep full --benchmark-json out.json
    python benchmarks/report.py out.json                       # -> benchmarks/results/<device>.{json,md,png}
    bash benchmarks/run.sh                                     # both steps

The default ``pytest`` run only collects ``tests/`` (``testpaths`` in pyproject.toml), so none of this runs there.
Files named ``bench_*.py`` in this folder are collected as test modules (hook below). Cases skipped for a reason
(provider unusable here, too large for the memory budget, out of memory, predicted too slow) are recorded in the
JSON under ``"gmwae_fast" -> "skipped"`` so the report shows them.
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest
import torch

_HERE_STR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE_STR)

import _harness  # noqa: E402
import _providers  # noqa: E402
from _progress import pytest_collection_finish, pytest_runtest_logfinish, pytest_sessionfinish  # noqa: E402,F401  progress bar/lines

_HERE = pathlib.Path(_HERE_STR)

# ---------------------------------------------------------------------------------------------------------------
# sweeps
# ---------------------------------------------------------------------------------------------------------------

#: Each sweep: a grid (n x d x mode x dtype, every provider), single points ``(n, d, mode, dtype, providers)``, and
#: the target configurations ``(n, d, mode, dtype)`` where every provider runs however slow (``--bench-max-call-s``
#: does not apply; the memory budget does).
SWEEPS = {
    # a minute: validates the harness
    "tiny": {
        "grid": {"n": (128, 256), "d": (10,), "mode": _harness.MODES, "dtype": ("fp32",)},
        "points": [],
        "force": [],
    },
    # a CPU-only machine
    "small": {
        "grid": {"n": (256, 1024, 2048, 4096), "d": (10, 64), "mode": _harness.MODES, "dtype": ("fp32",)},
        # the fused CPU kernels at a size no materialised formula fits (those are recorded as too large)
        "points": [(65536, 10, "fwd+bwd", "fp32", _providers.PROVIDERS)],
        "force": [(4096, 10, "fwd+bwd", "fp32"), (2048, 10, "fwd+bwd", "fp32"), (2048, 10, "fwd", "fp32")],
    },
    # a GPU
    "full": {
        "grid": {
            "n": (256, 1024, 4096, 16384, 65536),
            "d": (2, 10, 64, 128),
            "mode": _harness.MODES,
            "dtype": ("fp32", "bf16"),
        },
        "points": [],
        "force": [(4096, 64, "fwd+bwd", "fp32")],
    },
}


def pytest_addoption(parser):
    g = parser.getgroup("gmwae_fast benchmarks")
    g.addoption(
        "--no-bench-progress",
        action="store_true",
        help="no progress bar (terminal) or per-benchmark progress lines (otherwise) on stderr",
    )
    g.addoption(
        "--sweep",
        default="auto",
        choices=("auto",) + tuple(SWEEPS),
        help="case set: auto = full with a GPU, small without (default auto)",
    )
    g.addoption(
        "--bench-device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="device the benchmarks run on (default: cuda if available, else cpu)",
    )
    g.addoption(
        "--bench-providers",
        default="",
        help=f"comma-separated subset of {','.join(_providers.PROVIDERS)} (default all)",
    )
    g.addoption("--bench-dtypes", default="", help="comma-separated dtypes overriding the sweep's (fp32,bf16)")
    g.addoption("--bench-n", default="", help="comma-separated n overriding the sweep's grid (points kept)")
    g.addoption("--bench-d", default="", help="comma-separated d overriding the sweep's grid")
    g.addoption(
        "--bench-threads",
        type=int,
        default=0,
        help="torch.set_num_threads for the CPU benchmarks (default 0: torch's default, one per core)",
    )
    g.addoption(
        "--bench-time",
        type=float,
        default=1.0,
        help="target measured seconds per case (rounds = time / call time, within the min/max)",
    )
    g.addoption(
        "--bench-min-rounds", type=int, default=5, help="minimum rounds per case (3 when one call takes more than 2 s)"
    )
    g.addoption("--bench-max-rounds", type=int, default=200)
    g.addoption(
        "--bench-max-call-s",
        type=float,
        default=None,
        help="skip a baseline whose call time, extrapolated as n^2 from a smaller n of the same series, "
        "exceeds this (default 3 s small sweep, 60 s full; 0 = never; target configurations always run)",
    )
    g.addoption(
        "--bench-mem-fraction",
        type=float,
        default=0.5,
        help="materialised baselines whose estimated footprint exceeds this fraction of the free RAM / "
        "GPU memory are recorded as too large instead of run (default 0.5)",
    )
    g.addoption(
        "--bench-check-max-n",
        type=int,
        default=None,
        help="largest n whose value is checked against the float64 reference (default 4096 on a CPU, 16384 on a GPU)",
    )


# ---------------------------------------------------------------------------------------------------------------
# session settings shared by the benchmark files
# ---------------------------------------------------------------------------------------------------------------


class BenchSettings:
    """Everything a benchmark file needs to know about the run (``bench_settings`` fixture)."""

    def __init__(self, config):
        opt = config.getoption
        dev = opt("--bench-device")
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        sweep = opt("--sweep")
        if sweep == "auto":
            sweep = "full" if self.device.type == "cuda" else "small"
        self.sweep = sweep
        self.target_s = opt("--bench-time")
        self.min_rounds = opt("--bench-min-rounds")
        self.max_rounds = opt("--bench-max-rounds")
        mc = opt("--bench-max-call-s")
        self.max_call_s = mc if mc is not None else (60.0 if sweep == "full" else 3.0)
        self.mem_fraction = opt("--bench-mem-fraction")
        cm = opt("--bench-check-max-n")
        self.check_max_n = cm if cm is not None else (16384 if self.device.type == "cuda" else 4096)
        self.force = set(SWEEPS[sweep]["force"])
        self.skipped: list[dict] = []
        self.call_times: dict = {}  # (provider, d, mode, dtype) -> (n, seconds per call), for extrapolation
        self.ref_cache: dict = {}  # (n, m, d, dtype, seed) -> float64 reference value
        self._info = None

    @property
    def info(self) -> dict:
        if self._info is None:
            self._info = _harness.device_info(self.device)
        return self._info

    def as_dict(self) -> dict:
        return {
            "sweep": self.sweep,
            "device": str(self.device),
            "target_s": self.target_s,
            "min_rounds": self.min_rounds,
            "max_rounds": self.max_rounds,
            "max_call_s": self.max_call_s,
            "mem_fraction": self.mem_fraction,
            "check_max_n": self.check_max_n,
        }


_SETTINGS = pytest.StashKey[BenchSettings]()


def pytest_configure(config):
    config.stash[_SETTINGS] = BenchSettings(config)
    threads = config.getoption("--bench-threads")
    if threads > 0:
        torch.set_num_threads(threads)


def settings_of(config) -> BenchSettings:
    return config.stash[_SETTINGS]


@pytest.fixture(scope="session")
def bench_settings(request) -> BenchSettings:
    return settings_of(request.config)


class _Skipper:
    def __init__(self, settings: BenchSettings, nodeid: str):
        self.settings, self.nodeid = settings, nodeid

    def __call__(self, status: str, reason: str, **case) -> None:
        """Record a case that does not run (``status``: unavailable, too-large, oom, too-slow, error) and skip."""
        self.settings.skipped.append({"nodeid": self.nodeid, "status": status, "reason": reason, **case})
        pytest.skip(f"[{status}] {reason}")


@pytest.fixture
def record_skip(request, bench_settings) -> _Skipper:
    return _Skipper(bench_settings, request.node.nodeid)


# ---------------------------------------------------------------------------------------------------------------
# case generation
# ---------------------------------------------------------------------------------------------------------------


def _csv(text: str, conv=str):
    return tuple(conv(t) for t in text.split(",") if t.strip()) if text else ()


def mmd_cases(config) -> list[tuple]:
    """``(provider, n, d, mode, dtype)`` of this run, ordered so a series' smaller n runs first."""
    s = settings_of(config)
    sweep = SWEEPS[s.sweep]
    grid = dict(sweep["grid"])
    for key, opt, conv in (("n", "--bench-n", int), ("d", "--bench-d", int), ("dtype", "--bench-dtypes", str)):
        override = _csv(config.getoption(opt), conv)
        if override:
            grid[key] = override
    bad_dtypes = set(grid["dtype"]) - set(_harness.DTYPES)
    if bad_dtypes:
        raise pytest.UsageError(f"unknown --bench-dtypes {sorted(bad_dtypes)}; choose from {sorted(_harness.DTYPES)}")
    wanted = _csv(config.getoption("--bench-providers")) or _providers.PROVIDERS
    unknown = set(wanted) - set(_providers.PROVIDERS)
    if unknown:
        raise pytest.UsageError(f"unknown --bench-providers {sorted(unknown)}; choose from {_providers.PROVIDERS}")
    cases = {
        (p, n, d, mode, dt)
        for n in grid["n"]
        for d in grid["d"]
        for mode in grid["mode"]
        for dt in grid["dtype"]
        for p in wanted
    }
    dtypes_override = _csv(config.getoption("--bench-dtypes"))
    for n, d, mode, dt, provs in sweep["points"]:
        if dtypes_override and dt not in dtypes_override:
            continue
        cases |= {(p, n, d, mode, dt) for p in provs if p in wanted}
    order = {p: i for i, p in enumerate(_providers.PROVIDERS)}
    return sorted(cases, key=lambda c: (c[4], c[3], c[2], c[1], order[c[0]]))


def pytest_generate_tests(metafunc):
    if "mmd_case" in metafunc.fixturenames:
        cases = mmd_cases(metafunc.config)
        metafunc.parametrize("mmd_case", cases, ids=[f"{p}-n{n}-d{d}-{m}-{dt}" for p, n, d, m, dt in cases])


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` of this folder as test modules (pytest's default pattern is ``test_*.py``)."""
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and file_path.parent == _HERE
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


# ---------------------------------------------------------------------------------------------------------------
# what goes into the pytest-benchmark JSON besides the timings
# ---------------------------------------------------------------------------------------------------------------


def pytest_benchmark_update_machine_info(config, machine_info):
    s = settings_of(config)
    machine_info["gmwae_fast_device"] = _jsonable(s.info)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    s = settings_of(config)
    output_json["gmwae_fast"] = {"settings": s.as_dict(), "device": _jsonable(s.info), "skipped": s.skipped}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def pytest_report_header(config):
    s = settings_of(config)
    return (
        f"gmwae_fast benchmarks: sweep={s.sweep} device={s.device} "
        f"(use --sweep {{small,full}} and --bench-* options; see benchmarks/README.md)"
    )
