"""The trainer's progress output: a tqdm bar when stderr is a terminal, plain lines otherwise (CI, ``nohup``)."""

from __future__ import annotations

import math
import sys
import time
from typing import Dict, Optional

from .config import TrainConfig


class _LineProgress:
    """Progress as plain lines (stderr not a terminal: CI and nohup logs): the first and last step, and the
    --log-every steps at least --progress-seconds apart."""

    def __init__(self, cfg: TrainConfig, step: int, stream):
        self.cfg, self.stream, self.start = cfg, stream, step
        self.t0, self.last = time.perf_counter(), -math.inf

    def update(self, step: int, loss: float, last_eval: Optional[Dict]) -> None:
        c, now = self.cfg, time.perf_counter()
        due = step % c.log_every == 0 and now - self.last >= c.progress_seconds
        if not (due or step in (self.start + 1, c.steps)):
            return
        self.last = now
        per_step = (now - self.t0) / max(step - self.start, 1)
        text = f"{c.model} step {step}/{c.steps}: loss {loss:.4f}"
        if last_eval:
            text += (
                f", test accuracy {last_eval['test_accuracy']:.4f}, active modes "
                f"{last_eval['active_modes']}/{c.modes} (step {last_eval.get('step', '?')})"
            )
        left = int(per_step * (c.steps - step))
        text += f"; {per_step:.3f} s/step, {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left"
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class _BarProgress:
    """A tqdm bar with the loss and the latest accuracy / active modes (stderr is a terminal)."""

    def __init__(self, cfg: TrainConfig, step: int, stream):
        from tqdm import tqdm

        self.bar = tqdm(total=cfg.steps, initial=step, desc=cfg.model, dynamic_ncols=True, file=stream)

    def update(self, step: int, loss: float, last_eval: Optional[Dict]) -> None:
        post = {"loss": f"{loss:.3f}"}
        if last_eval:
            post["acc"] = f"{last_eval['test_accuracy']:.3f}"
            post["modes"] = last_eval["active_modes"]
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def make_progress(cfg: TrainConfig, step: int, stream=None):
    """None with --no-progress; else, from completed step ``step`` on, a tqdm bar when ``stream`` (default stderr)
    is a terminal, plain lines if not. Either has ``update(step, loss, last_eval)`` and ``close()``."""
    stream = sys.stderr if stream is None else stream
    if cfg.no_progress:
        return None
    isatty = getattr(stream, "isatty", None)
    return (_BarProgress if isatty is not None and isatty() else _LineProgress)(cfg, step, stream)
