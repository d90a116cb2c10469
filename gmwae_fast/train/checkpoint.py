"""Verified atomic checkpoints and RNG-state capture for bit-identical resume on CPU.

File format: the line ``gmwae_fast-checkpoint 1 <sha256 of the payload>``, then the payload, the bytes of
``torch.save(obj)``. :func:`load_checkpoint` checks the header and the digest before unpickling, so a flipped byte, a
truncated, empty or foreign file is one :class:`CheckpointError` line, never a traceback or a silently wrong model.
Files written by ``torch.save`` alone (older checkpoints) still load, without the digest check.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np
import torch

CKPT_NAME = "last.pt"
MAGIC = b"gmwae_fast-checkpoint 1 "
_HEADER_LEN = len(MAGIC) + 64 + 1  # magic, hex digest, newline


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: empty, truncated, corrupt, foreign, or holding non-finite values."""


def _tmp_prefix(path: Path) -> str:
    return "." + path.name + "."


def stale_temporaries(path) -> List[Path]:
    """Temporary files ``.<name>.*.tmp`` that :func:`atomic_save` left next to ``path`` when killed mid-write."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(
        p
        for p in path.parent.iterdir()
        if p.name.startswith(_tmp_prefix(path)) and p.name.endswith(".tmp") and p.is_file()
    )


def remove_stale_temporaries(path) -> int:
    """Deletes :func:`stale_temporaries` of ``path`` (call it only while no other process writes ``path``);
    returns how many were removed."""
    n = 0
    for p in stale_temporaries(path):
        try:
            p.unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n


def nonfinite_entries(obj: Any, prefix: str = "") -> Iterator[str]:
    """Names (``model.encoder.fc.weight``, ``optimizer.state.3.exp_avg``) of the floating tensors inside nested
    dicts / lists / tuples of ``obj`` that hold a NaN or an infinity."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            yield prefix or "<tensor>"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from nonfinite_entries(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from nonfinite_entries(v, f"{prefix}.{i}" if prefix else str(i))


def encode(obj: Any) -> bytes:
    """The checkpoint file's bytes for ``obj``: header line with the payload's sha256, then ``torch.save(obj)``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    return MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def atomic_save(obj: Any, path) -> None:
    """Writes :func:`encode` ``(obj)`` to a temporary file in the same directory, fsync, then os.replace: a crash or
    a full disk at any point leaves either the old file or the new one, never a truncated one. Serialisation
    happens in memory first, so an I/O error surfaces as an ``OSError`` from the write."""
    path = Path(path)
    data = encode(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename durable
        dfd = os.open(str(path.parent), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def rng_state(gen: torch.Generator) -> Dict[str, Any]:
    st = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "train_gen": gen.get_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any], gen: torch.Generator) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    gen.set_state(st["train_gen"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _payload(path: Path) -> Tuple[bytes, bool]:
    """(payload bytes, whether a digest was verified); CheckpointError for an unusable file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e.strerror or e})") from e
    if not data:
        raise CheckpointError(f"checkpoint {path} is empty")
    if data.startswith(MAGIC):
        if len(data) < _HEADER_LEN or data[_HEADER_LEN - 1 : _HEADER_LEN] != b"\n":
            raise CheckpointError(f"checkpoint {path} is truncated (incomplete header)")
        payload = data[_HEADER_LEN:]
        if hashlib.sha256(payload).hexdigest().encode() != data[len(MAGIC) : _HEADER_LEN - 1]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt or truncated: its sha256 does not match the one "
                f"recorded when it was written"
            )
        return payload, True
    if data.startswith(b"PK\x03\x04"):  # a plain torch.save zip (older checkpoints)
        return data, False
    raise CheckpointError(f"{path} is not a gmwae_fast checkpoint (unknown format)")


def load_checkpoint(path, map_location="cpu") -> Dict[str, Any]:
    """The dict saved by :func:`atomic_save` at ``path``, after checking its digest and that every floating
    tensor in it is finite. Raises :class:`CheckpointError` (one line naming the file and the problem) for an
    empty, truncated, corrupt or foreign file, or for non-finite values."""
    path = Path(path)
    payload, _ = _payload(path)
    try:
        obj = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    except (
        RuntimeError,
        EOFError,
        ValueError,
        zipfile.BadZipFile,
        ImportError,
        AttributeError,
        UnicodeDecodeError,
        TypeError,
    ) as e:
        raise CheckpointError(
            f"checkpoint {path} cannot be unpickled ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a gmwae_fast checkpoint (holds a {type(obj).__name__}, not a dict)")
    bad = list(nonfinite_entries(obj))
    if bad:
        raise CheckpointError(
            f"checkpoint {path} holds non-finite values in {', '.join(bad[:3])}"
            + (f" and {len(bad) - 3} more tensors" if len(bad) > 3 else "")
        )
    return obj
