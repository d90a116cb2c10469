"""Data-parallel training: which rows of a step's global batch a process computes, and the process group.

``torchrun --nproc_per_node=R -m gmwae_fast.train ...`` starts R processes; each one loads the data, draws the same
global batch of ``--batch-size`` images (the same seeded permutation) and the same random numbers (prior samples,
reparameterisation noise, augmentation warps, all drawn for the *global* batch from the checkpointed generator and
sliced), and computes the rows of its :class:`Shards`. The MMD is the exact MMD² of the global batch
(``fast_imq_mmd(..., process_group=...)``); batch means are reduced over the ranks; DDP averages the gradients, so
every rank's loss is ``R * (its share of the batch means + the global terms)`` (see :func:`rank_objective`).

Batch norm: on CUDA the networks use ``torch.nn.SyncBatchNorm`` (statistics of the global batch, as one process
computes them). On CPU (gloo) torch has no synchronised batch norm, so each rank normalises with the statistics of
its own ``n / R`` images, and the running statistics (used only by the evaluation) are rank 0's, which DDP copies
to the other ranks at every step. ``--bn-shards S`` reproduces exactly this in one process: the batch is split into
the same S shards, each normalised with its own statistics, and only shard 0 updates the running statistics.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

#: Exit status of a rank whose collective failed or timed out (another rank failed, was killed or hangs).
EXIT_PEER_FAILED = 4


def split_bounds(total: int, parts: int) -> List[Tuple[int, int]]:
    """``parts`` contiguous ``(first, end)`` row ranges covering ``range(total)``; sizes differ by at most one (the
    first ``total % parts`` ranges have one row more). Example: ``split_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]``."""
    if parts < 1 or total < 0:
        raise ValueError(f"split_bounds needs parts >= 1 and total >= 0, got total={total}, parts={parts}")
    q, rem = divmod(total, parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + q + (1 if i < rem else 0)
        out.append((lo, hi))
        lo = hi
    return out


@dataclass(frozen=True)
class Shards:
    """The rows of a step's global batch of ``total`` images that this process computes.

    ``bounds``: the ``(first, end)`` global rows of each local shard (contiguous; each shard gets its own
    batch-norm statistics); ``world``/``rank``/``group``: the process group (``world == 1``: one process).
    ``virtual``: several shards in one process (``--bn-shards``): only shard 0 updates the running statistics.
    """

    total: int
    bounds: Tuple[Tuple[int, int], ...]
    world: int = 1
    rank: int = 0
    group: Any = None

    @staticmethod
    def single(total: int, bn_shards: int = 1) -> "Shards":
        """One process computing the whole batch, with batch-norm statistics over ``bn_shards`` equal shards."""
        return Shards(total, tuple(split_bounds(total, bn_shards)))

    @staticmethod
    def of_rank(total: int, world: int, rank: int, group: Any) -> "Shards":
        """Rank ``rank``'s shard of the global batch (the ranks' shards in rank order are the batch)."""
        return Shards(total, (split_bounds(total, world)[rank],), world, rank, group)

    @property
    def whole(self) -> bool:
        """One process, one shard: the plain single-process computation."""
        return self.world == 1 and len(self.bounds) == 1

    @property
    def virtual(self) -> bool:
        return len(self.bounds) > 1

    @property
    def first(self) -> int:
        return self.bounds[0][0]

    @property
    def end(self) -> int:
        return self.bounds[-1][1]

    def local(self, t: torch.Tensor) -> List[torch.Tensor]:
        """``t`` (this process's rows, ``end - first`` of them) cut into the local shards."""
        return [t[lo - self.first : hi - self.first] for lo, hi in self.bounds]

    def weights(self) -> List[float]:
        """``n_s / total`` for each local shard: its share of a batch mean."""
        return [(hi - lo) / self.total for lo, hi in self.bounds]

    def rows_of(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's part of a global-batch tensor ``t`` (any first dimension, split like the batch)."""
        if self.world == 1:
            return t
        lo, hi = split_bounds(t.shape[0], self.world)[self.rank]
        return t[lo:hi]

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over the ranks (``t`` itself with one process); ``t`` is detached."""
        t = t.detach()
        if self.world == 1:
            return t
        t = t.clone()
        dist.all_reduce(t, group=self.group)
        return t

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The global ``(total, ...)`` tensor whose rows ``first:end`` are this process's ``t`` (detached)."""
        if self.world == 1:
            return t.detach()
        full = t.new_zeros((self.total, *t.shape[1:]))
        full[self.first : self.end] = t.detach()
        return self.all_sum(full)

    def mmd_kwargs(self) -> dict:
        """``process_group=`` for ``fast_imq_mmd`` when data-parallel."""
        return {"process_group": self.group} if self.world > 1 else {}

    @contextlib.contextmanager
    def running_stats(self, model: nn.Module, shard: int) -> Iterator[None]:
        """Inside: batch norm of local shard ``shard``; with ``--bn-shards`` only shard 0 keeps its updates of the
        running statistics (as rank 0's are the ones DDP keeps)."""
        if not self.virtual or shard == 0:
            yield
            return
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [{k: b.clone() for k, b in m._buffers.items() if b is not None} for m in bns]
        try:
            yield
        finally:  # rebind, not copy: autograd holds the updated tensors for the backward
            for m, bufs in zip(bns, saved):
                m._buffers.update(bufs)


def rank_objective(terms: List[Tuple[float, torch.Tensor]], world: int) -> torch.Tensor:
    """``world * sum_i w_i t_i``: the tensor to backpropagate on one rank, for terms ``t_i`` that are either this
    rank's share of a batch mean (``(n_r / N) * mean_r``) or a global value with local gradients (the distributed
    MMD): DDP averages the R ranks' parameter gradients, so the average is the gradient of ``sum_i w_i T_i`` on the
    global batch in one process. One process (``world == 1``): the plain sum, left to right."""
    total = None
    for w, t in terms:
        total = w * t if total is None else total + w * t
    return total if world == 1 else world * total


@dataclass
class DistEnv:
    """The process group of a data-parallel run, from torchrun's environment (WORLD_SIZE > 1)."""

    world: int
    rank: int
    local_rank: int
    backend: str
    group: Any

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """WORLD_SIZE from the environment (torchrun sets it), 1 when absent; ValueError when malformed."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {raw!r}") from None
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
    return world


def _env_int(name: str) -> int:
    raw = os.environ.get(name)
    if raw is None:
        raise ValueError(
            f"WORLD_SIZE > 1 but {name} is not set; launch with torchrun (or set RANK, LOCAL_RANK, "
            f"MASTER_ADDR and MASTER_PORT)"
        )
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def init_distributed(device_kind: str, timeout_s: float) -> Optional[DistEnv]:
    """Joins the process group torchrun describes (None for one process): NCCL with one GPU per rank
    (``cuda:LOCAL_RANK``) on CUDA, gloo on CPU. Every collective fails after ``timeout_s`` seconds instead of
    waiting for a dead or stuck rank forever."""
    world = env_world_size()
    if world == 1:
        return None
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if not 0 <= rank < world:
        raise ValueError(f"RANK {rank} is outside 0..{world - 1}")
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return DistEnv(world, rank, local_rank, backend, dist.group.WORLD)


def shutdown(env: Optional[DistEnv], failed: bool) -> None:
    """Leaves the process group (after a failed collective, only where that cannot block: gloo)."""
    if env is None or not dist.is_initialized():
        return
    if failed and env.backend != "gloo":
        return
    dist.destroy_process_group()


def broadcast_object(env: Optional[DistEnv], obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself with one process)."""
    if env is None:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0, group=env.group)
    return box[0]


def agree_any(env: Optional[DistEnv], flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on some rank (one all-reduce); ``flag`` with one process."""
    if env is None:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.group)
    return bool(t.item() > 0)


def wrap_ddp(module: nn.Module, env: DistEnv, device: torch.device) -> nn.Module:
    """``module`` under DistributedDataParallel (parameters and buffers broadcast from rank 0 now)."""
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def sync_batchnorm(model: nn.Module, env: Optional[DistEnv], device: torch.device) -> Tuple[nn.Module, str]:
    """``(model, how batch norm is computed)``: SyncBatchNorm layers on CUDA with several ranks, else unchanged."""
    if env is None:
        return model, "batch"
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model), "sync"
    return model, "per-rank"
