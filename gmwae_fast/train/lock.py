"""One writer per output folder: an exclusive ``flock`` on ``<out>/.lock`` for the life of a training run.

Two trainers on one ``--out`` would interleave ``metrics.jsonl`` and overwrite each other's checkpoint and summary;
the second one is refused with one clear line instead. The lock is the kernel's ``flock``, released when the
holding process ends however it ends (a SIGKILL included), so the file a killed run leaves behind is a stale lock
that the next run simply takes over. Where ``fcntl`` does not exist (Windows) no lock is taken.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["LOCK_NAME", "OutputBusyError", "output_lock"]

LOCK_NAME = ".lock"


class OutputBusyError(RuntimeError):
    """Another live process holds the output folder's lock."""


@contextlib.contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir``'s lock for the body; :class:`OutputBusyError` when another live process holds it."""
    if fcntl is None:
        yield
        return
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # not a usable folder: the trainer's own check refuses it with the reason
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise OutputBusyError(
                f"another training run (pid {holder}) is writing to {out_dir}; wait for it, stop it, or pass "
                "another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock
