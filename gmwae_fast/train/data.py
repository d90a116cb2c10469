"""MNIST loaded once into memory as float tensors in [0, 1], plus a deterministic, resumable batcher.

No DataLoader / worker processes: the whole training set is one (60000, 1, 28, 28) tensor and the
order of epoch ``e`` is ``randperm(n)`` from a generator seeded with ``(seed, e)``, so the loader
position is fully described by the global step (checkpointed) and a resumed run sees the same batches.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

import torch

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
DATA_ENV = "GMWAE_DATA"


class MissingDataError(FileNotFoundError):
    pass


def default_data_dir() -> str:
    return os.environ.get(DATA_ENV, "data")


def _raw_present(root: Path) -> bool:
    raw = root / "MNIST" / "raw"
    return all((raw / f).exists() or (raw / (f + ".gz")).exists() for f in MNIST_FILES)


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


def load_mnist(data_dir: str, download: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (x_train (60000,1,28,28) float32 in [0,1], y_train int64, x_test, y_test)."""
    from torchvision.datasets import MNIST

    root = Path(data_dir).expanduser()
    if not _raw_present(root):
        if not download:
            raise MissingDataError(missing_data_message(root))
        try:
            MNIST(str(root), train=True, download=True)
            MNIST(str(root), train=False, download=True)
        except Exception as e:  # network unreachable, permission denied, bad checksum ...
            raise MissingDataError(missing_data_message(root, e)) from e
    out = []
    for train in (True, False):
        try:
            ds = MNIST(str(root), train=train, download=False)
        except Exception as e:
            raise MissingDataError(missing_data_message(root, e)) from e
        x = ds.data.to(torch.float32).div_(255.0).unsqueeze(1).contiguous()
        out += [x, ds.targets.to(torch.int64).clone()]
    return tuple(out)  # type: ignore[return-value]


def subset(x: torch.Tensor, y: torch.Tensor, n: Optional[int], seed: int = 0):
    """First-n of a fixed random permutation (class-balanced enough for small tests); n=None: all."""
    if n is None or n >= len(x):
        return x, y
    g = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randperm(len(x), generator=g)[:n].sort().values
    return x[idx], y[idx]


class Batcher:
    """Deterministic epoch-wise shuffling; batch ``step`` (0-based) is a pure function of (seed, step)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        if batch_size > len(x):
            raise ValueError(f"batch size {batch_size} > number of training images {len(x)}")
        self.x, self.y, self.bs, self.seed = x, y, batch_size, seed
        self.per_epoch = len(x) // batch_size      # the last partial batch of an epoch is dropped
        self._epoch, self._perm = -1, None

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(len(self.x), generator=g), epoch
        return self._perm

    def batch(self, step: int):
        epoch, i = divmod(step, self.per_epoch)
        idx = self._perm_for(epoch)[i * self.bs:(i + 1) * self.bs]
        return self.x[idx], self.y[idx]

    def epoch_of(self, step: int) -> float:
        return step / self.per_epoch
