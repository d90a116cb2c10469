"""MNIST loaded once into memory as float tensors in [0, 1], plus a deterministic, resumable batcher.

No DataLoader / worker processes: the whole training set is one (60000, 1, 28, 28) tensor and the
order of epoch ``e`` is ``randperm(n)`` from a generator seeded with ``(seed, e)``, so the loader
position is fully described by the global step (checkpointed) and a resumed run sees the same batches.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
DATA_ENV = "GMWAE_DATA"


class MissingDataError(FileNotFoundError):
    """MNIST is absent under the data directory and could not be downloaded."""


class InvalidDataError(ValueError):
    """An MNIST file is present but unreadable: truncated, garbled, wrong shape or labels out of range."""


IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # IDX: unsigned bytes, 3 dimensions / 1 dimension
IMAGE_SIDE = 28
N_CLASSES = 10


def default_data_dir() -> str:
    return os.environ.get(DATA_ENV, "data")


def _find(raw: Path, name: str) -> Optional[Path]:
    """``raw/name``, else ``raw/name.gz``, else None."""
    for p in (raw / name, raw / (name + ".gz")):
        if p.is_file():
            return p
    return None


def _raw_present(root: Path) -> bool:
    raw = root / "MNIST" / "raw"
    return all(_find(raw, f) is not None for f in MNIST_FILES)


def missing_data_message(root: Path, cause: Optional[BaseException] = None) -> str:
    raw = root / "MNIST" / "raw"
    msg = (
        f"MNIST not found under {raw} and it could not be downloaded"
        + (f" ({type(cause).__name__}: {cause})" if cause is not None else "")
        + ".\nPut the four files (optionally .gz)\n  "
        + "\n  ".join(MNIST_FILES)
        + f"\ninto <data-dir>/MNIST/raw/ and pass --data-dir <data-dir>, or set the {DATA_ENV} "
        "environment variable to <data-dir> (e.g. GMWAE_DATA=/work/shared/data)."
    )
    return msg


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise InvalidDataError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e


def read_idx(path: Path, magic: int) -> torch.Tensor:
    """An IDX file of unsigned bytes (``magic`` 2051: images (n, rows, cols); 2049: labels (n,)) as a uint8
    tensor, after checking the magic number and that the payload has exactly the size the header announces.
    ``path`` may be gzip-compressed (``.gz``). Raises :class:`InvalidDataError` naming the file and the problem."""
    buf = _read_bytes(path)
    ndim = 3 if magic == IMAGE_MAGIC else 1
    head = 4 * (1 + ndim)
    if len(buf) < head:
        raise InvalidDataError(f"{path}: truncated IDX file ({len(buf)} bytes, shorter than its header)")
    found = struct.unpack(">i", buf[:4])[0]
    if found != magic:
        raise InvalidDataError(f"{path}: not an MNIST IDX file of this kind (magic number {found}, expected {magic})")
    dims = struct.unpack(f">{ndim}i", buf[4:head])
    if ndim == 3 and dims[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise InvalidDataError(f"{path}: images are {dims[1]}x{dims[2]}, expected {IMAGE_SIDE}x{IMAGE_SIDE}")
    want = head + int(np.prod(dims))
    if len(buf) != want:
        kind = "truncated" if len(buf) < want else "oversized"
        raise InvalidDataError(f"{path}: {kind} IDX file ({len(buf)} bytes; its header {list(dims)} needs {want})")
    return torch.from_numpy(np.frombuffer(buf, dtype=np.uint8, offset=head).reshape(dims).copy())


def _load_split(raw: Path, images: str, labels: str) -> Tuple[torch.Tensor, torch.Tensor]:
    x = read_idx(_find(raw, images), IMAGE_MAGIC)
    y = read_idx(_find(raw, labels), LABEL_MAGIC)
    if len(x) != len(y):
        raise InvalidDataError(f"{raw}: {images} holds {len(x)} images but {labels} holds {len(y)} labels")
    if len(x) == 0:
        raise InvalidDataError(f"{raw}: {images} holds no images")
    if int(y.max()) >= N_CLASSES:
        raise InvalidDataError(f"{raw}: {labels} holds the label {int(y.max())}; MNIST labels are 0..{N_CLASSES - 1}")
    return x.to(torch.float32).div_(255.0).unsqueeze(1).contiguous(), y.to(torch.int64)


def _download(root: Path) -> None:
    from torchvision.datasets import MNIST

    try:
        MNIST(str(root), train=True, download=True)
        MNIST(str(root), train=False, download=True)
    except Exception as e:  # network unreachable, permission denied, bad checksum ...
        raise MissingDataError(missing_data_message(root, e)) from e


def load_mnist(data_dir: str, download: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train (n, 1, 28, 28) float32 in [0, 1], y_train int64 in 0..9, x_test, y_test) from the four IDX files
    (each optionally ``.gz``) under ``<data_dir>/MNIST/raw``; downloaded with torchvision when absent and
    ``download``. Raises :class:`MissingDataError` when absent, :class:`InvalidDataError` when a file is truncated
    or garbled, the image and label counts of a split differ, or a label is outside 0..9."""
    root = Path(data_dir).expanduser()
    if not _raw_present(root):
        if not download:
            raise MissingDataError(missing_data_message(root))
        _download(root)
        if not _raw_present(root):
            raise MissingDataError(missing_data_message(root))
    raw = root / "MNIST" / "raw"
    return _load_split(raw, *MNIST_FILES[:2]) + _load_split(raw, *MNIST_FILES[2:])


def subset(x: torch.Tensor, y: torch.Tensor, n: Optional[int], seed: int = 0):
    """First-n of a fixed random permutation (class-balanced enough for small tests); n=None: all."""
    if n is None or n >= len(x):
        return x, y
    g = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randperm(len(x), generator=g)[:n].sort().values
    return x[idx], y[idx]


#: Seed of the validation split: one split for every run (runs of different seeds are then chosen on the same images).
VAL_SPLIT_SEED = 20_191_101


def split_validation(x: torch.Tensor, y: torch.Tensor, n: int):
    """``(x_train, y_train, x_val, y_val)``: ``n`` images held out by a fixed permutation (independent of the run's
    seed; both parts keep the original order); ``n = 0``: no validation set (empty tensors)."""
    if not 0 <= n < len(x):
        raise ValueError(f"the validation set ({n} images) must leave training images ({len(x)} in all)")
    g = torch.Generator().manual_seed(VAL_SPLIT_SEED)
    perm = torch.randperm(len(x), generator=g)
    val, train = perm[:n].sort().values, perm[n:].sort().values
    return x[train], y[train], x[val], y[val]


class Batcher:
    """Deterministic epoch-wise shuffling; batch ``step`` (0-based) is a pure function of (seed, step)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        if batch_size > len(x):
            raise ValueError(f"batch size {batch_size} > number of training images {len(x)}")
        self.x, self.y, self.bs, self.seed = x, y, batch_size, seed
        self.per_epoch = len(x) // batch_size  # the last partial batch of an epoch is dropped
        self._epoch, self._perm = -1, None

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(len(self.x), generator=g), epoch
        return self._perm

    def batch(self, step: int):
        epoch, i = divmod(step, self.per_epoch)
        idx = self._perm_for(epoch)[i * self.bs : (i + 1) * self.bs]
        return self.x[idx], self.y[idx]

    def epoch_of(self, step: int) -> float:
        return step / self.per_epoch
