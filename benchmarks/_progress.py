"""Progress of a benchmark run: a tqdm bar on a terminal, one plain line per benchmark otherwise (logs, CI).

Pytest hooks, imported by ``benchmarks/conftest.py``. The bar (or the lines) go to stderr, so they never mix with
the JSON or the report; ``--no-bench-progress`` turns both off.
"""

from __future__ import annotations

import sys
import time

_state: dict = {}


def _enabled(config) -> bool:
    return not config.getoption("--no-bench-progress", default=False) and config.getoption(
        "--benchmark-only", default=False
    )


def pytest_collection_finish(session) -> None:
    if _enabled(session.config) and session.items:
        _state.update(
            total=len(session.items),
            done=0,
            start=time.perf_counter(),
            bar=None,
            capture=session.config.pluginmanager.getplugin("capturemanager"),
        )


def _bar():
    if _state["done"] == 1 and sys.stderr.isatty():
        try:
            from tqdm import tqdm

            _state["bar"] = tqdm(total=_state["total"], unit="bench", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            pass
    return _state["bar"]


def pytest_runtest_logfinish(nodeid: str, location) -> None:
    if "total" not in _state:
        return
    _state["done"] += 1
    capture = _state["capture"]
    if capture is None:
        _report(nodeid)
        return
    with capture.global_and_fixture_disabled():  # pytest's output capture would swallow the bar / lines
        _report(nodeid)


def _report(nodeid: str) -> None:
    name = nodeid.split("::", 1)[-1]
    bar = _bar()
    if bar is not None:
        bar.set_postfix_str(name[-60:], refresh=False)
        bar.update(1)
    else:
        elapsed = time.perf_counter() - _state["start"]
        print(f"bench {_state['done']}/{_state['total']} ({elapsed:.0f} s): {name}", file=sys.stderr, flush=True)


def pytest_sessionfinish(session, exitstatus) -> None:
    bar = _state.pop("bar", None)
    if bar is not None:
        capture = _state.get("capture")
        if capture is None:
            bar.close()
        else:
            with capture.global_and_fixture_disabled():
                bar.close()
    _state.clear()
